package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/mig"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// DefaultInterval is the sampling interval when Options.Interval is zero.
const DefaultInterval = 10 * time.Second

// MaxXIDsPerDevice bounds the XIDs one device carries in one report; more
// in one interval are dropped and counted
// (gpuaas_agent_telemetry_xids_dropped_total). The GPU health tracker sees
// every XID regardless: the report is for the record, not for decisions.
const MaxXIDsPerDevice = 64

// maxPendingDevices bounds the devices XIDs are held for between two
// samples; an event names its GPU itself, so a confused driver could
// otherwise name any number.
const maxPendingDevices = 256

// Attribution is the lease a device is bound to and its tenant.
type Attribution struct {
	LeaseID string
	Tenant  string
}

// Options configure a Sampler.
type Options struct {
	// Backend is read for every GPU and MIG device, and its XID events are
	// collected. Required.
	Backend gpu.Backend
	// Node is the node's id: the report's node_id and the Hostname label.
	// Required.
	Node string
	// Interval between samples; default DefaultInterval.
	Interval time.Duration
	// Attribution, if set, is called once per sample for the lease bound
	// to each device, by device UUID (MIG-... or GPU-...). Devices it does
	// not name are idle.
	Attribution func() map[string]Attribution
	// Key signs a report per sample. Nil: metrics only, no reports.
	Key *attestation.TelemetryKey
	// Now is the clock of report times; default time.Now.
	Now func() time.Time
	// Logger; default discards.
	Logger *slog.Logger
}

// Sampler reads every GPU and MIG device of the host at a fixed interval,
// keeps the latest reading for the Prometheus endpoint (it is a
// prometheus.Collector that serves that reading, so a scrape never calls
// the driver), and, with a key, signs each reading into a TelemetryReport
// with a strictly increasing sequence number. Create it with NewSampler
// and start it with Run.
type Sampler struct {
	opts    Options
	reports chan *agentv1.TelemetryReport
	asks    chan chan sampleResult
	running atomic.Bool

	// Owned by the Run goroutine (or by one caller of round).
	seq      uint64
	events   <-chan gpu.Event
	noEvents bool                    // the stream failed and that was logged
	pending  map[string]*pendingXIDs // device UUID -> XIDs for the next report
	lastXID  map[string]uint64       // device UUID -> the last XID it reported
	where    map[xidScope][]string   // the last sample's MIG devices by scope
	profiles map[string]map[mig.ProfileID]string

	snap atomic.Pointer[snapshot]

	readErrors  *prometheus.CounterVec
	xidsDropped prometheus.Counter
	reportsMade prometheus.Counter
	superseded  prometheus.Counter
}

// pendingXIDs are the XIDs of one device since the last report.
type pendingXIDs struct {
	gpu  string
	xids []uint64
}

// xidScope is the MIG device an event names: a GPU and its GPU and
// compute instance ids.
type xidScope struct {
	gpu    string
	gi, ci uint32
}

type sampleResult struct {
	report *agentv1.TelemetryReport
	err    error
}

// NewSampler checks the options and returns a sampler that has not read
// anything yet.
func NewSampler(o Options) (*Sampler, error) {
	if o.Backend == nil {
		return nil, errors.New("new telemetry sampler: no gpu backend")
	}
	if o.Node == "" {
		return nil, errors.New("new telemetry sampler: no node id")
	}
	if o.Interval < 0 {
		return nil, fmt.Errorf("new telemetry sampler: negative interval %s", o.Interval)
	}
	if o.Interval == 0 {
		o.Interval = DefaultInterval
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Sampler{
		opts:     o,
		reports:  make(chan *agentv1.TelemetryReport, 1),
		asks:     make(chan chan sampleResult),
		pending:  map[string]*pendingXIDs{},
		lastXID:  map[string]uint64{},
		where:    map[xidScope][]string{},
		profiles: map[string]map[mig.ProfileID]string{},
		readErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "gpuaas", Subsystem: "agent", Name: "telemetry_read_errors_total",
			Help: "Telemetry reads that failed, by what was read (devices, gpu, mig_devices, mig_device, profiles, events). The other devices are still sampled.",
		}, []string{"what"}),
		xidsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "gpuaas", Subsystem: "agent", Name: "telemetry_xids_dropped_total",
			Help: "XIDs left out of telemetry reports: over the per-device bound of one interval, or of a device no longer present.",
		}),
		reportsMade: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "gpuaas", Subsystem: "agent", Name: "telemetry_reports_total",
			Help: "Signed telemetry reports made.",
		}),
		superseded: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "gpuaas", Subsystem: "agent", Name: "telemetry_reports_superseded_total",
			Help: "Signed telemetry reports replaced by a newer one before the session took them.",
		}),
	}
	for _, w := range []string{"devices", "gpu", "mig_devices", "mig_device", "profiles", "events"} {
		s.readErrors.WithLabelValues(w)
	}
	return s, nil
}

