package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

// Fleet rollouts: the operator (admin key, any product or all of them) or
// a product (platform key, its own engines) ships a new engine image in
// health-gated waves. The lifecycle core records the rollout; its driver
// job does the work; these handlers only decode, call and encode.

// adminOrPlatformSecurity: either key; a request with X-Admin-Key is the
// operator's, any other a product's (authMiddleware).
var adminOrPlatformSecurity = []map[string][]string{{securityAdmin: {}}, {securityPlatform: {}}}

// WaveIn is one wave as asked for.
type WaveIn struct {
	Percent float64 `json:"percent,omitempty" minimum:"0" maximum:"100" doc:"Share of the rollout's engines reached by the end of this wave (cumulative: 1, 10, 50, 100)"`
	Count   int     `json:"count,omitempty" minimum:"0" doc:"Engines in this wave"`
}

type createRolloutInput struct {
	Body struct {
		Image         string   `json:"image" minLength:"1" doc:"The engine image to roll out (ORCH_ENGINE_IMAGE_ALLOWLIST applies)" example:"enginefleet/engine:1.4.0"`
		ProductID     string   `json:"product_id,omitempty" doc:"Admin only: the product whose engines it covers (default: every product's). A product's rollout always covers its own engines."`
		Waves         []WaveIn `json:"waves,omitempty" maxItems:"100" doc:"Waves in order (default one wave of 100 %); engines left after the last make one more"`
		BakeSeconds   *int     `json:"bake_seconds,omitempty" minimum:"0" maximum:"604800" doc:"How long a wave must stay healthy before the next starts (default 300)"`
		FailureBudget *int     `json:"failure_budget,omitempty" minimum:"0" doc:"Engines of one wave that may fail (boot, health, crash) before the rollout stops and rolls back (default 0)"`
		MaxConcurrent *int     `json:"max_concurrent,omitempty" minimum:"1" maximum:"1000" doc:"Engines upgrading at once (default 10)"`
		InUseSeconds  *int     `json:"in_use_seconds,omitempty" minimum:"0" maximum:"86400" doc:"An engine admitted this recently is in use and waits (default 120; 0 = never wait). Admits record activity at most once a minute."`
	}
}

// RolloutWave is one wave's engines by status.
type RolloutWave struct {
	Wave    int            `json:"wave" doc:"1-based"`
	Engines int            `json:"engines"`
	Status  string         `json:"status" enum:"pending,upgrading,baking,done" doc:"Where the wave stands"`
	Counts  map[string]int `json:"counts" doc:"Engines per rollout status: pending, upgrading, upgraded, lazy (asleep: upgraded at its next wake), failed, skipped, rolling_back, rolled_back, rollback_lazy, rollback_failed, cancelled"`
}

// RolloutFailure is one engine that failed in a rollout.
type RolloutFailure struct {
	EngineID string    `json:"engine_id" format:"uuid"`
	UserID   string    `json:"user_id"`
	Wave     int       `json:"wave"`
	Status   string    `json:"status"`
	Error    string    `json:"error"`
	At       time.Time `json:"at"`
}

// RolloutBody is a rollout as GET /rollouts/{rollout_id} shows it.
type RolloutBody struct {
	RolloutID     string           `json:"rollout_id" format:"uuid"`
	ProductID     string           `json:"product_id,omitempty" format:"uuid" doc:"Absent for a fleet-wide rollout"`
	Image         string           `json:"image"`
	Status        string           `json:"status" enum:"running,paused,rolling_back,completed,rolled_back,aborted"`
	StopReason    string           `json:"stop_reason,omitempty" doc:"Why it paused, stopped or rolled back"`
	CurrentWave   int              `json:"current_wave" doc:"1-based"`
	BakeSeconds   int              `json:"bake_seconds"`
	FailureBudget int              `json:"failure_budget"`
	MaxConcurrent int              `json:"max_concurrent"`
	InUseSeconds  int              `json:"in_use_seconds"`
	Engines       int              `json:"engines"`
	Counts        map[string]int   `json:"counts" doc:"Engines per rollout status, all waves"`
	Waves         []RolloutWave    `json:"waves,omitempty"`
	Failures      []RolloutFailure `json:"failures,omitempty" doc:"The latest failed engines (at most 20)"`
	Actor         string           `json:"actor"`
	CreatedAt     time.Time        `json:"created_at"`
	UpdatedAt     time.Time        `json:"updated_at"`
	FinishedAt    *time.Time       `json:"finished_at,omitempty"`
}

// RolloutList is GET /rollouts.
type RolloutList struct {
	Rollouts []RolloutBody `json:"rollouts"`
}

