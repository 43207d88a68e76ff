package console

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// cookieName is the session cookie. Its value is
// base64url(JSON session) "." base64url(HMAC-SHA256(signKey, JSON)).
const cookieName = "orch_console"

// Roles of a session.
const (
	roleAdmin   = "admin"   // the admin key: the whole fleet, actions allowed
	roleProduct = "product" // a platform key: one product, read-only
)

// session is what the signed cookie holds: never a key. A product session
// holds its platform key's SHA-256 (what Postgres stores), checked again on
// every request so a rotated-out key ends its sessions.
type session struct {
	ID        string `json:"sid"`
	Role      string `json:"role"`
	ProductID string `json:"pid,omitempty"`
	KeyHash   string `json:"kh,omitempty"`
	Operator  string `json:"op,omitempty"` // the name the operator gave at login (audit metadata)
	Issued    int64  `json:"iat"`
	Expires   int64  `json:"exp"`

	productSlug string // filled per request for product sessions
}

// Admin reports whether the session may act.
func (s *session) Admin() bool { return s != nil && s.Role == roleAdmin }

// Scope is the product id the session is limited to ("" = the whole fleet).
func (s *session) Scope() string {
	if s == nil || s.Role == roleAdmin {
		return ""
	}
	return s.ProductID
}

// Who names the session in the page header.
func (s *session) Who() string {
	switch {
	case s == nil:
		return ""
	case s.Role == roleAdmin && s.Operator != "":
		return "admin (" + s.Operator + ")"
	case s.Role == roleAdmin:
		return "admin"
	}
	return "product " + s.productSlug + " (read-only)"
}

type ctxKey struct{}

func sessionFrom(ctx context.Context) *session {
	s, _ := ctx.Value(ctxKey{}).(*session)
	return s
}

// deriveKey derives the session signing key from the admin key, so the
// admin key itself signs nothing and is never in a cookie.
func deriveKey(adminKey string) []byte {
	m := hmac.New(sha256.New, []byte(adminKey))
	m.Write([]byte("enginefleet console session v1"))
	return m.Sum(nil)
}

func (c *Console) sign(b []byte) []byte {
	m := hmac.New(sha256.New, c.signKey)
	m.Write(b)
	return m.Sum(nil)
}

func (c *Console) encode(s *session) string {
	b, _ := json.Marshal(s)
	return base64.RawURLEncoding.EncodeToString(b) + "." + base64.RawURLEncoding.EncodeToString(c.sign(b))
}

// decode returns the session of a cookie value when its signature holds
// and it has not expired.
func (c *Console) decode(v string, now time.Time) (*session, bool) {
	payload, mac, ok := strings.Cut(v, ".")
	if !ok {
		return nil, false
	}
	b, err1 := base64.RawURLEncoding.DecodeString(payload)
	m, err2 := base64.RawURLEncoding.DecodeString(mac)
	if err1 != nil || err2 != nil || !hmac.Equal(m, c.sign(b)) {
		return nil, false
	}
	var s session
	if err := json.Unmarshal(b, &s); err != nil || s.ID == "" || now.Unix() >= s.Expires {
		return nil, false
	}
	if s.Role != roleAdmin && (s.Role != roleProduct || s.ProductID == "" || s.KeyHash == "") {
		return nil, false
	}
	return &s, true
}

// csrfToken is the session's CSRF token: a MAC of its id, sent in every
// form (field csrf) and by the script (header X-CSRF-Token).
func (c *Console) csrfToken(s *session) string {
	return base64.RawURLEncoding.EncodeToString(c.sign([]byte("csrf:" + s.ID)))
}

func (c *Console) csrfOK(r *http.Request, s *session) bool {
	got := r.Header.Get("X-CSRF-Token")
	if got == "" {
		got = r.PostFormValue("csrf")
	}
	return got != "" && hmac.Equal([]byte(got), []byte(c.csrfToken(s)))
}

// secure reports whether the browser reached us over TLS (directly or
// through a TLS-terminating proxy that says so).
func secure(r *http.Request) bool {
	return r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}

func (c *Console) setCookie(w http.ResponseWriter, r *http.Request, value string, maxAge int) {
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: value, Path: Path, MaxAge: maxAge,
		HttpOnly: true, Secure: secure(r), SameSite: http.SameSiteStrictMode})
}

