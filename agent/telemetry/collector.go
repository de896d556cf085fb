package telemetry

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// The device metrics carry dcgm-exporter's names, units and labels, so
// dashboards and alerts written for dcgm-exporter work unchanged; lease and
// tenant are added. A MIG device's series have its GPU's gpu, UUID and
// device labels and its GPU_I_ID and GPU_I_PROFILE, as dcgm-exporter's MIG
// series do; a whole GPU's have both empty.
var deviceLabels = []string{"gpu", "UUID", "device", "modelName", "Hostname", "GPU_I_PROFILE", "GPU_I_ID", "lease", "tenant"}

func dcgmDesc(name, help string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, deviceLabels, nil)
}

var (
	descGPUUtil          = dcgmDesc("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).")
	descGREngineActive   = dcgmDesc("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "Ratio of time the graphics engine is active.")
	descFBUsed           = dcgmDesc("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).")
	descFBFree           = dcgmDesc("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).")
	descPower            = dcgmDesc("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).")
	descTemp             = dcgmDesc("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).")
	descECCSBE           = dcgmDesc("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.")
	descECCDBE           = dcgmDesc("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.")
	descRemapCorrectable = dcgmDesc("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors.")
	descRemapUncorrect   = dcgmDesc("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for uncorrectable errors.")
	descRemapPending     = dcgmDesc("DCGM_FI_DEV_ROW_REMAP_PENDING", "Whether a row remap is pending a GPU reset.")
	descRemapFailure     = dcgmDesc("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed.")
	descSMClock          = dcgmDesc("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).")
	descMemClock         = dcgmDesc("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).")
	descThrottle         = dcgmDesc("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Current clock throttle reasons (NVML bit mask).")
	descXID              = dcgmDesc("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.")

	deviceDescs = []*prometheus.Desc{
		descGPUUtil, descGREngineActive, descFBUsed, descFBFree, descPower, descTemp,
		descECCSBE, descECCDBE, descRemapCorrectable, descRemapUncorrect, descRemapPending,
		descRemapFailure, descSMClock, descMemClock, descThrottle, descXID,
	}
)

// deviceMeta is what a sample's series need beyond the sample.
type deviceMeta struct {
	model   string
	mig     bool
	hasXID  bool
	lastXID uint64
}

// snapshot is the last sample as ready-made metrics: built once per
// sample, so a scrape only hands them over.
type snapshot struct {
	metrics []prometheus.Metric
}

// buildSnapshot turns one sample of every device into metrics. A field a
// device did not report has no series (never a made-up zero). The XID
// series is 0 for a device without XIDs only while the event stream is
// open (0 then means "none seen since the agent started"). A second
// compute instance of one GPU instance, which dcgm-exporter's labels
// cannot tell from the first, is left out of the scrape (it is in the
// signed report).
func buildSnapshot(node string, samples []*agentv1.DeviceSample, metas []deviceMeta, eventsLive bool) *snapshot {
	out := make([]prometheus.Metric, 0, len(samples)*8)
	type giKey struct{ gpu, gi uint32 }
	seen := make(map[giKey]bool, len(samples))
	for i, d := range samples {
		m := metas[i]
		idx := strconv.FormatUint(uint64(d.GetGpuIndex()), 10)
		giID := ""
		if m.mig {
			k := giKey{d.GetGpuIndex(), d.GetGpuInstanceId()}
			if seen[k] {
				continue
			}
			seen[k] = true
			giID = strconv.FormatUint(uint64(d.GetGpuInstanceId()), 10)
		}
		// One set of label pairs per device, shared by its series.
		labels := prometheus.MakeLabelPairs(descXID, []string{idx, d.GetGpuUuid(), "nvidia" + idx, m.model, node, d.GetProfile(), giID, d.GetLeaseId(), d.GetTenant()})
		gauge := func(desc *prometheus.Desc, v float64) {
			out = append(out, &deviceMetric{desc: desc, labels: labels, value: v})
		}
		counter := func(desc *prometheus.Desc, v float64) {
			out = append(out, &deviceMetric{desc: desc, labels: labels, value: v, counter: true})
		}
		if d.UtilizationPct != nil {
			gauge(descGPUUtil, float64(d.GetUtilizationPct()))
		}
		if d.GrEngineActivePct != nil {
			gauge(descGREngineActive, float64(d.GetGrEngineActivePct())/100)
		}
		if d.MemoryUsedMib != nil {
			gauge(descFBUsed, float64(d.GetMemoryUsedMib()))
		}
		if d.MemoryFreeMib != nil {
			gauge(descFBFree, float64(d.GetMemoryFreeMib()))
		}
		if d.PowerMilliwatt != nil {
			gauge(descPower, float64(d.GetPowerMilliwatt())/1000)
		}
		if d.TemperatureC != nil {
			gauge(descTemp, float64(d.GetTemperatureC()))
		}
		if d.EccCorrectedVolatile != nil {
			counter(descECCSBE, float64(d.GetEccCorrectedVolatile()))
		}
		if d.EccUncorrectedVolatile != nil {
			counter(descECCDBE, float64(d.GetEccUncorrectedVolatile()))
		}
		if d.RemappedRowsCorrectable != nil {
			counter(descRemapCorrectable, float64(d.GetRemappedRowsCorrectable()))
		}
		if d.RemappedRowsUncorrectable != nil {
			counter(descRemapUncorrect, float64(d.GetRemappedRowsUncorrectable()))
		}
		if d.RemapPending != nil {
			gauge(descRemapPending, boolValue(d.GetRemapPending()))
		}
		if d.RemapFailed != nil {
			gauge(descRemapFailure, boolValue(d.GetRemapFailed()))
		}
		if d.SmClockMhz != nil {
			gauge(descSMClock, float64(d.GetSmClockMhz()))
		}
		if d.MemoryClockMhz != nil {
			gauge(descMemClock, float64(d.GetMemoryClockMhz()))
		}
		if d.ThrottleReasons != nil {
			gauge(descThrottle, float64(d.GetThrottleReasons()))
		}
		if m.hasXID || eventsLive {
			gauge(descXID, float64(m.lastXID))
		}
	}
	return &snapshot{metrics: out}
}

// deviceMetric is one series of one device. It is prometheus.NewConstMetric
// without the per-series copy of the label pairs: a device's series share
// one set, built once per sample.
type deviceMetric struct {
	desc    *prometheus.Desc
	labels  []*dto.LabelPair
	value   float64
	counter bool
}

func (m *deviceMetric) Desc() *prometheus.Desc { return m.desc }

func (m *deviceMetric) Write(out *dto.Metric) error {
	out.Label = m.labels
	if m.counter {
		out.Counter = &dto.Counter{Value: &m.value}
	} else {
		out.Gauge = &dto.Gauge{Value: &m.value}
	}
	return nil
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Describe implements prometheus.Collector.
func (s *Sampler) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range deviceDescs {
		ch <- d
	}
	s.readErrors.Describe(ch)
	ch <- s.xidsDropped.Desc()
	ch <- s.reportsMade.Desc()
	ch <- s.superseded.Desc()
}

// Collect implements prometheus.Collector: the last sample's device
// metrics (none before the first sample) and the sampler's own counters.
// It never reads the driver, so frequent scrapes cost the agent only the
// encoding.
func (s *Sampler) Collect(ch chan<- prometheus.Metric) {
	if snap := s.snap.Load(); snap != nil {
		for _, m := range snap.metrics {
			ch <- m
		}
	}
	s.readErrors.Collect(ch)
	ch <- s.xidsDropped
	ch <- s.reportsMade
	ch <- s.superseded
}
