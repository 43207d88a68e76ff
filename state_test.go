package orchestrator

import "testing"

// The whole transition table, both ways: every pair of states is listed
// with whether the move is allowed, so a change to the table must change
// this test too.
func TestTransitionsExhaustive(t *testing.T) {
	P, R, Sl, St, F, D := StateProvisioning, StateRunning, StateSleeping, StateStopped, StateFailed, StateDestroying
	allowed := map[[2]State]bool{
		{P, P}: true, {P, R}: true, {P, F}: true, {P, D}: true,
		{R, R}: true, {R, Sl}: true, {R, St}: true, {R, F}: true, {R, D}: true,
		{Sl, Sl}: true, {Sl, R}: true, {Sl, St}: true, {Sl, F}: true, {Sl, D}: true,
		{St, St}: true, {St, R}: true, {St, F}: true, {St, D}: true,
		{F, F}: true, {F, R}: true, {F, St}: true, {F, D}: true,
		{D, D}: true,
	}
	for _, from := range States {
		for _, to := range States {
			if got, want := CanTransition(from, to), allowed[[2]State{from, to}]; got != want {
				t.Errorf("CanTransition(%s, %s) = %v, want %v", from, to, got, want)
			}
		}
	}
	if CanTransition("zombie", R) || CanTransition(R, "zombie") {
		t.Error("unknown states must never transition")
	}
	// Nothing leaves destroying but the row's deletion.
	for _, to := range States {
		if to != D && CanTransition(D, to) {
			t.Errorf("destroying → %s allowed", to)
		}
	}
}

func TestTransitional(t *testing.T) {
	for _, s := range States {
		want := s == StateProvisioning || s == StateDestroying
		if s.Transitional() != want {
			t.Errorf("%s.Transitional() = %v", s, !want)
		}
	}
}

func TestParsePolicyStrict(t *testing.T) {
	cases := []struct {
		in string
		ok bool
	}{
		{`{}`, true}, {``, true}, {`null`, true},
		{`{"max_engines": 5, "rate_limit_rpm": 60}`, true},
		{`{"max_engines": "5"}`, false},
		{`{"max_engine": 5}`, false},
		{`{"max_engines": -1}`, false},
		{`{"max_engines": 1.5}`, false},
		{`[]`, false},
		{`{"max_engines": 5} {}`, false},
	}
	for _, c := range cases {
		_, err := ParsePolicy([]byte(c.in))
		if (err == nil) != c.ok {
			t.Errorf("ParsePolicy(%q) err = %v, want ok=%v", c.in, err, c.ok)
		}
		if err != nil && ErrorCode(err) != CodeInvalidRequest {
			t.Errorf("ParsePolicy(%q) code = %s", c.in, ErrorCode(err))
		}
	}
}

func TestValidateUserID(t *testing.T) {
	long := make([]byte, 129)
	for i := range long {
		long[i] = 'a'
	}
	for in, ok := range map[string]bool{"alice": true, "user-42": true, "a@b.c": true, "x:y_z": true, "auth0|123": true, "a+tag@b.c": true, "k=v~1": true,
		"a%b": false, "a?b": false, "a#b": false, "a\\b": false,
		"": false, "-lead": false, "a b": false, "a/b": false, string(long): false, string(long[:128]): true, "ü": false} {
		if (ValidateUserID(in) == nil) != ok {
			t.Errorf("ValidateUserID(%q) ok = %v, want %v", in, !ok, ok)
		}
	}
}