// authed lets a request through with a valid session (and, for any
// method but GET/HEAD, a valid CSRF token from this origin); otherwise
// pages redirect to the login and the JSON endpoints answer 401.
func (c *Console) authed(next http.HandlerFunc) http.Handler {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s := c.current(r)
		if s == nil {
			if strings.HasPrefix(r.URL.Path, Path+"/api/") || r.Method != http.MethodGet {
				c.fail(w, r, http.StatusUnauthorized, "Your console session has ended: log in again.")
				return
			}
			http.Redirect(w, r, Path+"/login?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
			return
		}
		ctx := context.WithValue(r.Context(), ctxKey{}, s)
		r = r.WithContext(ctx)
		if r.Method != http.MethodGet && r.Method != http.MethodHead && !c.csrfOK(r, s) {
			c.fail(w, r, http.StatusForbidden, "This form has expired or did not come from the console (CSRF token missing or wrong): reload the page and try again.")
			return
		}
		next(w, r)
	})
	return c.csrf.Handler(h)
}

// admin is authed for the admin session only: product sessions are read-only.
func (c *Console) admin(next http.HandlerFunc) http.Handler {
	return c.authed(func(w http.ResponseWriter, r *http.Request) {
		if !sessionFrom(r.Context()).Admin() {
			c.fail(w, r, http.StatusForbidden, "This session is read-only: actions need the admin key.")
			return
		}
		next(w, r)
	})
}

// current returns the request's valid session, or nil. A product
// session's key must still open its product.
func (c *Console) current(r *http.Request) *session {
	ck, err := r.Cookie(cookieName)
	if err != nil {
		return nil
	}
	s, ok := c.decode(ck.Value, time.Now())
	if !ok {
		return nil
	}
	if s.Role == roleProduct {
		p, _, err := schema.New(c.pool).ProductByKeyHash(r.Context(), s.KeyHash)
		if err != nil || p.ID != s.ProductID {
			return nil
		}
		s.productSlug = p.Slug
	}
	return s
}

type loginData struct {
	Next  string
	Error string
	Name  string
}

func (c *Console) loginPage(w http.ResponseWriter, r *http.Request) {
	if s := c.current(r); s != nil {
		http.Redirect(w, r, safeNext(r.URL.Query().Get("next")), http.StatusSeeOther)
		return
	}
	c.render(w, r, http.StatusOK, "login", "Log in", "", loginData{Next: safeNext(r.URL.Query().Get("next"))})
}

// login takes the admin key (or a platform key) once and answers the
// session cookie. A wrong key costs the caller half a second.
func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	c.csrf.Handler(http.HandlerFunc(c.doLogin)).ServeHTTP(w, r)
}

func (c *Console) doLogin(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 8<<10)
	key := strings.TrimSpace(r.PostFormValue("key"))
	name := cleanName(r.PostFormValue("name"))
	next := safeNext(r.PostFormValue("next"))
	now := time.Now()
	s := &session{ID: randomID(), Operator: name, Issued: now.Unix(), Expires: now.Add(c.cfg.SessionTTL).Unix()}
	switch {
	case key != "" && keys.Equal(keys.Hash(key), keys.Hash(c.cfg.AdminKey)):
		s.Role = roleAdmin
	case key != "":
		p, _, err := schema.New(c.pool).ProductByKeyHash(r.Context(), keys.Hash(key))
		if err != nil && !orch.IsCode(err, orch.CodeProductNotFound) {
			c.failErr(w, r, err)
			return
		}
		if err == nil {
			s.Role, s.ProductID, s.KeyHash = roleProduct, p.ID, keys.Hash(key)
		}
	}
	if s.Role == "" {
		c.log.Warn("console login refused", "remote", r.RemoteAddr)
		select {
		case <-time.After(500 * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		c.render(w, r, http.StatusUnauthorized, "login", "Log in", "", loginData{Next: next, Name: name,
			Error: "That key was not accepted. Use the admin key (ORCH_ADMIN_KEY), or a product's platform key for a read-only view."})
		return
	}
	c.log.Info("console login", "role", s.Role, "product_id", s.ProductID, "operator", s.Operator, "remote", r.RemoteAddr)
	c.setCookie(w, r, c.encode(s), int(c.cfg.SessionTTL/time.Second))
	http.Redirect(w, r, next, http.StatusSeeOther)
}

func (c *Console) logout(w http.ResponseWriter, r *http.Request) {
	c.setCookie(w, r, "", -1)
	http.Redirect(w, r, Path+"/login", http.StatusSeeOther)
}

// safeNext keeps a post-login redirect inside the console.
func safeNext(next string) string {
	if !strings.HasPrefix(next, Path+"/") || strings.HasPrefix(next, "//") || strings.ContainsAny(next, "\\\r\n") {
		return Path + "/"
	}
	return next
}

// cleanName keeps an operator's name short and printable.
func cleanName(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return -1
	}, strings.TrimSpace(s))
	if r := []rune(s); len(r) > 64 {
		s = string(r[:64])
	}
	return s
}

func randomID() string {
	b := make([]byte, 16)
	rand.Read(b) //nolint:errcheck
	return hex.EncodeToString(b)
}
