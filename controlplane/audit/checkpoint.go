package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

// CheckpointerOptions configures a Checkpointer.
type CheckpointerOptions struct {
	Store store.Store
	// Signers sign every checkpoint; more than one during a key rotation.
	Signers []note.Signer
	// Origin names the log in its checkpoints, e.g. "gpuaas.test/audit".
	Origin string
	// Every signs a checkpoint once this many entries are unsigned
	// (default 1000).
	Every uint64
	// Interval signs a checkpoint this long after the last one when any
	// entry is unsigned (default 10s).
	Interval time.Duration
	// Poll is how often Run looks at the log's size (default 200ms).
	Poll   time.Duration
	Logger *slog.Logger
}

// Checkpointer signs checkpoints of the log: every Every entries or every
// Interval, whichever comes first. It never signs a checkpoint that is not
// consistent with the last one stored.
type Checkpointer struct {
	o  CheckpointerOptions
	mu sync.Mutex // serializes Checkpoint; guards lastSign
	// lastSign is when this process last signed one.
	lastSign time.Time
}

// NewCheckpointer checks the options.
func NewCheckpointer(o CheckpointerOptions) (*Checkpointer, error) {
	if o.Store == nil || len(o.Signers) == 0 || o.Origin == "" {
		return nil, errors.New("audit checkpointer: a store, a signing key and an origin are required")
	}
	for _, s := range o.Signers {
		if s.Name() != o.Origin {
			return nil, fmt.Errorf("audit checkpointer: signing key %q is not named after the log's origin %q", s.Name(), o.Origin)
		}
	}
	if o.Every == 0 {
		o.Every = 1000
	}
	if o.Interval <= 0 {
		o.Interval = 10 * time.Second
	}
	if o.Poll <= 0 {
		o.Poll = 200 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Checkpointer{o: o, lastSign: time.Now()}, nil
}

// Run signs checkpoints until ctx ends, and one last time then, so a
// graceful stop leaves no entry unsigned. A refusal (an inconsistent log)
// is logged at error level on every attempt; it never signs past one.
func (c *Checkpointer) Run(ctx context.Context) {
	t := time.NewTicker(c.o.Poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			final, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if _, _, err := c.Checkpoint(final); err != nil {
				c.o.Logger.Error("audit checkpointer: no final checkpoint signed", "err", err)
			}
			return
		case <-t.C:
		}
		size, last, err := c.sizes(ctx)
		if err != nil {
			if ctx.Err() == nil {
				c.o.Logger.Error("audit checkpointer: read log size", "err", err)
			}
			continue
		}
		c.mu.Lock()
		since := time.Since(c.lastSign)
		c.mu.Unlock()
		if size == last || (size-last < c.o.Every && since < c.o.Interval) {
			continue
		}
		if _, _, err := c.Checkpoint(ctx); err != nil && ctx.Err() == nil {
			c.o.Logger.Error("audit checkpointer: no checkpoint signed", "size", size, "err", err)
		}
	}
}

func (c *Checkpointer) sizes(ctx context.Context) (size, last uint64, err error) {
	err = c.o.Store.View(ctx, func(tx store.Tx) error {
		if size, err = store.GetU64(tx, keySeq); err != nil {
			return err
		}
		_, lc, err := lastCheckpoint(tx)
		if lc != nil {
			last = lc.Size
		}
		return err
	})
	return size, last, err
}

// lastCheckpoint is the largest stored checkpoint (nil if none).
func lastCheckpoint(tx store.Tx) ([]byte, *auditlog.Checkpoint, error) {
	var signed []byte
	err := tx.Scan(store.BucketAuditCheckpoints, "", true, func(_ string, v []byte) error {
		signed = v
		return store.ErrStopScan
	})
	if err != nil || signed == nil {
		return nil, nil, err
	}
	cp, err := auditlog.ParseSigned(signed)
	if err != nil {
		return nil, nil, fmt.Errorf("latest stored checkpoint: %w", err)
	}
	return signed, &cp, nil
}

// Checkpoint signs a checkpoint of the whole log now, unless the latest
// stored one already covers it. It returns the signed note and whether a
// new one was stored. It refuses (auditlog.ErrInconsistent) when the log
// does not extend the latest stored checkpoint.
func (c *Checkpointer) Checkpoint(ctx context.Context) ([]byte, bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var signed []byte
	var created bool
	err := c.o.Store.Update(ctx, func(tx store.Tx) error {
		signed, created = nil, false
		size, tree, err := Head(tx)
		if err != nil {
			return err
		}
		prevSigned, prev, err := lastCheckpoint(tx)
		if err != nil {
			return err
		}
		next := auditlog.Checkpoint{Origin: c.o.Origin, Size: size, Root: tree.Root()}
		if prev != nil && prev.Size == size && bytes.Equal(prev.Root, next.Root) && prev.Origin == next.Origin {
			signed = prevSigned
			return nil
		}
		if size == 0 {
			return nil
		}
		var proof [][]byte
		if prev != nil && prev.Size < size {
			if proof, err = auditlog.ConsistencyProof(prev.Size, size, nodes(tx)); err != nil {
				return err
			}
		}
		msg, err := auditlog.SignNext(prev, next, proof, c.o.Signers...)
		if err != nil {
			return err
		}
		if err := tx.Put(store.BucketAuditCheckpoints, Key(size), msg); err != nil {
			return err
		}
		signed, created = msg, true
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("audit checkpoint: %w", err)
	}
	if created {
		c.lastSign = time.Now()
		cp, _ := auditlog.ParseSigned(signed)
		c.o.Logger.Info("audit checkpoint signed", "size", cp.Size, "origin", cp.Origin)
	}
	return signed, created, nil
}
