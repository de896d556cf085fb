package sanitize

import (
	"fmt"
	"testing"
)

// The memo answers as the rule does, for keys it holds and keys past its
// bound, and never grows past the bound.
func TestKeyMemoAgreesWithTheRuleAndIsBounded(t *testing.T) {
	// A key of over 64 bytes is decided each time and not kept (checked
	// while the memo has room).
	IsSensitiveKey("lease_id")
	long := "a_very_long_key_name_that_is_longer_than_sixty_four_bytes_password"
	if !IsSensitiveKey(long) {
		t.Fatalf("%q is not sensitive", long)
	}
	if m := *keyMemo.Load(); len(m) >= maxMemoKeys {
		t.Fatalf("memo full before the test: %d keys", len(m))
	} else if _, kept := m[long]; kept {
		t.Fatalf("memo kept a %d-byte key", len(long))
	}
	for round := range 2 {
		for i := range 3 * maxMemoKeys {
			key := fmt.Sprintf("field_%d", i)
			if i%3 == 0 {
				key = fmt.Sprintf("api_key_%d", i)
			}
			if got, want := IsSensitiveKey(key), isSensitiveKey(key); got != want {
				t.Fatalf("round %d: IsSensitiveKey(%q) = %v, the rule says %v", round, key, got, want)
			}
		}
	}
	if m := keyMemo.Load(); m == nil || len(*m) > maxMemoKeys {
		t.Fatalf("memo holds %v keys, bound %d", m, maxMemoKeys)
	}
}
