package api

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// ListNodes pages through the fleet in id order: every node exactly once,
// pages no larger than asked, a node that joins behind the cursor does not
// shift later pages, and a forged token or size is InvalidArgument.
func TestListNodesPages(t *testing.T) {
	s := startServer(t)
	put := func(ids ...string) {
		t.Helper()
		err := s.st.Update(context.Background(), func(tx store.Tx) error {
			for _, id := range ids {
				raw, err := proto.Marshal(&nodev1.Node{Id: id})
				if err != nil {
					return err
				}
				if err := tx.Put(store.BucketNodes, id, raw); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var want []string
	for i := range 7 {
		want = append(want, fmt.Sprintf("node-%02d", i*2))
	}
	put(want...)
	nc := nodev1.NewNodeServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	ctx := context.Background()
	var got []string
	token := ""
	for pages := 0; ; pages++ {
		resp, err := nc.ListNodes(ctx, &nodev1.ListNodesRequest{PageSize: 3, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetNodes()) > 3 {
			t.Fatalf("page of %d nodes, asked for 3", len(resp.GetNodes()))
		}
		for _, n := range resp.GetNodes() {
			got = append(got, n.GetId())
		}
		if pages == 0 {
			put("node-01") // joins behind the cursor
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("pages gave %v, want %v", got, want)
	}
	all, err := nc.ListNodes(ctx, &nodev1.ListNodesRequest{})
	if err != nil || len(all.GetNodes()) != 8 || all.GetNextPageToken() != "" {
		t.Fatalf("default page: %d nodes, token %q, %v; want all 8", len(all.GetNodes()), all.GetNextPageToken(), err)
	}
	for name, req := range map[string]*nodev1.ListNodesRequest{
		"forged token":   {PageToken: "bm9kZS0wMQ"}, // "node-01", no prefix
		"not base64":     {PageToken: "!!"},
		"bad node name":  {PageToken: "YWZ0ZXI6Li4v"}, // "after:../"
		"page too large": {PageSize: 1001},
		"negative page":  {PageSize: -1},
	} {
		_, err := nc.ListNodes(ctx, req)
		if !errors.Is(errs.FromStatus(err), errs.ErrInvalidArgument) {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
}
