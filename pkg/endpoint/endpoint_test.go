package endpoint

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestParse(t *testing.T) {
	got, err := Parse("cp-1:7443, cp-2:7443,[::1]:7443")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, "|") != "cp-1:7443|cp-2:7443|[::1]:7443" {
		t.Fatalf("Parse = %q", got)
	}
	for _, bad := range []string{"", "cp", "cp:1,", "cp:1,cp:1", ":7443", "cp:", strings.Repeat("a:1,", MaxAddresses) + "b:1"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"cp:1", "a:1,b:2", " a:1 , b:2 ", ",", "[::1]:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		addrs, err := Parse(s)
		if err != nil {
			return
		}
		if len(addrs) == 0 || len(addrs) > MaxAddresses {
			t.Fatalf("Parse(%q) = %d addresses", s, len(addrs))
		}
		for _, a := range addrs {
			if _, _, err := net.SplitHostPort(a); err != nil {
				t.Fatalf("Parse(%q) returned %q: %v", s, a, err)
			}
		}
	})
}

// serve starts a health server on loopback and returns its address and
// what stops it.
func serve(t *testing.T) (string, func()) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(lis)
	return lis.Addr().String(), srv.Stop
}

// A target over several addresses reaches a live one when the first is
// down, and moves on when the one in use stops.
func TestTargetFailsOver(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	a, stopA := serve(t)
	b, stopB := serve(t)
	defer stopB()
	target, opts := Target([]string{deadAddr, a, b})
	conn, err := grpc.NewClient(target, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	check := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		return err
	}
	if err := check(); err != nil {
		t.Fatalf("with the first address down: %v", err)
	}
	stopA()
	// The call in flight when the replica stops may fail (its connection
	// broke under it, as a session would); the next one reaches b.
	if err := check(); err != nil {
		if err := check(); err != nil {
			t.Fatalf("after the replica in use stopped: %v", err)
		}
	}
}