type rolloutPath struct {
	ID string `path:"rollout_id" format:"uuid"`
}

type rolloutActionInput struct {
	ID   string `path:"rollout_id" format:"uuid"`
	Body *struct {
		Reason string `json:"reason,omitempty" maxLength:"500" doc:"Recorded in the audit log and stop_reason"`
	}
}

type abortInput struct {
	ID   string `path:"rollout_id" format:"uuid"`
	Body *struct {
		Rollback bool   `json:"rollback,omitempty" doc:"Also put every engine it upgraded back on its previous image (a completed rollout too)"`
		Reason   string `json:"reason,omitempty" maxLength:"500"`
	}
}

// scope is who asks: the admin ("", "admin") or a product (its id, its slug).
func scope(ctx context.Context) (productID, actor string) {
	p := productFrom(ctx)
	if p.ID == "" {
		return "", orch.ActorAdmin
	}
	return p.ID, p.Slug
}

func (s *Server) registerRollouts() {
	op := func(o huma.Operation) huma.Operation {
		o.Security, o.Tags = adminOrPlatformSecurity, []string{"rollouts"}
		return o
	}
	huma.Register(s.api, op(huma.Operation{
		OperationID: "create-rollout", Method: http.MethodPost, Path: "/rollouts",
		Summary: "Roll a new engine image out to a fleet in health-gated waves",
		Description: "Engines of each wave are upgraded through the per-engine upgrade (brain and key kept, that engine rolled back if it does not boot), " +
			"max_concurrent at a time. Sleeping and stopped engines take the image at their next wake; an engine in use (admitted within in_use_seconds) waits. " +
			"A wave must stay healthy for bake_seconds before the next starts; when its failures (boot, health, crash) exceed failure_budget " +
			"the rollout stops and puts every engine it upgraded back on its previous image. One rollout at a time owns an engine (409 otherwise).",
		Metadata: codes(orch.CodeRolloutNotFound, orch.CodeProductNotFound, orch.CodeOperationInProgress),
	}), func(ctx context.Context, in *createRolloutInput) (*struct{ Body RolloutBody }, error) {
		productID, actor := scope(ctx)
		if productID == "" && in.Body.ProductID != "" {
			p, err := schema.New(s.pool).GetProduct(ctx, in.Body.ProductID)
			if err != nil {
				return nil, toHTTP(ctx, err)
			}
			productID = p.ID
		}
		spec := lifecycle.RolloutSpec{ProductID: productID, Image: in.Body.Image, Actor: actor,
			Bake: time.Duration(orDefault(in.Body.BakeSeconds, 300)) * time.Second, FailureBudget: orDefault(in.Body.FailureBudget, 0),
			MaxConcurrent: orDefault(in.Body.MaxConcurrent, 10), InUse: time.Duration(orDefault(in.Body.InUseSeconds, 120)) * time.Second}
		for _, w := range in.Body.Waves {
			spec.Waves = append(spec.Waves, orch.WaveStep{Percent: w.Percent, Count: w.Count})
		}
		r, err := s.core.CreateRollout(ctx, spec)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return s.rolloutBody(ctx, r)
	})

	huma.Register(s.api, op(huma.Operation{
		OperationID: "list-rollouts", Method: http.MethodGet, Path: "/rollouts",
		Summary: "List rollouts, newest first (a product sees its own)", Metadata: codes(),
	}), func(ctx context.Context, in *struct {
		Limit int `query:"limit" default:"50" minimum:"1" maximum:"500"`
	}) (*struct{ Body RolloutList }, error) {
		productID, _ := scope(ctx)
		rs, err := schema.New(s.pool).Rollouts(ctx, productID, in.Limit)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &struct{ Body RolloutList }{}
		out.Body.Rollouts = make([]RolloutBody, 0, len(rs))
		for _, r := range rs {
			counts, err := schema.New(s.pool).RolloutCounts(ctx, r.ID)
			if err != nil {
				return nil, toHTTP(ctx, err)
			}
			b := toRolloutBody(r, counts)
			b.Waves = nil // the list stays small: GET /rollouts/{id} has them
			out.Body.Rollouts = append(out.Body.Rollouts, b)
		}
		return out, nil
	})

	huma.Register(s.api, op(huma.Operation{
		OperationID: "get-rollout", Method: http.MethodGet, Path: "/rollouts/{rollout_id}",
		Summary: "A rollout: its waves, counts, failures and why it stopped", Metadata: codes(orch.CodeRolloutNotFound),
	}), func(ctx context.Context, in *rolloutPath) (*struct{ Body RolloutBody }, error) {
		productID, _ := scope(ctx)
		r, err := schema.New(s.pool).Rollout(ctx, in.ID, productID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return s.rolloutBody(ctx, r)
	})

	act := func(id, summary string, a lifecycle.RolloutAction) {
		huma.Register(s.api, op(huma.Operation{
			OperationID: id + "-rollout", Method: http.MethodPost, Path: "/rollouts/{rollout_id}/" + id,
			Summary: summary, Metadata: codes(orch.CodeRolloutNotFound, orch.CodeInvalidState),
		}), func(ctx context.Context, in *rolloutActionInput) (*struct{ Body RolloutBody }, error) {
			reason := ""
			if in.Body != nil {
				reason = in.Body.Reason
			}
			return s.actOnRollout(ctx, in.ID, a, reason)
		})
	}
	act("pause", "Pause a running rollout: no new upgrades start (those in flight finish; the health gate keeps watching)", lifecycle.ActPause)
	act("resume", "Resume a paused rollout", lifecycle.ActResume)
	huma.Register(s.api, op(huma.Operation{
		OperationID: "abort-rollout", Method: http.MethodPost, Path: "/rollouts/{rollout_id}/abort",
		Summary:  "Stop a rollout for good; with rollback, also put every engine it upgraded back on its previous image",
		Metadata: codes(orch.CodeRolloutNotFound, orch.CodeInvalidState),
	}), func(ctx context.Context, in *abortInput) (*struct{ Body RolloutBody }, error) {
		a, reason := lifecycle.ActAbort, ""
		if in.Body != nil {
			reason = in.Body.Reason
			if in.Body.Rollback {
				a = lifecycle.ActRollback
			}
		}
		return s.actOnRollout(ctx, in.ID, a, reason)
	})
}

func (s *Server) actOnRollout(ctx context.Context, id string, a lifecycle.RolloutAction, reason string) (*struct{ Body RolloutBody }, error) {
	productID, actor := scope(ctx)
	r, err := s.core.ActOnRollout(ctx, id, productID, a, actor, reason)
	if err != nil {
		return nil, toHTTP(ctx, err)
	}
	return s.rolloutBody(ctx, r)
}

func (s *Server) rolloutBody(ctx context.Context, r orch.Rollout) (*struct{ Body RolloutBody }, error) {
	q := schema.New(s.pool)
	counts, err := q.RolloutCounts(ctx, r.ID)
	if err != nil {
		return nil, toHTTP(ctx, err)
	}
	fails, err := q.RolloutFailures(ctx, r.ID, 20)
	if err != nil {
		return nil, toHTTP(ctx, err)
	}
	b := toRolloutBody(r, counts)
	for _, f := range fails {
		b.Failures = append(b.Failures, RolloutFailure{EngineID: f.EngineID, UserID: f.UserID, Wave: f.Wave + 1,
			Status: string(f.Status), Error: f.Error, At: f.UpdatedAt})
	}
	return &struct{ Body RolloutBody }{Body: b}, nil
}

func toRolloutBody(r orch.Rollout, counts []schema.RolloutCount) RolloutBody {
	b := RolloutBody{RolloutID: r.ID, ProductID: r.ProductID, Image: r.Image, Status: string(r.Status), StopReason: r.StopReason,
		CurrentWave: min(r.CurrentWave, max(len(r.Waves)-1, 0)) + 1, BakeSeconds: int(r.Bake / time.Second), FailureBudget: r.FailureBudget,
		MaxConcurrent: r.MaxConcurrent, InUseSeconds: int(r.InUse / time.Second), Counts: map[string]int{},
		Actor: r.Actor, CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt, FinishedAt: r.FinishedAt}
	waves := make([]RolloutWave, len(r.Waves))
	for i, n := range r.Waves {
		waves[i] = RolloutWave{Wave: i + 1, Engines: n, Counts: map[string]int{}}
	}
	for _, c := range counts {
		b.Counts[string(c.Status)] += c.N
		b.Engines += c.N
		if c.Wave < len(waves) {
			waves[c.Wave].Counts[string(c.Status)] += c.N
		}
	}
	for i := range waves {
		w := &waves[i]
		switch {
		case w.Counts[string(orch.REUpgrading)] > 0 || w.Counts[string(orch.RERollingBack)] > 0:
			w.Status = "upgrading"
		case w.Counts[string(orch.REPending)] > 0:
			w.Status = "pending"
		case i == r.CurrentWave && r.Status.Active():
			w.Status = "baking"
		default:
			w.Status = "done"
		}
		if i > r.CurrentWave && w.Counts[string(orch.REPending)] == w.Engines {
			w.Status = "pending"
		}
	}
	b.Waves = waves
	return b
}

func orDefault(p *int, def int) int {
	if p == nil {
		return def
	}
	return *p
}
