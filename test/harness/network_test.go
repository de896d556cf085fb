package harness

import (
	"net/netip"
	"slices"
	"testing"
)

func TestSplitRuleUndoesIptablesQuoting(t *testing.T) {
	rule := `POSTROUTING -s 10.1.2.3/32 -m comment --comment "name: \"gpuaas-br\" id: \"c1\"" -j CNI-abc`
	want := []string{"POSTROUTING", "-s", "10.1.2.3/32", "-m", "comment", "--comment", `name: "gpuaas-br" id: "c1"`, "-j", "CNI-abc"}
	if got := splitRule(rule); !slices.Equal(got, want) {
		t.Fatalf("splitRule = %q, want %q", got, want)
	}
}

// The subnet a test network takes overlaps nothing the host routes.
func TestFreeSubnetOverlapsNoHostNetwork(t *testing.T) {
	used, err := hostPrefixes()
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		p, err := freeSubnet()
		if err != nil {
			t.Fatal(err)
		}
		if p.Bits() != 24 || !netip.MustParsePrefix("10.240.0.0/12").Contains(p.Addr()) {
			t.Fatalf("subnet %s outside 10.240.0.0/12 or not a /24", p)
		}
		for _, u := range used {
			if u.Overlaps(p) {
				t.Fatalf("subnet %s overlaps the host's %s", p, u)
			}
		}
	}
}
