package isolation

import (
	"errors"
	"net/netip"
	"testing"
)

// TestMetadataEndpointsAreNeverReachable: whatever a lease's allow list,
// the fence's decision for every cloud metadata endpoint is deny, and an
// allow list that names one is refused before anything is attached.
func TestMetadataEndpointsAreNeverReachable(t *testing.T) {
	endpoints := []string{"169.254.169.254", "::ffff:169.254.169.254", "168.63.129.16", "100.100.100.200", "fd00:ec2::254"}
	for _, allow := range [][]string{nil, {"0.0.0.0/0", "::/0"}, {"169.254.170.0/24", "100.64.0.0/10", "168.63.0.0/16"}} {
		p := Policy{DenyPrefixes: DefaultDenyPrefixes()}
		for _, a := range allow {
			p.AllowPrefixes = append(p.AllowPrefixes, netip.MustParsePrefix(a))
		}
		if len(allow) == 3 {
			// 168.63.0.0/16 and 100.64.0.0/10 contain endpoints: refused.
			if err := p.Validate(); !errors.Is(err, ErrInvalidPolicy) {
				t.Fatalf("allow %v: Validate = %v, want ErrInvalidPolicy", allow, err)
			}
			continue
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("allow %v: %v", allow, err)
		}
		for _, e := range endpoints {
			if p.Allows(netip.MustParseAddr(e)) {
				t.Errorf("allow %v: the fence lets a lease reach %s", allow, e)
			}
		}
		if len(allow) > 0 && !p.Allows(netip.MustParseAddr("203.0.113.7")) {
			t.Errorf("allow %v: a public address is denied", allow)
		}
	}
	for _, a := range []string{"169.254.169.0/24", "169.254.169.254/32", "::ffff:169.254.169.254/128", "100.100.100.0/24", "fd00:ec2::/64"} {
		p := Policy{DenyPrefixes: DefaultDenyPrefixes(), AllowPrefixes: []netip.Prefix{netip.MustParsePrefix(a)}}
		if err := p.Validate(); !errors.Is(err, ErrInvalidPolicy) {
			t.Errorf("allow %s: Validate = %v, want ErrInvalidPolicy", a, err)
		}
	}
}
