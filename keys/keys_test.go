package keys

import (
	"strings"
	"testing"
)

func TestGenerateAndHash(t *testing.T) {
	a, b := Generate(), Generate()
	if a == b || len(a) != 43 {
		t.Fatalf("keys not random or wrong length: %q %q", a, b)
	}
	if got := Hash("abc"); got != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
		t.Fatalf("Hash(abc) = %s", got)
	}
	if !Equal("x", "x") || Equal("x", "y") {
		t.Fatal("Equal wrong")
	}
}

func TestKeyringRotation(t *testing.T) {
	a, b := GenerateMasterKey(), GenerateMasterKey()
	ringA, err := NewKeyring(a, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ringA.Encrypt("engine-secret")
	if err != nil {
		t.Fatal(err)
	}
	// B current, A previous: old tokens still open, new ones are under B.
	ringBA, err := NewKeyring(b, []string{a})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ringBA.Decrypt(tok); err != nil || got != "engine-secret" {
		t.Fatalf("decrypt under previous: %q %v", got, err)
	}
	if ringBA.IsCurrent(tok) {
		t.Fatal("token under A reported current in ring B")
	}
	tok2, _ := ringBA.Encrypt("engine-secret")
	if !ringBA.IsCurrent(tok2) {
		t.Fatal("new token not current")
	}
	// B alone cannot open A's token.
	ringB, _ := NewKeyring(b, nil)
	if _, err := ringB.Decrypt(tok); err != ErrUndecryptable {
		t.Fatalf("want ErrUndecryptable, got %v", err)
	}
}

func TestParseMasterKeyErrorsNeverLeak(t *testing.T) {
	for _, bad := range []string{"", "short", strings.Repeat("A", 44), "not base64 at all !!!!!!!!!!!!!!!!!!!!!!!!!!!"} {
		_, err := NewKeyring(bad, nil)
		if err == nil {
			t.Fatalf("accepted %q", bad) // 44 'A's decode to 33 bytes: rejected too
		}
		if bad != "" && strings.Contains(err.Error(), bad) {
			t.Fatalf("error leaks the key: %v", err)
		}
	}
	good := GenerateMasterKey()
	_, err := NewKeyring(good, []string{"", "bogus-secret-value"})
	if err == nil || strings.Contains(err.Error(), "bogus-secret-value") || !strings.Contains(err.Error(), "PREVIOUS entry 2") {
		t.Fatalf("previous key error: %v", err)
	}
}
