package refengine

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode/utf8"
)

// MaxInputBytes bounds the input of one /execute turn.
const MaxInputBytes = 16 << 10

// maxRecall is how many memories a turn cites at most.
const maxRecall = 5

// ExecuteRequest is the body of POST /execute.
type ExecuteRequest struct {
	Input string `json:"input"`
}

// TokenEvent is the data of an "event: token" of /execute; the texts of
// all token events, concatenated, are the answer.
type TokenEvent struct {
	Text string `json:"text"`
}

// DoneEvent is the data of the final "event: done" of /execute.
type DoneEvent struct {
	MemoryID     int64   `json:"memory_id"`
	MemoriesUsed []int64 `json:"memories_used"`
}

// TurnTag tags the memory an /execute turn stores.
const TurnTag = "turn"

// execute runs one deterministic turn and streams it as server-sent events:
// "memory" (a Memory) for each recalled memory, "token" (TokenEvent) for
// each piece of the answer, then "done" (DoneEvent) once the turn is
// stored as a new memory. A failure after the stream began is sent as
// "error" (ErrorBody). A client that goes away ends the turn unstored.
func (s *Server) execute(w http.ResponseWriter, r *http.Request) {
	var req ExecuteRequest
	if !decodeBody(w, r, MaxBodyBytes, &req) {
		return
	}
	if strings.TrimSpace(req.Input) == "" {
		writeError(w, http.StatusBadRequest, CodeInvalidRequest, "input is empty")
		return
	}
	if len(req.Input) > MaxInputBytes {
		writeError(w, http.StatusBadRequest, CodeInvalidRequest, fmt.Sprintf("input is longer than %d bytes", MaxInputBytes))
		return
	}
	ctx := r.Context()
	hits, err := s.brain.Search(ctx, req.Input, AnyWord, maxRecall)
	if err != nil {
		s.internalError(w, "recall memories", err)
		return
	}

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	send := func(event string, v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, b); err != nil {
			return err
		}
		return rc.Flush()
	}

	used := make([]int64, 0, len(hits))
	for _, m := range hits {
		if err := send("memory", m); err != nil {
			return
		}
		used = append(used, m.ID)
	}
	answer := Answer(hits)
	for i, tok := range Tokens(answer) {
		if i > 0 && s.cfg.TokenDelay > 0 {
			t := time.NewTimer(s.cfg.TokenDelay)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
		}
		if ctx.Err() != nil {
			s.log.Info("execute abandoned by client")
			return
		}
		if err := send("token", TokenEvent{Text: tok}); err != nil {
			return
		}
	}
	if ctx.Err() != nil {
		return
	}
	m, err := s.brain.Add(ctx, TurnContent(req.Input, answer), []string{TurnTag})
	if err != nil {
		if !errors.Is(err, ctx.Err()) {
			s.log.Error("store turn", "err", err)
			send("error", ErrorBody{Error: ErrorDetail{Code: CodeInternal, Message: "could not store the turn"}})
		}
		return
	}
	send("done", DoneEvent{MemoryID: m.ID, MemoriesUsed: used})
}

// Answer is the deterministic reply of a turn given the recalled
// memories: it cites each one by id with the start of its content.
func Answer(hits []Memory) string {
	if len(hits) == 0 {
		return "I have no memories related to that yet. I will remember this conversation."
	}
	var b strings.Builder
	if len(hits) == 1 {
		b.WriteString("I recall 1 related memory:")
	} else {
		fmt.Fprintf(&b, "I recall %d related memories:", len(hits))
	}
	for _, m := range hits {
		fmt.Fprintf(&b, " [memory %d] %q", m.ID, snippet(m.Content, 80))
	}
	b.WriteString(".")
	return b.String()
}

// TurnContent is the content of the memory a turn stores.
func TurnContent(input, answer string) string {
	return "user: " + input + "\nassistant: " + answer
}

// Tokens splits text into the pieces streamed as token events: each word
// with the spaces that follow it, so the pieces concatenate to text.
func Tokens(text string) []string {
	var toks []string
	start := 0
	inSpace := false
	for i, r := range text {
		isSpace := r == ' ' || r == '\n' || r == '\t'
		if !isSpace && inSpace {
			toks = append(toks, text[start:i])
			start = i
		}
		inSpace = isSpace
	}
	if start < len(text) {
		toks = append(toks, text[start:])
	}
	return toks
}

// snippet is the first n runes of s on one line, with "…" when cut.
func snippet(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n]) + "…"
}
