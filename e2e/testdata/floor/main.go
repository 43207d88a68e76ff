// Command floor is the warm admit's physical floor for `make bench`: a
// bare Go HTTP handler that does what a warm admit cannot avoid — check a
// platform key held in memory, read the engine with one indexed SELECT on
// the same database, answer JSON — and nothing else (no framework, no
// logging). BenchmarkWarmAdmitVsFloor runs it beside the orchestrator
// under the same load generator.
//
//	floor -addr 127.0.0.1:PORT -db URL -product ID -key KEY
package main

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	db := flag.String("db", "", "database URL")
	product := flag.String("product", "", "product id")
	key := flag.String("key", "", "platform key")
	flag.Parse()
	pool, err := pgxpool.New(context.Background(), *db)
	if err != nil {
		log.Fatal(err)
	}
	sum := sha256.Sum256([]byte(*key))
	want := hex.EncodeToString(sum[:])
	http.HandleFunc("POST /engines/{user_id}/admit", func(w http.ResponseWriter, r *http.Request) {
		got := sha256.Sum256([]byte(r.Header.Get("X-Platform-Key")))
		if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(got[:])), []byte(want)) != 1 {
			http.Error(w, `{"error":{"code":"INVALID_PLATFORM_KEY"}}`, http.StatusUnauthorized)
			return
		}
		var out struct {
			Admitted bool `json:"admitted"`
			Engine   struct {
				EngineID      string    `json:"engine_id"`
				UserID        string    `json:"user_id"`
				Status        string    `json:"status"`
				URL           string    `json:"url"`
				APIKey        string    `json:"api_key"`
				EngineVersion string    `json:"engine_version"`
				CreatedAt     time.Time `json:"created_at"`
			} `json:"engine"`
		}
		var port int
		err := pool.QueryRow(r.Context(), `SELECT id::text, user_id, status, port, engine_version, engine_key_enc, created_at
			FROM engines WHERE product_id = $1 AND user_id = $2`, *product, r.PathValue("user_id")).
			Scan(&out.Engine.EngineID, &out.Engine.UserID, &out.Engine.Status, &port, &out.Engine.EngineVersion,
				&out.Engine.APIKey, &out.Engine.CreatedAt)
		if err != nil {
			http.Error(w, `{"error":{"code":"ENGINE_NOT_FOUND"}}`, http.StatusNotFound)
			return
		}
		out.Admitted = true
		out.Engine.URL = "http://127.0.0.1:" + strings.TrimSpace(itoa(port))
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(out) //nolint:errcheck
	})
	log.Fatal(http.ListenAndServe(*addr, nil))
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}
