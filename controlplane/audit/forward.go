package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
)

// Sink is the upstream the forwarder delivers to (the audit sink seam).
// Deliver must be idempotent on the batch id.
type Sink interface {
	// State returns the sink's size and latest checkpoint of the log.
	State(ctx context.Context, origin string) (size uint64, checkpoint []byte, err error)
	// Deliver appends one batch; duplicate reports a batch id it already
	// stored.
	Deliver(ctx context.Context, b auditlog.Batch) (size uint64, duplicate bool, err error)
}

// GRPCSink is a Sink reached over gRPC (AuditSinkService).
type GRPCSink struct {
	Client auditv1.AuditSinkServiceClient
}

// NewGRPCSink wraps a connection to a sink.
func NewGRPCSink(conn grpc.ClientConnInterface) *GRPCSink {
	return &GRPCSink{Client: auditv1.NewAuditSinkServiceClient(conn)}
}

// State implements Sink.
func (g *GRPCSink) State(ctx context.Context, origin string) (uint64, []byte, error) {
	r, err := g.Client.GetSinkState(ctx, &auditv1.GetSinkStateRequest{Origin: origin})
	if err != nil {
		return 0, nil, errs.FromStatus(err)
	}
	return r.GetTreeSize(), r.GetCheckpoint(), nil
}

// Deliver implements Sink.
func (g *GRPCSink) Deliver(ctx context.Context, b auditlog.Batch) (uint64, bool, error) {
	r, err := g.Client.DeliverBatch(ctx, &auditv1.DeliverBatchRequest{BatchId: b.ID, PreviousTreeSize: b.PrevSize,
		PreviousCheckpoint: b.PrevCheckpoint, Entries: b.Entries, Checkpoint: b.Checkpoint, ConsistencyProof: b.Consistency})
	if err != nil {
		return 0, false, errs.FromStatus(err)
	}
	return r.GetTreeSize(), r.GetDuplicate(), nil
}

// keyDelivered is the forwarder's state in the audit_forward bucket.
const keyDelivered = "delivered"

// Delivered is what the sink acknowledged last.
type Delivered struct {
	Size       uint64    `json:"size"`
	Checkpoint string    `json:"checkpoint"`
	BatchID    string    `json:"batch_id"`
	Time       time.Time `json:"time"`
}

// LoadDelivered reads the forwarder's state (zero if it never delivered).
func LoadDelivered(tx store.Tx) (Delivered, error) {
	var d Delivered
	raw, err := tx.Get(store.BucketAuditForward, keyDelivered)
	if errors.Is(err, store.ErrNotFound) {
		return d, nil
	}
	if err != nil {
		return d, err
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		return d, fmt.Errorf("audit forward state: %w", err)
	}
	return d, nil
}

// ErrNoBatch: no checkpoint beyond the given size yet.
var ErrNoBatch = errors.New("no signed checkpoint beyond the delivered one")

// ReadBatch builds the batch after the checkpoint at size from (0: the
// start of the log): up to the largest stored checkpoint at most max
// entries further, or the next checkpoint if even that is further. It is
// deterministic for a given store, so a retry sends the same batch id.
func ReadBatch(ctx context.Context, s store.Store, from uint64, max int) (auditlog.Batch, error) {
	var b auditlog.Batch
	err := s.View(ctx, func(tx store.Tx) error {
		var prev *auditlog.Checkpoint
		if from > 0 {
			signed, err := tx.Get(store.BucketAuditCheckpoints, Key(from))
			if err != nil {
				return fmt.Errorf("batch after %d: no stored checkpoint at %d: %w", from, from, err)
			}
			c, err := auditlog.ParseSigned(signed)
			if err != nil {
				return err
			}
			prev, b.PrevCheckpoint = &c, signed
		}
		var target []byte
		var firstAfter []byte
		limit := from + uint64(max)
		err := tx.Scan(store.BucketAuditCheckpoints, "", true, func(k string, v []byte) error {
			c, err := auditlog.ParseSigned(v)
			if err != nil {
				return fmt.Errorf("stored checkpoint %s: %w", k, err)
			}
			if c.Size <= from {
				return store.ErrStopScan
			}
			firstAfter = v
			if c.Size <= limit && target == nil {
				target = v
			}
			return nil
		})
		if err != nil {
			return err
		}
		if target == nil {
			target = firstAfter
		}
		if target == nil {
			return ErrNoBatch
		}
		next, err := auditlog.ParseSigned(target)
		if err != nil {
			return err
		}
		b.Checkpoint, b.PrevSize = target, from
		b.ID = auditlog.BatchID(prev, next)
		for seq := from + 1; seq <= next.Size; seq++ {
			raw, err := tx.Get(store.BucketAudit, Key(seq))
			if err != nil {
				return fmt.Errorf("batch entry %d: %w", seq, err)
			}
			b.Entries = append(b.Entries, raw)
		}
		if from > 0 {
			if b.Consistency, err = auditlog.ConsistencyProof(from, next.Size, nodes(tx)); err != nil {
				return err
			}
		}
		return nil
	})
	return b, err
}

