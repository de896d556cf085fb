package lease

import (
	"net/netip"
	"regexp"
	"strings"
	"time"
	"unicode"

	"github.com/gpuaas/gpuaas/pkg/egress"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/mig"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	"github.com/gpuaas/gpuaas/pkg/seal"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Limits on a CreateLease request. Oversized input is refused, never
// truncated.
const (
	MaxIdempotencyKey = 128
	MaxImageRef       = 512
	MaxArgs           = 256
	MaxArgBytes       = 4096
	MaxArgsTotal      = 64 << 10
	MaxEnv            = 128
	MaxEnvValue       = 32 << 10
	MaxEnvTotal       = 64 << 10
	MinDuration       = time.Second
	MaxDuration       = 30 * 24 * time.Hour
	MaxWholeGPUs      = 8
	MaxMemoryBytes    = 1 << 40
	MaxCPUMillis      = 256_000
	MaxPids           = 1 << 20
	MaxEgressAllow    = 64
)

var (
	nameRE   = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	envKeyRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)
	leaseRE  = regexp.MustCompile(`^l-[a-z0-9]{20}$`)
)

// reservedEnvPrefixes are set by the agent; a tenant may not override them.
var reservedEnvPrefixes = []string{"NVIDIA_", "GPUAAS_", "CUDA_VISIBLE_DEVICES"}

// ValidName reports whether s is a valid tenant or node name.
func ValidName(s string) bool { return nameRE.MatchString(s) }

// ValidLeaseID reports whether s has the shape of a lease id.
func ValidLeaseID(s string) bool { return leaseRE.MatchString(s) }

