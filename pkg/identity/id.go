package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Path segments of the gpuaas SPIFFE ID scheme.
const (
	pathRoot         = "gpuaas"
	pathAgent        = "agent"
	pathControlPlane = "controlplane"
	pathOperator     = "operator"

	// MaxNameLen is the longest node or operator name, a DNS label.
	MaxNameLen = 63
)

// ErrInvalidName is the class of errors for node and operator names that do
// not follow the naming rules (see ValidateNodeName, ValidateOperatorName).
var ErrInvalidName = errors.New("invalid name")

// PeerKind is the role a SPIFFE ID has in the gpuaas ID scheme.
type PeerKind int

// Peer kinds. PeerUnknown is the zero value: an ID that is not one of ours is
// never mistaken for a role.
const (
	PeerUnknown PeerKind = iota
	PeerAgent
	PeerControlPlane
	PeerOperator
)

// String returns the lower-case name of the kind.
func (k PeerKind) String() string {
	switch k {
	case PeerAgent:
		return "agent"
	case PeerControlPlane:
		return "controlplane"
	case PeerOperator:
		return "operator"
	default:
		return "unknown"
	}
}

// AgentID returns spiffe://TD/gpuaas/agent/NODE. The node name must pass
// ValidateNodeName; the trust domain must not be zero.
func AgentID(td spiffeid.TrustDomain, node string) (spiffeid.ID, error) {
	if err := ValidateNodeName(node); err != nil {
		return spiffeid.ID{}, fmt.Errorf("agent id: %w", err)
	}
	id, err := spiffeid.FromSegments(td, pathRoot, pathAgent, node)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("agent id for node %q: %w", node, err)
	}
	return id, nil
}

// ControlPlaneID returns spiffe://TD/gpuaas/controlplane. For a zero trust
// domain it returns the zero ID, which no verified peer can ever have, so an
// authorizer built from it admits nobody.
func ControlPlaneID(td spiffeid.TrustDomain) spiffeid.ID {
	id, err := spiffeid.FromSegments(td, pathRoot, pathControlPlane)
	if err != nil {
		return spiffeid.ID{}
	}
	return id
}

// OperatorID returns spiffe://TD/gpuaas/operator/NAME. The name must pass
// ValidateOperatorName; the trust domain must not be zero.
func OperatorID(td spiffeid.TrustDomain, name string) (spiffeid.ID, error) {
	if err := ValidateOperatorName(name); err != nil {
		return spiffeid.ID{}, fmt.Errorf("operator id: %w", err)
	}
	id, err := spiffeid.FromSegments(td, pathRoot, pathOperator, name)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("operator id for %q: %w", name, err)
	}
	return id, nil
}

// ParseAgentNode returns the node name of an agent ID. It reports false for
// any ID that is not exactly /gpuaas/agent/NODE with a valid node name. It
// does not look at the trust domain: authorization must also check that the
// ID is a member of the expected trust domain (AuthorizeKinds does).
func ParseAgentNode(id spiffeid.ID) (node string, ok bool) {
	name, ok := parseNamed(id, pathAgent)
	if !ok || ValidateNodeName(name) != nil {
		return "", false
	}
	return name, true
}

// ParseOperatorName returns the operator name of an operator ID, like
// ParseAgentNode does for agents.
func ParseOperatorName(id spiffeid.ID) (name string, ok bool) {
	name, ok = parseNamed(id, pathOperator)
	if !ok || ValidateOperatorName(name) != nil {
		return "", false
	}
	return name, true
}

// Kind classifies an ID by its path alone. Like ParseAgentNode it ignores the
// trust domain; it returns PeerUnknown for anything that is not exactly one of
// the three shapes of the scheme.
func Kind(id spiffeid.ID) PeerKind {
	if id.IsZero() {
		return PeerUnknown
	}
	if id.Path() == "/"+pathRoot+"/"+pathControlPlane {
		return PeerControlPlane
	}
	if _, ok := ParseAgentNode(id); ok {
		return PeerAgent
	}
	if _, ok := ParseOperatorName(id); ok {
		return PeerOperator
	}
	return PeerUnknown
}

func parseNamed(id spiffeid.ID, kind string) (string, bool) {
	if id.IsZero() {
		return "", false
	}
	prefix := "/" + pathRoot + "/" + kind + "/"
	name, ok := strings.CutPrefix(id.Path(), prefix)
	if !ok || name == "" || strings.Contains(name, "/") {
		return "", false
	}
	return name, true
}

// ValidateNodeName checks a node name: a DNS label of 1 to 63 characters from
// [a-z0-9-] that starts and ends with a letter or digit. Upper case is
// rejected rather than folded so that one node has exactly one ID.
func ValidateNodeName(node string) error {
	return validateName("node", node, false)
}

// ValidateOperatorName checks an operator name: 1 to 63 characters from
// [a-z0-9._-] that starts and ends with a letter or digit (so "jane.doe" is
// allowed, while ".", ".." and hidden names are not).
func ValidateOperatorName(name string) error {
	return validateName("operator", name, true)
}

func validateName(what, name string, allowDotUnderscore bool) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: %s name is empty", ErrInvalidName, what)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: %s name is %d characters, limit %d", ErrInvalidName, what, len(name), MaxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
			continue
		case c == '-', allowDotUnderscore && (c == '.' || c == '_'):
			if i == 0 || i == len(name)-1 {
				return fmt.Errorf("%w: %s name %q must start and end with a letter or digit", ErrInvalidName, what, name)
			}
		default:
			allowed := "[a-z0-9-]"
			if allowDotUnderscore {
				allowed = "[a-z0-9._-]"
			}
			return fmt.Errorf("%w: %s name %q has character %q outside %s", ErrInvalidName, what, name, c, allowed)
		}
	}
	return nil
}
