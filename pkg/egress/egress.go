// Package egress holds the destinations no lease may ever reach, whatever
// its egress_allow says: the cloud metadata endpoints (instance credentials
// live there). The control plane refuses a lease whose allow list covers
// one, and the agent's fence denies each of them with a single-address
// prefix, more specific than any allow entry it would still accept.
package egress

import "net/netip"

// metadata are the cloud metadata endpoints: AWS, GCP, Azure, OpenStack
// and others at 169.254.169.254 (and AWS's IPv6 fd00:ec2::254), Azure's
// wire server 168.63.129.16, Alibaba Cloud's 100.100.100.200.
var metadata = []netip.Prefix{
	netip.MustParsePrefix("169.254.169.254/32"),
	netip.MustParsePrefix("fd00:ec2::254/128"),
	netip.MustParsePrefix("168.63.129.16/32"),
	netip.MustParsePrefix("100.100.100.200/32"),
}

// Metadata returns the metadata endpoints, each a single-address prefix.
func Metadata() []netip.Prefix { return append([]netip.Prefix(nil), metadata...) }

// Canonical masks p and writes an IPv4-mapped IPv6 prefix
// (::ffff:a.b.c.d/n, n >= 96) as the IPv4 prefix it is on the wire.
func Canonical(p netip.Prefix) netip.Prefix {
	p = p.Masked()
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p
}

// CoversMetadata reports the metadata endpoint an allow entry p would open:
// one that p contains. (An allow entry wins over deny entries no more
// specific than itself, so only the single-address entry itself, in either
// notation, could beat the fence's single-address deny; every entry that
// contains an endpoint is refused all the same, except the whole address
// space, which the fence's more specific denies still override.)
func CoversMetadata(p netip.Prefix) (netip.Prefix, bool) {
	p = Canonical(p)
	if p.Bits() == 0 {
		return netip.Prefix{}, false
	}
	for _, m := range metadata {
		if p.Addr().BitLen() == m.Addr().BitLen() && p.Contains(m.Addr()) {
			return m, true
		}
	}
	return netip.Prefix{}, false
}
