package lease

import (
	"errors"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/errs"
)

// TestEgressAllowNeverOpensAMetadataEndpoint: no notation of a prefix that
// contains a cloud metadata endpoint gets through, broader ones included
// (the agent would let a /24 allow beat its /16 link-local deny).
func TestEgressAllowNeverOpensAMetadataEndpoint(t *testing.T) {
	for _, c := range []string{
		"169.254.169.254/32", "169.254.169.0/24", "169.254.0.0/16",
		"::ffff:169.254.169.254/128", "::ffff:169.254.0.0/112",
		"168.63.129.16/32", "100.100.100.0/24", "100.100.100.200/32",
		"fd00:ec2::254/128", "fd00:ec2::/64",
	} {
		r := req("k", "1g.18gb")
		r.Spec.Workload.EgressAllow = []string{"203.0.113.0/24", c}
		err := ValidateCreate(r)
		if !errors.Is(err, errs.ErrInvalidArgument) {
			t.Errorf("egress_allow %s: %v, want InvalidArgument", c, err)
		}
	}
	r := req("k", "1g.18gb")
	r.Spec.Workload.EgressAllow = []string{"0.0.0.0/0", "::/0", "169.254.170.0/24"}
	if err := ValidateCreate(r); err != nil {
		t.Errorf("prefixes that do not contain a metadata endpoint: %v", err)
	}
}
