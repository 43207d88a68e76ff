package orchestrator

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"time"
)

// Product is a tenant: one product with many users, each with an engine.
type Product struct {
	ID          string
	Slug        string
	DisplayName string
	Policy      Policy
	CreatedAt   time.Time
	UpdatedAt   time.Time
}

// Policy is a product's limits. A nil field means no limit.
type Policy struct {
	MaxEngines   *int `json:"max_engines,omitempty"`
	RateLimitRPM *int `json:"rate_limit_rpm,omitempty"`
}

// ParsePolicy decodes a policy strictly: unknown keys, wrong types and
// negative limits are INVALID_REQUEST, never ignored.
func ParsePolicy(raw []byte) (Policy, error) {
	var p Policy
	if len(bytes.TrimSpace(raw)) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return p, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return Policy{}, Errorf(CodeInvalidRequest, "invalid policy: %s", policyErrText(err))
	}
	if dec.More() {
		return Policy{}, Errorf(CodeInvalidRequest, "invalid policy: trailing data")
	}
	return p, p.Validate()
}

// Validate checks limits are within range.
func (p Policy) Validate() error {
	if p.MaxEngines != nil && *p.MaxEngines < 0 {
		return Errorf(CodeInvalidRequest, "invalid policy: max_engines must be >= 0")
	}
	if p.RateLimitRPM != nil && *p.RateLimitRPM < 0 {
		return Errorf(CodeInvalidRequest, "invalid policy: rate_limit_rpm must be >= 0")
	}
	return nil
}

func policyErrText(err error) string {
	var te *json.UnmarshalTypeError
	if ok := asTypeErr(err, &te); ok {
		return fmt.Sprintf("field %q must be %s", te.Field, te.Type.String())
	}
	return err.Error()
}

func asTypeErr(err error, target **json.UnmarshalTypeError) bool {
	te, ok := err.(*json.UnmarshalTypeError)
	if ok {
		*target = te
	}
	return ok
}

var slugRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ValidateSlug checks a product slug: lowercase letters, digits and dashes,
// 1-63 characters, not starting with a dash.
func ValidateSlug(s string) error {
	if !slugRE.MatchString(s) {
		return Errorf(CodeInvalidRequest, "slug must match %s", slugRE.String())
	}
	return nil
}

var userIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@:|+=~-]{0,127}$`)

// ValidateUserID checks a product's user id: 1-128 characters from a
// conservative set (letters, digits, and . _ @ : | + = ~ -: e-mail
// addresses and ids like auth0|123 fit), not starting with a
// punctuation character.
func ValidateUserID(s string) error {
	if !userIDRE.MatchString(s) {
		return Errorf(CodeInvalidRequest, "user_id must be 1-128 characters of [A-Za-z0-9._@:|+=~-], starting with a letter or digit")
	}
	return nil
}
