package identity_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/gpuaas/gpuaas/pkg/identity"
)

var (
	_ identity.Source = (*identity.FileSource)(nil)
	_ identity.Source = identity.StaticSource{}
)

var td = spiffeid.RequireTrustDomainFromString("gpuaas.test")

func TestAgentID(t *testing.T) {
	tests := []struct {
		name    string
		td      spiffeid.TrustDomain
		node    string
		want    string
		wantErr bool
	}{
		{name: "simple", td: td, node: "gpu-node-01", want: "spiffe://gpuaas.test/gpuaas/agent/gpu-node-01"},
		{name: "single char", td: td, node: "a", want: "spiffe://gpuaas.test/gpuaas/agent/a"},
		{name: "digits", td: td, node: "0123", want: "spiffe://gpuaas.test/gpuaas/agent/0123"},
		{name: "63 chars", td: td, node: strings.Repeat("a", 63), want: "spiffe://gpuaas.test/gpuaas/agent/" + strings.Repeat("a", 63)},
		{name: "64 chars", td: td, node: strings.Repeat("a", 64), wantErr: true},
		{name: "empty", td: td, node: "", wantErr: true},
		{name: "upper case", td: td, node: "GPU1", wantErr: true},
		{name: "leading hyphen", td: td, node: "-gpu", wantErr: true},
		{name: "trailing hyphen", td: td, node: "gpu-", wantErr: true},
		{name: "dot", td: td, node: "gpu.1", wantErr: true},
		{name: "underscore", td: td, node: "gpu_1", wantErr: true},
		{name: "slash", td: td, node: "gpu/1", wantErr: true},
		{name: "dot dot", td: td, node: "..", wantErr: true},
		{name: "space", td: td, node: "gpu 1", wantErr: true},
		{name: "unicode", td: td, node: "gpü", wantErr: true},
		{name: "zero trust domain", td: spiffeid.TrustDomain{}, node: "gpu1", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := identity.AgentID(tt.td, tt.node)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("AgentID(%q) = %s, want error", tt.node, id)
				}
				if tt.td.IsZero() {
					return
				}
				if !errors.Is(err, identity.ErrInvalidName) {
					t.Errorf("AgentID(%q) error %v is not ErrInvalidName", tt.node, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("AgentID(%q): %v", tt.node, err)
			}
			if id.String() != tt.want {
				t.Errorf("AgentID(%q) = %s, want %s", tt.node, id, tt.want)
			}
			node, ok := identity.ParseAgentNode(id)
			if !ok || node != tt.node {
				t.Errorf("ParseAgentNode(%s) = %q, %v; want %q, true", id, node, ok, tt.node)
			}
		})
	}
}

func TestControlPlaneID(t *testing.T) {
	if got, want := identity.ControlPlaneID(td).String(), "spiffe://gpuaas.test/gpuaas/controlplane"; got != want {
		t.Errorf("ControlPlaneID = %s, want %s", got, want)
	}
	if got := identity.ControlPlaneID(spiffeid.TrustDomain{}); !got.IsZero() {
		t.Errorf("ControlPlaneID(zero) = %s, want zero id", got)
	}
}