// Reports delivers the signed reports. It holds at most one: a report
// not taken before the next is made is replaced by it (and counted), so a
// slow or absent session never makes memory grow, and what it does take is
// always the newest. Sequence numbers therefore increase strictly but may
// skip. Nothing is ever sent without Options.Key.
func (s *Sampler) Reports() <-chan *agentv1.TelemetryReport { return s.reports }

// Run samples immediately and then every Interval until ctx ends, when it
// returns nil. It collects XID events from the backend meanwhile; if the
// event stream cannot be opened or stops, sampling goes on and the stream
// is reopened at the next sample. One Run at a time.
func (s *Sampler) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("run telemetry sampler: already running")
	}
	defer s.running.Store(false)
	defer func() { s.events = nil }()

	tick := time.NewTicker(s.opts.Interval)
	defer tick.Stop()
	s.sampleAndPublish(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-s.events:
			s.receive(ctx, ev, ok)
		case <-tick.C:
			s.sampleAndPublish(ctx)
		case reply := <-s.asks:
			r, err := s.round(ctx)
			if r != nil {
				s.publish(r)
			}
			reply <- sampleResult{r, err}
		}
	}
}

// SampleNow asks the running sampler for a sample at once, publishes its
// report on Reports as a timed one would be, and returns it (nil without
// a key). It waits for Run to take the request, so it needs Run running;
// it gives up when ctx ends.
func (s *Sampler) SampleNow(ctx context.Context) (*agentv1.TelemetryReport, error) {
	reply := make(chan sampleResult, 1)
	select {
	case s.asks <- reply:
	case <-ctx.Done():
		return nil, fmt.Errorf("sample telemetry now: %w", ctx.Err())
	}
	select {
	case res := <-reply:
		return res.report, res.err
	case <-ctx.Done():
		return nil, fmt.Errorf("sample telemetry now: %w", ctx.Err())
	}
}

func (s *Sampler) sampleAndPublish(ctx context.Context) {
	r, err := s.round(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.opts.Logger.Warn("telemetry sample failed", "error", err)
		}
		return
	}
	if r != nil {
		s.publish(r)
	}
}

// publish puts r on the reports channel, replacing an untaken one. Only
// the Run goroutine sends, so after the old one is taken out the send
// cannot block.
func (s *Sampler) publish(r *agentv1.TelemetryReport) {
	for {
		select {
		case s.reports <- r:
			return
		default:
		}
		select {
		case <-s.reports:
			s.superseded.Inc()
		default:
		}
	}
}

// subscribe (re)opens the event stream if it is not open.
func (s *Sampler) subscribe(ctx context.Context) {
	if s.events != nil || ctx.Err() != nil {
		return
	}
	ch, err := s.opts.Backend.Events(ctx)
	if err != nil {
		s.readErrors.WithLabelValues("events").Inc()
		level := slog.LevelWarn
		if s.noEvents {
			level = slog.LevelDebug // said once until it recovers
		}
		s.opts.Logger.Log(ctx, level, "gpu events unavailable; telemetry reports carry no xids until they are", "error", err)
		s.noEvents = true
		return
	}
	s.events, s.noEvents = ch, false
}

// drain takes every event already delivered, without waiting.
func (s *Sampler) drain(ctx context.Context) {
	for s.events != nil {
		select {
		case ev, ok := <-s.events:
			s.receive(ctx, ev, ok)
		default:
			return
		}
	}
}

