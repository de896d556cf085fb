package lease

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// The usage ledger: one entry per lease that ran, written when the lease
// first ends (TERMINATED, FAILED, or LOST when its node is declared down:
// what could not be observed is not billed), in the transaction that ends
// it. Each entry is also an audit entry (action usage.interval), so it is in
// the Merkle tree, covered by the signed checkpoints, and forwarded upstream
// in the audit batches; the ledger bucket indexes the entries for queries
// and makes the record once per lease. Entries are never updated or
// deleted.

// ActionUsage is the audit action of a usage ledger entry.
const ActionUsage = "usage.interval"

// Ledger bucket keys: "e/%020d" -> UsageEntry (JSON), "l/" + lease id ->
// the entry's sequence.
const (
	ledgerEntryPrefix = "e/"
	ledgerLeasePrefix = "l/"
	keyLedgerSeq      = "ledger_seq"
)

// migComputeSlices is the compute slice count of a whole MIG-capable GPU
// (A100, H100, H200 all have seven).
const migComputeSlices = 7

// UsageEntry is one lease's usage.
type UsageEntry struct {
	Seq      uint64    `json:"seq"`
	Tenant   string    `json:"tenant"`
	LeaseID  string    `json:"lease_id"`
	Node     string    `json:"node"`
	GPUUUID  string    `json:"gpu_uuid"`
	GPUModel string    `json:"gpu_model"`
	Profile  string    `json:"profile"` // MIG profile, or "whole-gpu"
	Start    time.Time `json:"start"`
	End      time.Time `json:"end"`
	EndPhase string    `json:"end_phase"` // TERMINATED, FAILED or LOST
	Millis   int64     `json:"duration_ms"`
	// GPUMillis is Millis weighted by the share of the GPU the lease held:
	// compute slices / 7 for a MIG partition, 1 for a whole GPU.
	GPUMillis int64 `json:"gpu_ms"`
	// AuditSeq is the sequence of the entry's audit record.
	AuditSeq uint64 `json:"audit_seq"`
}

// recordUsage appends l's usage entry in tx when l has just ended (prev was
// not an end) after its workload started, once per lease.
func recordUsage(tx store.Tx, l *leasev1.Lease, prev leasev1.Phase, now time.Time) error {
	ended := Terminal(l.GetPhase()) || l.GetPhase() == leasev1.Phase_PHASE_LOST
	if !ended || Terminal(prev) || prev == leasev1.Phase_PHASE_LOST || l.GetStatus().GetStartTime() == nil {
		return nil
	}
	if _, err := tx.Get(store.BucketLedger, ledgerLeasePrefix+l.GetId()); err == nil {
		return nil
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	p := l.GetPlacement()
	e := UsageEntry{Tenant: l.GetSpec().GetTenant(), LeaseID: l.GetId(), Node: p.GetNode(), GPUUUID: p.GetGpuUuid(), GPUModel: p.GetGpuModel(),
		Profile: p.GetMigProfile(), Start: l.GetStatus().GetStartTime().AsTime().UTC(), End: now.UTC(), EndPhase: short(l.GetPhase())}
	if end := l.GetStatus().GetEndTime(); end != nil && l.GetPhase() != leasev1.Phase_PHASE_LOST {
		e.End = end.AsTime().UTC()
	}
	if e.End.Before(e.Start) {
		e.End = e.Start
	}
	e.Millis = e.End.Sub(e.Start).Milliseconds()
	slices := migComputeSlices
	if e.Profile == "" {
		e.Profile = "whole-gpu"
	} else if n, err := strconv.Atoi(strings.SplitN(e.Profile, "g.", 2)[0]); err == nil && n > 0 && n <= migComputeSlices {
		slices = n
	}
	e.GPUMillis = e.Millis * int64(slices) / migComputeSlices
	seq, err := store.NextU64(tx, keyLedgerSeq)
	if err != nil {
		return err
	}
	e.Seq = seq
	ae, err := audit.Append(tx, auditlog.Entry{Time: now, Actor: System.ID, Tenant: e.Tenant, Action: ActionUsage, Resource: "lease/" + e.LeaseID,
		Outcome: auditlog.OutcomeSuccess, Reason: "lease ended " + e.EndPhase, Details: map[string]string{
			"ledger_seq": strconv.FormatUint(seq, 10), "node": e.Node, "gpu_uuid": e.GPUUUID, "gpu_model": e.GPUModel, "profile": e.Profile,
			"start": e.Start.Format(time.RFC3339Nano), "end": e.End.Format(time.RFC3339Nano),
			"duration_ms": strconv.FormatInt(e.Millis, 10), "gpu_ms": strconv.FormatInt(e.GPUMillis, 10),
		}})
	if err != nil {
		return err
	}
	e.AuditSeq = ae.Seq
	raw, err := json.Marshal(e)
	if err != nil {
		return err
	}
	if err := tx.Put(store.BucketLedger, fmt.Sprintf("%s%020d", ledgerEntryPrefix, seq), raw); err != nil {
		return err
	}
	return tx.Put(store.BucketLedger, ledgerLeasePrefix+e.LeaseID, store.U64(seq))
}

// Usage lists ledger entries after sequence after, oldest first, at most
// limit (0: all).
func Usage(tx store.Tx, after uint64, limit int) ([]UsageEntry, error) {
	var out []UsageEntry
	err := tx.Scan(store.BucketLedger, ledgerEntryPrefix, false, func(k string, v []byte) error {
		var e UsageEntry
		if err := json.Unmarshal(v, &e); err != nil {
			return fmt.Errorf("decode ledger entry %s: %w", k, err)
		}
		if e.Seq <= after {
			return nil
		}
		out = append(out, e)
		if limit > 0 && len(out) >= limit {
			return store.ErrStopScan
		}
		return nil
	})
	return out, err
}
