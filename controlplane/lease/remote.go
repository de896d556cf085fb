package lease

import (
	"google.golang.org/protobuf/proto"

	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Committed takes a lease record as another control-plane replica
// committed it (replicated mode: read from the store's change feed). The
// change reaches this replica's WatchLeases streams and, if this replica
// holds the session of the lease's node, its agent, exactly as a change
// made here would. Watchers drop what they have already seen by revision,
// so a change this replica made and then reads back is not sent twice.
func (s *Service) Committed(raw []byte) error {
	l := &leasev1.Lease{}
	if err := proto.Unmarshal(raw, l); err != nil {
		return err
	}
	s.watch.publish(l)
	s.notify(l.GetPlacement().GetNode())
	return nil
}

// Resync ends every WatchLeases stream of this replica with WATCH_LAGGING,
// so each resumes from the last revision it received and reads what it
// missed from the store: after the change feed lost changes.
func (s *Service) Resync() { s.watch.dropAll() }

func (b *broadcaster) dropAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for w := range b.subs {
		delete(b.subs, w)
		close(w.lagged)
	}
}