// ForwarderOptions configures a Forwarder.
type ForwarderOptions struct {
	Store  store.Store
	Sink   Sink
	Origin string
	// MaxBatch is the preferred most entries a batch (default 1000); a
	// batch is never split between checkpoints, so it can be larger when
	// checkpoints are further apart.
	MaxBatch int
	// Poll is how often it looks for a new checkpoint (default 1s).
	Poll time.Duration
	// MinBackoff and MaxBackoff bound the exponential backoff with full
	// jitter after a failure (default 200ms and 30s).
	MinBackoff, MaxBackoff time.Duration
	Logger                 *slog.Logger
	// Registerer receives the forwarding metrics (nil: none).
	Registerer prometheus.Registerer
}

// Forwarder delivers the log to a sink in signed batches: at least once
// on its side, exactly once with the sink's batch id deduplication. Its
// position is in the store (audit_forward), and on every start and after
// every failure it asks the sink where it is, so neither a crash of the
// control plane between the sink's store and the acknowledgement nor a
// sink restart loses or repeats an entry.
type Forwarder struct {
	o       ForwarderOptions
	lag     prometheus.Gauge
	lagSecs prometheus.Gauge
	batches *prometheus.CounterVec
}

// NewForwarder checks the options and registers the metrics.
func NewForwarder(o ForwarderOptions) (*Forwarder, error) {
	if o.Store == nil || o.Sink == nil || o.Origin == "" {
		return nil, errors.New("audit forwarder: a store, a sink and an origin are required")
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 1000
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 200 * time.Millisecond
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(30*time.Second, o.MinBackoff)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Forwarder{
		o: o,
		lag: prometheus.NewGauge(prometheus.GaugeOpts{Name: "gpuaas_audit_forward_lag_entries",
			Help: "Audit entries appended but not yet acknowledged by the upstream sink."}),
		lagSecs: prometheus.NewGauge(prometheus.GaugeOpts{Name: "gpuaas_audit_forward_lag_seconds",
			Help: "Age of the oldest audit entry not yet acknowledged by the upstream sink (0 when none)."}),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_audit_forward_batches_total",
			Help: "Audit batches sent upstream, by result (delivered, duplicate, error)."}, []string{"result"}),
	}
	if o.Registerer != nil {
		for _, c := range []prometheus.Collector{f.lag, f.lagSecs, f.batches} {
			if err := o.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("audit forwarder metrics: %w", err)
			}
		}
	}
	return f, nil
}