func printable(s string) bool {
	for _, r := range s {
		if r > unicode.MaxASCII || !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// ValidateCreate checks a CreateLease request. The error names the first
// offending field.
func ValidateCreate(req *leasev1.CreateLeaseRequest) error {
	k := req.GetIdempotencyKey()
	if k == "" {
		return errs.InvalidArgument("idempotency_key", "is required")
	}
	if len(k) > MaxIdempotencyKey || !printable(k) {
		return errs.InvalidArgument("idempotency_key", "must be 1-%d printable ASCII characters", MaxIdempotencyKey)
	}
	spec := req.GetSpec()
	if spec == nil {
		return errs.InvalidArgument("spec", "is required")
	}
	if !ValidName(spec.GetTenant()) {
		return errs.InvalidArgument("spec.tenant", "must be a lower-case name of 1-63 characters [a-z0-9-]")
	}
	if err := validateGPU(spec.GetGpu()); err != nil {
		return err
	}
	if err := validateWorkload(spec.GetWorkload()); err != nil {
		return err
	}
	d := spec.GetDuration()
	if d == nil {
		return errs.InvalidArgument("spec.duration", "is required")
	}
	if err := d.CheckValid(); err != nil {
		return errs.InvalidArgument("spec.duration", "is not a valid duration")
	}
	if dur := d.AsDuration(); dur < MinDuration || dur > MaxDuration {
		return errs.InvalidArgument("spec.duration", "must be between %s and %s, got %s", MinDuration, MaxDuration, dur)
	}
	if err := sanitize.ValidateMetadata(spec.GetMetadata()); err != nil {
		return errs.InvalidArgument("spec.metadata", "%v", err)
	}
	return nil
}

func validateGPU(g *leasev1.GpuRequest) error {
	if g == nil {
		return errs.InvalidArgument("spec.gpu", "is required")
	}
	switch k := g.GetKind().(type) {
	case *leasev1.GpuRequest_MigProfile:
		if !mig.IsKnownProfileName(k.MigProfile) {
			return errs.InvalidArgument("spec.gpu.mig_profile", "unknown MIG profile %q", truncate(k.MigProfile, 32))
		}
	case *leasev1.GpuRequest_WholeGpus:
		if k.WholeGpus < 1 || k.WholeGpus > MaxWholeGPUs {
			return errs.InvalidArgument("spec.gpu.whole_gpus", "must be 1-%d", MaxWholeGPUs)
		}
	default:
		return errs.InvalidArgument("spec.gpu", "one of mig_profile or whole_gpus is required")
	}
	if n := g.GetNode(); n != "" && !ValidName(n) {
		return errs.InvalidArgument("spec.gpu.node", "is not a valid node name")
	}
	if m := g.GetGpuModel(); len(m) > 64 || !printable(m) {
		return errs.InvalidArgument("spec.gpu.gpu_model", "must be at most 64 printable characters")
	}
	return nil
}

func validateWorkload(w *leasev1.Workload) error {
	if w == nil {
		return errs.InvalidArgument("spec.workload", "is required")
	}
	img := w.GetImage()
	if img == "" {
		return errs.InvalidArgument("spec.workload.image", "is required")
	}
	if len(img) > MaxImageRef || !printable(img) || strings.ContainsAny(img, " \t") {
		return errs.InvalidArgument("spec.workload.image", "must be an image reference of at most %d printable characters", MaxImageRef)
	}
	if len(w.GetArgs()) > MaxArgs {
		return errs.InvalidArgument("spec.workload.args", "at most %d arguments", MaxArgs)
	}
	total := 0
	for _, a := range w.GetArgs() {
		if len(a) > MaxArgBytes || strings.ContainsRune(a, 0) {
			return errs.InvalidArgument("spec.workload.args", "each argument at most %d bytes, no NUL", MaxArgBytes)
		}
		total += len(a)
	}
	if total > MaxArgsTotal {
		return errs.InvalidArgument("spec.workload.args", "at most %d bytes in all", MaxArgsTotal)
	}
	if len(w.GetEnv()) > MaxEnv {
		return errs.InvalidArgument("spec.workload.env", "at most %d variables", MaxEnv)
	}
	total = 0
	for k, v := range w.GetEnv() {
		if !envKeyRE.MatchString(k) {
			return errs.InvalidArgument("spec.workload.env", "invalid variable name %q", truncate(k, 32))
		}
		for _, p := range reservedEnvPrefixes {
			if strings.HasPrefix(k, p) {
				return errs.InvalidArgument("spec.workload.env", "variable %s is reserved", k)
			}
		}
		if len(v) > MaxEnvValue || strings.ContainsRune(v, 0) {
			// The value is secret: name the key, never the value.
			return errs.InvalidArgument("spec.workload.env", "value of %s: at most %d bytes, no NUL", k, MaxEnvValue)
		}
		if seal.IsSealed(v) {
			// A value that looks sealed would be taken for one at rest.
			return errs.InvalidArgument("spec.workload.env", "value of %s may not start with %q", k, seal.Prefix)
		}
		total += len(k) + len(v)
	}
	if total > MaxEnvTotal {
		return errs.InvalidArgument("spec.workload.env", "at most %d bytes in all", MaxEnvTotal)
	}
	if len(w.GetEgressAllow()) > MaxEgressAllow {
		return errs.InvalidArgument("spec.workload.egress_allow", "at most %d prefixes", MaxEgressAllow)
	}
	for i, c := range w.GetEgressAllow() {
		p, err := netip.ParsePrefix(c)
		if err != nil || p != p.Masked() {
			return errs.InvalidArgument("spec.workload.egress_allow", "entry %d: %q is not a canonical CIDR prefix", i, truncate(c, 64))
		}
		if m, ok := egress.CoversMetadata(p); ok {
			return errs.InvalidArgument("spec.workload.egress_allow", "entry %d: %s covers the cloud metadata endpoint %s, which is never allowed", i, p, m)
		}
	}
	r := w.GetResources()
	switch {
	case r.GetMemoryBytes() < 0 || r.GetMemoryBytes() > MaxMemoryBytes:
		return errs.InvalidArgument("spec.workload.resources.memory_bytes", "must be 0-%d", int64(MaxMemoryBytes))
	case r.GetMemoryBytes() != 0 && r.GetMemoryBytes() < 4<<20:
		return errs.InvalidArgument("spec.workload.resources.memory_bytes", "must be at least 4 MiB")
	case r.GetCpuMillis() < 0 || r.GetCpuMillis() > MaxCPUMillis:
		return errs.InvalidArgument("spec.workload.resources.cpu_millis", "must be 0-%d", MaxCPUMillis)
	case r.GetPids() < 0 || r.GetPids() > MaxPids:
		return errs.InvalidArgument("spec.workload.resources.pids", "must be 0-%d", MaxPids)
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
