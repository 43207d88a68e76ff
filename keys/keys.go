// Package keys holds engine-key and platform-key custody: generating
// opaque keys, hashing them the way engines and the API check them, and
// encrypting engine keys at rest as Fernet tokens under the master keyring.
//
// Key material never leaves this package in an error message: errors say
// which key failed, never its bytes.
package keys

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/fernet/fernet-go"
)

// Generate returns a fresh opaque key: 32 random bytes, URL-safe base64
// without padding (43 characters).
func Generate() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand: " + err.Error()) // never fails on Linux
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// Hash returns the hex SHA-256 of key: what engines receive as
// ENGINE_KEY_HASH and what products.api_key_hash stores.
func Hash(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

// Equal compares two secrets in constant time.
func Equal(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// GenerateMasterKey returns a fresh Fernet master key (URL-safe base64 of
// 32 random bytes, 44 characters with padding).
func GenerateMasterKey() string {
	var k fernet.Key
	if err := k.Generate(); err != nil {
		panic("crypto/rand: " + err.Error())
	}
	return k.Encode()
}

// ErrUndecryptable means no key of the keyring opens a token: the master
// key changed without ORCH_MASTER_KEY_PREVIOUS, or the token is corrupt.
var ErrUndecryptable = errors.New("engine key token cannot be decrypted by any master key in the keyring")

// Keyring encrypts under the current master key and decrypts under the
// current or any previous one (ORCH_MASTER_KEY_PREVIOUS), so master keys
// rotate without downtime.
type Keyring struct {
	current *fernet.Key
	all     []*fernet.Key // current first
}

// ParseMasterKey checks that s is a Fernet key: URL-safe base64 (with
// padding) of exactly 32 bytes.
func ParseMasterKey(s string) (*fernet.Key, error) {
	b, err := base64.URLEncoding.DecodeString(s)
	if err != nil || len(b) != 32 {
		return nil, fmt.Errorf("must be URL-safe base64 of 32 bytes (44 characters), got %d characters", len(s))
	}
	var k fernet.Key
	copy(k[:], b)
	return &k, nil
}

// NewKeyring builds a keyring from the current master key and the previous
// ones (decrypt-only). Errors name which key is malformed, never its value.
func NewKeyring(current string, previous []string) (*Keyring, error) {
	cur, err := ParseMasterKey(current)
	if err != nil {
		return nil, fmt.Errorf("ORCH_MASTER_KEY %w", err)
	}
	kr := &Keyring{current: cur, all: []*fernet.Key{cur}}
	for i, p := range previous {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		k, err := ParseMasterKey(p)
		if err != nil {
			return nil, fmt.Errorf("ORCH_MASTER_KEY_PREVIOUS entry %d %w", i+1, err)
		}
		kr.all = append(kr.all, k)
	}
	return kr, nil
}

// Encrypt returns the Fernet token of plaintext under the current key.
func (kr *Keyring) Encrypt(plaintext string) (string, error) {
	tok, err := fernet.EncryptAndSign([]byte(plaintext), kr.current)
	if err != nil {
		return "", fmt.Errorf("encrypt engine key: %w", err)
	}
	return string(tok), nil
}

// Decrypt opens a token with any key of the ring; ErrUndecryptable if none can.
func (kr *Keyring) Decrypt(token string) (string, error) {
	msg := fernet.VerifyAndDecrypt([]byte(token), 0, kr.all)
	if msg == nil {
		return "", ErrUndecryptable
	}
	return string(msg), nil
}

// IsCurrent reports whether token is encrypted under the current key (so
// master-key rotation can skip rows already re-encrypted).
func (kr *Keyring) IsCurrent(token string) bool {
	return fernet.VerifyAndDecrypt([]byte(token), 0, kr.all[:1]) != nil
}