// receive files one event (ok false: the stream closed).
func (s *Sampler) receive(ctx context.Context, ev gpu.Event, ok bool) {
	if !ok {
		s.events = nil
		if ctx.Err() == nil {
			s.readErrors.WithLabelValues("events").Inc()
			s.opts.Logger.Warn("gpu event stream stopped; reopening it at the next sample")
		}
		return
	}
	if ev.Kind != gpu.EventXID {
		return
	}
	// The device the event names, as of the last sample: a MIG device, or
	// the GPU for an event of the whole GPU or of an instance not (yet)
	// sampled. A GPU-instance-wide event goes to each of its devices.
	uuids := []string{ev.GPUUUID}
	if ev.GPUInstanceID != gpu.WholeGPU {
		if u, ok := s.where[xidScope{ev.GPUUUID, ev.GPUInstanceID, ev.ComputeInstanceID}]; ok {
			uuids = u
		}
	}
	for _, u := range uuids {
		p := s.pending[u]
		if p == nil {
			if len(s.pending) >= maxPendingDevices {
				s.xidsDropped.Inc()
				continue
			}
			p = &pendingXIDs{gpu: ev.GPUUUID}
			s.pending[u] = p
		}
		if len(p.xids) >= MaxXIDsPerDevice {
			s.xidsDropped.Inc()
			continue
		}
		p.xids = append(p.xids, ev.XID)
	}
}

// round reads every device once, updates the snapshot the collector
// serves and, with a key, signs the reading. A device that cannot be read
// is reported without readings (and counted); only a failure to list the
// GPUs fails the round, and then the previous snapshot stays.
func (s *Sampler) round(ctx context.Context) (*agentv1.TelemetryReport, error) {
	b := s.opts.Backend
	now := s.opts.Now()
	devs, err := b.Devices(ctx)
	if err != nil {
		s.readErrors.WithLabelValues("devices").Inc()
		return nil, fmt.Errorf("sample telemetry: %w", err)
	}
	var attr map[string]Attribution
	if s.opts.Attribution != nil {
		attr = s.opts.Attribution()
	}

	samples := make([]*agentv1.DeviceSample, 0, len(devs)*8)
	metas := make([]deviceMeta, 0, len(devs)*8)
	clear(s.where)
	for _, d := range devs {
		gs := &agentv1.DeviceSample{Uuid: d.UUID, GpuUuid: d.UUID, GpuIndex: uint32(d.Index)}
		if t, err := b.DeviceTelemetry(ctx, d.UUID); err != nil {
			s.readFailed("gpu", d.UUID, err)
		} else {
			fillGPU(gs, t)
		}
		samples = append(samples, gs)
		metas = append(metas, deviceMeta{model: d.Name})

		migs, err := b.MIGDevices(ctx, d.UUID)
		if err != nil {
			if !errors.Is(err, gpu.ErrNotSupported) { // MIG off: no MIG devices
				s.readFailed("mig_devices", d.UUID, err)
			}
			continue
		}
		slices.SortFunc(migs, func(x, y gpu.MIGDevice) int {
			if x.GPUInstanceID != y.GPUInstanceID {
				return x.GPUInstanceID - y.GPUInstanceID
			}
			return x.ComputeInstanceID - y.ComputeInstanceID
		})
		for _, m := range migs {
			ms := &agentv1.DeviceSample{
				Uuid: m.UUID, GpuUuid: d.UUID, GpuIndex: uint32(d.Index),
				GpuInstanceId: uint32(m.GPUInstanceID), Profile: s.profileName(ctx, d.UUID, m.ProfileID),
			}
			if t, err := b.MIGTelemetry(ctx, m.UUID); err != nil {
				s.readFailed("mig_device", m.UUID, err)
			} else {
				fillMIG(ms, t)
			}
			samples = append(samples, ms)
			metas = append(metas, deviceMeta{model: d.Name, mig: true})
			gi := uint32(m.GPUInstanceID)
			s.where[xidScope{d.UUID, gi, uint32(m.ComputeInstanceID)}] = []string{m.UUID}
			wide := xidScope{d.UUID, gi, gpu.WholeGPU}
			s.where[wide] = append(s.where[wide], m.UUID)
		}
	}
	for _, smp := range samples {
		if a, ok := attr[smp.Uuid]; ok {
			smp.LeaseId, smp.Tenant = a.LeaseID, a.Tenant
		}
	}

	// XIDs: the events delivered until now, on the devices just listed.
	s.subscribe(ctx)
	s.drain(ctx)
	s.attachXIDs(samples, metas)
	s.snap.Store(buildSnapshot(s.opts.Node, samples, metas, s.events != nil))

	if s.opts.Key == nil {
		return nil, nil
	}
	s.seq++
	r, err := s.opts.Key.Sign(&agentv1.TelemetryPayload{
		NodeId:   s.opts.Node,
		Sequence: s.seq,
		Time:     timestamppb.New(now),
		Interval: durationpb.New(s.opts.Interval),
		Devices:  samples,
	})
	if err != nil {
		return nil, fmt.Errorf("sample telemetry: %w", err)
	}
	s.reportsMade.Inc()
	return r, nil
}