func TestOperatorID(t *testing.T) {
	tests := []struct {
		name    string
		want    string
		wantErr bool
	}{
		{name: "alice", want: "spiffe://gpuaas.test/gpuaas/operator/alice"},
		{name: "jane.doe", want: "spiffe://gpuaas.test/gpuaas/operator/jane.doe"},
		{name: "ci_bot-2", want: "spiffe://gpuaas.test/gpuaas/operator/ci_bot-2"},
		{name: "", wantErr: true},
		{name: ".", wantErr: true},
		{name: "..", wantErr: true},
		{name: ".hidden", wantErr: true},
		{name: "alice.", wantErr: true},
		{name: "Alice", wantErr: true},
		{name: "a/b", wantErr: true},
		{name: "alice@example.com", wantErr: true},
		{name: strings.Repeat("o", 64), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := identity.OperatorID(td, tt.name)
			if tt.wantErr {
				if !errors.Is(err, identity.ErrInvalidName) {
					t.Fatalf("OperatorID(%q) = %s, %v; want ErrInvalidName", tt.name, id, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("OperatorID(%q): %v", tt.name, err)
			}
			if id.String() != tt.want {
				t.Errorf("OperatorID(%q) = %s, want %s", tt.name, id, tt.want)
			}
			if name, ok := identity.ParseOperatorName(id); !ok || name != tt.name {
				t.Errorf("ParseOperatorName(%s) = %q, %v", id, name, ok)
			}
		})
	}
}

func TestKindAndParseAgentNode(t *testing.T) {
	tests := []struct {
		id       string
		kind     identity.PeerKind
		node     string
		nodeOK   bool
		kindName string
	}{
		{id: "spiffe://gpuaas.test/gpuaas/agent/node-1", kind: identity.PeerAgent, node: "node-1", nodeOK: true, kindName: "agent"},
		{id: "spiffe://other.test/gpuaas/agent/node-1", kind: identity.PeerAgent, node: "node-1", nodeOK: true, kindName: "agent"},
		{id: "spiffe://gpuaas.test/gpuaas/controlplane", kind: identity.PeerControlPlane, kindName: "controlplane"},
		{id: "spiffe://gpuaas.test/gpuaas/operator/alice", kind: identity.PeerOperator, kindName: "operator"},
		{id: "spiffe://gpuaas.test/gpuaas/agent", kind: identity.PeerUnknown, kindName: "unknown"},
		{id: "spiffe://gpuaas.test/gpuaas/agent/node-1/extra", kind: identity.PeerUnknown},
		{id: "spiffe://gpuaas.test/gpuaas/agent/NODE", kind: identity.PeerUnknown},
		{id: "spiffe://gpuaas.test/gpuaas/agent/-x", kind: identity.PeerUnknown},
		{id: "spiffe://gpuaas.test/gpuaas/controlplane/x", kind: identity.PeerUnknown},
		{id: "spiffe://gpuaas.test/other/agent/node-1", kind: identity.PeerUnknown},
		{id: "spiffe://gpuaas.test/gpuaas/operator", kind: identity.PeerUnknown},
		{id: "spiffe://gpuaas.test", kind: identity.PeerUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			id := spiffeid.RequireFromString(tt.id)
			if got := identity.Kind(id); got != tt.kind {
				t.Errorf("Kind = %s, want %s", got, tt.kind)
			}
			if tt.kindName != "" && tt.kind.String() != tt.kindName {
				t.Errorf("String = %q, want %q", tt.kind.String(), tt.kindName)
			}
			node, ok := identity.ParseAgentNode(id)
			if ok != tt.nodeOK || node != tt.node {
				t.Errorf("ParseAgentNode = %q, %v; want %q, %v", node, ok, tt.node, tt.nodeOK)
			}
		})
	}
	if k := identity.Kind(spiffeid.ID{}); k != identity.PeerUnknown {
		t.Errorf("Kind(zero) = %s", k)
	}
	if _, ok := identity.ParseAgentNode(spiffeid.ID{}); ok {
		t.Error("ParseAgentNode(zero) ok")
	}
}

func TestAuthorizeKinds(t *testing.T) {
	agent := spiffeid.RequireFromString("spiffe://gpuaas.test/gpuaas/agent/n1")
	foreignAgent := spiffeid.RequireFromString("spiffe://evil.test/gpuaas/agent/n1")
	op := spiffeid.RequireFromString("spiffe://gpuaas.test/gpuaas/operator/alice")
	cp := identity.ControlPlaneID(td)
	odd := spiffeid.RequireFromString("spiffe://gpuaas.test/workload/x")

	tests := []struct {
		name  string
		kinds []identity.PeerKind
		id    spiffeid.ID
		ok    bool
	}{
		{name: "agent admitted", kinds: []identity.PeerKind{identity.PeerAgent}, id: agent, ok: true},
		{name: "agent of another trust domain", kinds: []identity.PeerKind{identity.PeerAgent}, id: foreignAgent},
		{name: "operator not in kinds", kinds: []identity.PeerKind{identity.PeerAgent}, id: op},
		{name: "operator in kinds", kinds: []identity.PeerKind{identity.PeerAgent, identity.PeerOperator}, id: op, ok: true},
		{name: "control plane", kinds: []identity.PeerKind{identity.PeerControlPlane}, id: cp, ok: true},
		{name: "unknown shape never", kinds: []identity.PeerKind{identity.PeerUnknown, identity.PeerAgent}, id: odd},
		{name: "no kinds admits nobody", id: agent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := identity.AuthorizeKinds(td, tt.kinds...)(tt.id, nil)
			if tt.ok && err != nil {
				t.Fatalf("authorize %s: %v", tt.id, err)
			}
			if !tt.ok && !errors.Is(err, identity.ErrUnauthorizedPeer) {
				t.Fatalf("authorize %s = %v, want ErrUnauthorizedPeer", tt.id, err)
			}
		})
	}
}
