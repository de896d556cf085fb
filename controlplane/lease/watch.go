package lease

import (
	"cmp"
	"context"
	"slices"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// watchBuffer is how many changes a watcher may fall behind before it is
// dropped (it resumes from its last revision).
const watchBuffer = 1024

type watcher struct {
	ch     chan *leasev1.Lease
	lagged chan struct{}
}

// broadcaster fans committed lease changes out to watchers.
type broadcaster struct {
	mu   sync.Mutex
	subs map[*watcher]struct{}
}

func newBroadcaster() *broadcaster { return &broadcaster{subs: map[*watcher]struct{}{}} }

func (b *broadcaster) subscribe() *watcher {
	w := &watcher{ch: make(chan *leasev1.Lease, watchBuffer), lagged: make(chan struct{})}
	b.mu.Lock()
	b.subs[w] = struct{}{}
	b.mu.Unlock()
	return w
}

func (b *broadcaster) unsubscribe(w *watcher) {
	b.mu.Lock()
	delete(b.subs, w)
	b.mu.Unlock()
}

func (b *broadcaster) publish(l *leasev1.Lease) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.subs) == 0 {
		return // no copy for nobody: a watcher that subscribes later reads the store first
	}
	c := proto.Clone(l).(*leasev1.Lease)
	for w := range b.subs {
		select {
		case w.ch <- c:
		default:
			delete(b.subs, w)
			close(w.lagged)
		}
	}
}

// Watch sends every lease the caller may see whose revision is greater than
// from, then every later change, until ctx ends or send fails. A watcher that
// falls too far behind gets ResourceExhausted and resumes from the last
// revision it saw.
func (s *Service) Watch(ctx context.Context, c Caller, tenant string, from int64, send func(*leasev1.Lease) error) error {
	if c.Tenant != "" {
		if tenant != "" && tenant != c.Tenant {
			return errs.PermissionDenied("TENANT_MISMATCH", "caller may not watch tenant %s", tenant)
		}
		tenant = c.Tenant
	}
	if from < 0 {
		return errs.InvalidArgument("from_revision", "must not be negative")
	}
	visible := func(l *leasev1.Lease) bool { return tenant == "" || l.GetSpec().GetTenant() == tenant }
	// Subscribe before the snapshot so nothing committed in between is
	// missed; duplicates are filtered by revision.
	w := s.watch.subscribe()
	defer s.watch.unsubscribe(w)
	sent := map[string]int64{}
	var snapshot []*leasev1.Lease
	err := s.st.View(ctx, func(tx store.Tx) error {
		return scanLeases(tx, func(l *leasev1.Lease) error {
			if l.GetRevision() > from && visible(l) {
				snapshot = append(snapshot, l)
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	sortByRevision(snapshot)
	for _, l := range snapshot {
		if err := send(l); err != nil {
			return err
		}
		sent[l.GetId()] = l.GetRevision()
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-w.lagged:
			return errs.ResourceExhausted("WATCH_LAGGING", "watcher fell behind; resume from the last revision received")
		case l := <-w.ch:
			if !visible(l) || l.GetRevision() <= from || l.GetRevision() <= sent[l.GetId()] {
				continue
			}
			if err := send(l); err != nil {
				return err
			}
			sent[l.GetId()] = l.GetRevision()
		}
	}
}

func sortByRevision(ls []*leasev1.Lease) {
	slices.SortFunc(ls, func(a, b *leasev1.Lease) int { return cmp.Compare(a.GetRevision(), b.GetRevision()) })
}