func (s *Sampler) readFailed(what, uuid string, err error) {
	s.readErrors.WithLabelValues(what).Inc()
	s.opts.Logger.Debug("telemetry read failed", "what", what, "device", uuid, "error", err)
}

// attachXIDs moves the pending XIDs onto the samples (a vanished MIG
// device's onto its GPU), records each device's last XID, and forgets
// devices that are gone.
func (s *Sampler) attachXIDs(samples []*agentv1.DeviceSample, metas []deviceMeta) {
	byUUID := make(map[string]int, len(samples))
	for i, smp := range samples {
		byUUID[smp.Uuid] = i
	}
	for uuid, p := range s.pending {
		i, ok := byUUID[uuid]
		if !ok {
			i, ok = byUUID[p.gpu]
		}
		if !ok {
			s.xidsDropped.Add(float64(len(p.xids)))
			continue
		}
		smp := samples[i]
		room := MaxXIDsPerDevice - len(smp.Xids)
		if n := len(p.xids) - room; n > 0 {
			s.xidsDropped.Add(float64(n))
			p.xids = p.xids[:room]
		}
		smp.Xids = append(smp.Xids, p.xids...)
	}
	clear(s.pending)
	for uuid := range s.lastXID {
		if _, ok := byUUID[uuid]; !ok {
			delete(s.lastXID, uuid)
		}
	}
	for i, smp := range samples {
		if n := len(smp.Xids); n > 0 {
			s.lastXID[smp.Uuid] = smp.Xids[n-1]
		}
		if x, ok := s.lastXID[smp.Uuid]; ok {
			metas[i].lastXID, metas[i].hasXID = x, true
		}
	}
}

// profileName is the driver's name of a GPU instance profile, asked once
// per GPU (and again for a profile it did not list).
func (s *Sampler) profileName(ctx context.Context, gpuUUID string, id mig.ProfileID) string {
	if name, ok := s.profiles[gpuUUID][id]; ok {
		return name
	}
	ps, err := s.opts.Backend.GPUInstanceProfiles(ctx, gpuUUID)
	if err != nil {
		s.readFailed("profiles", gpuUUID, err)
		return ""
	}
	names := make(map[mig.ProfileID]string, len(ps))
	for _, p := range ps {
		names[p.ID] = p.Name
	}
	if len(s.profiles) >= maxPendingDevices {
		clear(s.profiles)
	}
	s.profiles[gpuUUID] = names
	return names[id]
}

// fillGPU copies a physical GPU's readings.
func fillGPU(d *agentv1.DeviceSample, t gpu.Telemetry) {
	d.UtilizationPct = t.UtilizationPct
	fillCommon(d, t)
}

// fillMIG copies a MIG device's readings: its utilization is the GR
// engine activity (gpu.Observer's contract).
func fillMIG(d *agentv1.DeviceSample, t gpu.Telemetry) {
	d.GrEngineActivePct = t.UtilizationPct
	fillCommon(d, t)
}

func fillCommon(d *agentv1.DeviceSample, t gpu.Telemetry) {
	d.MemoryUsedMib = t.MemoryUsedMiB
	d.MemoryFreeMib = t.MemoryFreeMiB
	d.PowerMilliwatt = t.PowerMilliWatt
	d.TemperatureC = t.TemperatureC
	d.EccCorrectedVolatile = t.ECCCorrectedVolatile
	d.EccUncorrectedVolatile = t.ECCUncorrectedVolatile
	d.RemappedRowsCorrectable = t.RemappedRowsCorrectable
	d.RemappedRowsUncorrectable = t.RemappedRowsUncorrectable
	d.RemapPending = t.RemapPending
	d.RemapFailed = t.RemapFailed
	d.SmClockMhz = t.SMClockMHz
	d.MemoryClockMhz = t.MemoryClockMHz
	d.ThrottleReasons = t.ThrottleReasons
}