// Run forwards until ctx ends.
func (f *Forwarder) Run(ctx context.Context) {
	failures := 0
	synced := false
	for ctx.Err() == nil {
		var err error
		if !synced {
			err = f.Sync(ctx)
			synced = err == nil
		}
		delivered := false
		if err == nil {
			delivered, err = f.Step(ctx)
		}
		f.updateLag(ctx)
		var wait time.Duration
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			failures++
			synced = false
			wait = f.backoff(failures)
			f.o.Logger.Warn("audit forwarding failed", "err", err, "attempt", failures, "retry_in", wait)
		case delivered:
			failures = 0
			continue
		default:
			failures = 0
			wait = f.o.Poll
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}

// backoff is exponential with full jitter: uniform in [min, min*2^n],
// capped at max.
func (f *Forwarder) backoff(failures int) time.Duration {
	ceil := f.o.MinBackoff << min(failures, 20)
	if ceil > f.o.MaxBackoff || ceil <= 0 {
		ceil = f.o.MaxBackoff
	}
	return f.o.MinBackoff + rand.N(ceil-f.o.MinBackoff+1)
}

// Sync aligns the stored position with the sink's. If the sink holds more
// than recorded (the control plane stopped between the sink's store and
// recording the acknowledgement), its checkpoint must be one this log
// signed; if it holds less (it lost data), forwarding restarts from there.
// A sink checkpoint that contradicts the log is an error, never skipped.
func (f *Forwarder) Sync(ctx context.Context) error {
	size, signed, err := f.o.Sink.State(ctx, f.o.Origin)
	if err != nil {
		return fmt.Errorf("audit sink state: %w", err)
	}
	return f.o.Store.Update(ctx, func(tx store.Tx) error {
		d, err := LoadDelivered(tx)
		if err != nil {
			return err
		}
		if size == d.Size {
			return nil
		}
		if size > 0 {
			theirs, err := auditlog.ParseSigned(signed)
			if err != nil || theirs.Size != size {
				return fmt.Errorf("audit sink state: checkpoint does not match its size %d: %v", size, err)
			}
			ours, err := tx.Get(store.BucketAuditCheckpoints, Key(size))
			if err != nil {
				return fmt.Errorf("%w: the sink holds %s, which this log never signed", auditlog.ErrInconsistent, theirs)
			}
			oc, err := auditlog.ParseSigned(ours)
			if err != nil {
				return err
			}
			if !bytes.Equal(oc.Root, theirs.Root) || oc.Origin != theirs.Origin {
				return fmt.Errorf("%w: fork: the sink holds %s, this log signed %s", auditlog.ErrInconsistent, theirs, oc)
			}
		}
		if size < d.Size {
			f.o.Logger.Warn("audit sink holds less than it acknowledged; resending", "sink_size", size, "delivered", d.Size)
		}
		return putDelivered(tx, Delivered{Size: size, Checkpoint: string(signed), BatchID: d.BatchID, Time: time.Now().UTC()})
	})
}

func putDelivered(tx store.Tx, d Delivered) error {
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	return tx.Put(store.BucketAuditForward, keyDelivered, b)
}

// Step delivers the next batch, if there is one, and records the
// acknowledgement. It reports whether a batch was delivered.
func (f *Forwarder) Step(ctx context.Context) (bool, error) {
	var d Delivered
	if err := f.o.Store.View(ctx, func(tx store.Tx) error {
		var err error
		d, err = LoadDelivered(tx)
		return err
	}); err != nil {
		return false, err
	}
	b, err := ReadBatch(ctx, f.o.Store, d.Size, f.o.MaxBatch)
	if errors.Is(err, ErrNoBatch) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	size, dup, err := f.o.Sink.Deliver(ctx, b)
	if err != nil {
		f.batches.WithLabelValues("error").Inc()
		return false, fmt.Errorf("deliver audit batch %s (entries %d..%d): %w", b.ID, b.PrevSize+1, b.PrevSize+uint64(len(b.Entries)), err)
	}
	want := b.PrevSize + uint64(len(b.Entries))
	if size < want {
		f.batches.WithLabelValues("error").Inc()
		return false, fmt.Errorf("audit sink acknowledged batch %s at size %d, want %d", b.ID, size, want)
	}
	result := "delivered"
	if dup {
		result = "duplicate"
	}
	f.batches.WithLabelValues(result).Inc()
	err = f.o.Store.Update(ctx, func(tx store.Tx) error {
		cur, err := LoadDelivered(tx)
		if err != nil {
			return err
		}
		if cur.Size >= want {
			return nil
		}
		return putDelivered(tx, Delivered{Size: want, Checkpoint: string(b.Checkpoint), BatchID: b.ID, Time: time.Now().UTC()})
	})
	if err != nil {
		return false, err
	}
	f.o.Logger.Debug("audit batch delivered", "batch", b.ID, "to", want, "duplicate", dup)
	return true, nil
}

func (f *Forwarder) updateLag(ctx context.Context) {
	_ = f.o.Store.View(ctx, func(tx store.Tx) error {
		size, err := store.GetU64(tx, keySeq)
		if err != nil {
			return err
		}
		d, err := LoadDelivered(tx)
		if err != nil {
			return err
		}
		lag := size - min(size, d.Size)
		f.lag.Set(float64(lag))
		f.lagSecs.Set(0)
		if lag > 0 {
			if raw, err := tx.Get(store.BucketAudit, Key(d.Size+1)); err == nil {
				if e, err := auditlog.Decode(raw); err == nil {
					f.lagSecs.Set(max(0, time.Since(e.Time).Seconds()))
				}
			}
		}
		return nil
	})
}
