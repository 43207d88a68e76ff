package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
)

// post sends a raw body with the admin key; status and decoded body.
func post(tb testing.TB, method, url, body string) (int, map[string]any) {
	tb.Helper()
	req, err := http.NewRequest(method, url, bytes.NewBufferString(body))
	if err != nil {
		tb.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Admin-Key", testAdminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		tb.Fatalf("status %d, body not JSON: %q", resp.StatusCode, raw)
	}
	return resp.StatusCode, out
}

func countRows(tb testing.TB, pool *pgxpool.Pool, sql string, args ...any) int {
	tb.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}

// checkAnswer: never a 5xx; every refusal is the contract's envelope.
func checkAnswer(t *testing.T, status int, body map[string]any, in string) {
	t.Helper()
	if status >= 500 {
		t.Fatalf("status %d for %q: %v", status, in, body)
	}
	if status != http.StatusOK {
		if errCode(body) == "" {
			t.Fatalf("status %d without an error envelope for %q: %v", status, in, body)
		}
	}
}

// FuzzRegister: POST /products/register never answers 500, and a product
// row (and its policy_register audit row) exists iff the answer was 200.
func FuzzRegister(f *testing.F) {
	for _, seed := range []string{
		`{"slug":"acme","display_name":"Acme"}`,
		`{"slug":"acme","display_name":"Acme","policy":{"max_engines":3,"rate_limit_rpm":600}}`,
		`{"slug":"b","display_name":"B","policy":null}`,
		`{"slug":"c","display_name":"C","policy":{}}`,
		`{"slug":"d","display_name":"D","policy":{"max_engines":-1}}`,
		`{"slug":"e","display_name":"E","policy":{"max_engine":1}}`,
		`{"slug":"f","display_name":"F","policy":{"MAX_ENGINES":1}}`,
		`{"slug":"g","display_name":"G","policy":{"rate_limit_rpm":1e400}}`,
		`{"slug":"h","display_name":"H","policy":{"rate_limit_rpm":9223372036854775807}}`,
		`{"slug":"i","display_name":"\u0000"}`,
		`{"slug":"j","display_name":"\ud800"}`,
		`{"slug":"k","display_name":"K","extra":true}`,
		`{"slug":"Acme","display_name":"x"}`,
		`{"slug":"l","display_name":"L","policy":[]}`,
		`{"slug":"m","display_name":"M","policy":"{}"}`,
		`{"slug":"n","display_name":"N"}{"slug":"o"}`,
		`[]`, `null`, ``, `{`, "\xff\xfe",
	} {
		f.Add(seed)
	}
	s, _ := startServer(f, "", testConfig(), replicaOpts{})
	f.Fuzz(func(t *testing.T, body string) {
		products := countRows(t, s.Pool, `SELECT count(*) FROM products`)
		audits := countRows(t, s.Pool, `SELECT count(*) FROM audit_log WHERE action = 'policy_register'`)
		status, out := post(t, "POST", s.URL+"/products/register", body)
		checkAnswer(t, status, out, body)
		want := products
		if status == http.StatusOK {
			want++
			id, _ := out["product_id"].(string)
			if n := countRows(t, s.Pool, `SELECT count(*) FROM products WHERE id = $1 AND slug = $2`, id, out["slug"]); n != 1 {
				t.Fatalf("200 for %q but no product row %v", body, out)
			}
		}
		if got := countRows(t, s.Pool, `SELECT count(*) FROM products`); got != want {
			t.Fatalf("status %d for %q: %d products, want %d", status, body, got, want)
		}
		if got := countRows(t, s.Pool, `SELECT count(*) FROM audit_log WHERE action = 'policy_register'`); got != want-products+audits {
			t.Fatalf("status %d for %q: %d policy_register rows, want %d", status, body, got, want-products+audits)
		}
	})
}

// FuzzPolicy: PUT /products/{id}/policy never answers 500; the stored
// policy (and the policy_update audit trail) changes iff the answer was
// 200, and then to exactly the policy answered.
func FuzzPolicy(f *testing.F) {
	for _, seed := range []string{
		`{"policy":{}}`,
		`{"policy":{"max_engines":0}}`,
		`{"policy":{"max_engines":10,"rate_limit_rpm":1000}}`,
		`{"policy":{"rate_limit_rpm":-5}}`,
		`{"policy":{"rate_limit_rpm":"5"}}`,
		`{"policy":{"rate_limit_rpm":5.0}}`,
		`{"policy":{"rate_limit_rpm":5,"rate_limit_rpm":6}}`,
		`{"policy":{"Max_Engines":1}}`,
		`{"policy":{"burst":1}}`,
		`{"policy":null}`,
		`{"policy":[1,2]}`,
		`{"policy":{}, "more":1}`,
		`{}`, `{"policy":{"max_engines":1}} trailing`, `not json`,
	} {
		f.Add(seed)
	}
	s, _ := startServer(f, "", testConfig(), replicaOpts{})
	status, out := post(f, "POST", s.URL+"/products/register", `{"slug":"acme","display_name":"Acme","policy":{"max_engines":1}}`)
	if status != http.StatusOK {
		f.Fatalf("register: %d %v", status, out)
	}
	id := out["product_id"].(string)
	policyOf := func(t *testing.T) string {
		var p []byte
		if err := s.Pool.QueryRow(context.Background(), `SELECT policy FROM products WHERE id = $1`, id).Scan(&p); err != nil {
			t.Fatal(err)
		}
		return string(p)
	}
	f.Fuzz(func(t *testing.T, body string) {
		before := policyOf(t)
		audits := countRows(t, s.Pool, `SELECT count(*) FROM audit_log WHERE action = 'policy_update'`)
		status, out := post(t, "PUT", s.URL+"/products/"+id+"/policy", body)
		checkAnswer(t, status, out, body)
		after := policyOf(t)
		gotAudits := countRows(t, s.Pool, `SELECT count(*) FROM audit_log WHERE action = 'policy_update'`)
		if status != http.StatusOK {
			if after != before || gotAudits != audits {
				t.Fatalf("status %d for %q but the policy changed %s -> %s (audits %d -> %d)", status, body, before, after, audits, gotAudits)
			}
			return
		}
		answered, _ := json.Marshal(out["policy"])
		var a, b any
		json.Unmarshal(answered, &a)      //nolint:errcheck
		json.Unmarshal([]byte(after), &b) //nolint:errcheck
		ab, _ := json.Marshal(a)
		bb, _ := json.Marshal(b)
		if !bytes.Equal(ab, bb) {
			t.Fatalf("200 for %q answered policy %s but stored %s", body, ab, bb)
		}
		if gotAudits != audits+1 {
			t.Fatalf("200 for %q: policy_update rows %d -> %d", body, audits, gotAudits)
		}
	})
}
