package egress

import (
	"net/netip"
	"testing"
)

func TestCoversMetadata(t *testing.T) {
	for s, want := range map[string]bool{
		"169.254.169.254/32":         true,
		"169.254.169.0/24":           true,
		"169.254.0.0/16":             true,
		"::ffff:169.254.169.254/128": true,
		"::ffff:169.254.0.0/112":     true,
		"168.63.129.16/32":           true,
		"100.100.100.0/24":           true,
		"fd00:ec2::/64":              true,
		"169.254.170.0/24":           false,
		"203.0.113.0/24":             false,
		"0.0.0.0/0":                  false, // the fence's /32 denies still win
		"::/0":                       false,
		"2001:db8::/32":              false,
	} {
		if _, got := CoversMetadata(netip.MustParsePrefix(s)); got != want {
			t.Errorf("CoversMetadata(%s) = %v, want %v", s, got, want)
		}
	}
}

func TestMetadataIsACopy(t *testing.T) {
	m := Metadata()
	m[0] = netip.MustParsePrefix("192.0.2.1/32")
	if Metadata()[0] == m[0] {
		t.Fatal("Metadata returned the package's own slice")
	}
}
