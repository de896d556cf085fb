package nvml

import (
	"fmt"
	"math"
)

// mib is one MiB, the unit NVML reports memory sizes in (its "MB").
const mib = 1 << 20

// Profile name suffixes for the driver's profile variants.
const (
	suffixMediaExtensions    = "+me"     // one slice owning the media engines (1g+me)
	suffixAllMediaExtensions = "+me.all" // all media engines
	suffixNoMediaExtensions  = "-me"     // no media engines
	suffixGraphics           = "+gfx"    // graphics-capable
)

// profileName is the name nvidia-smi shows for a GPU instance profile
// without its "MIG " prefix, e.g. "1g.18gb" or "1g.10gb+me": the compute
// slices, then the memory in GB as NVIDIA's tools compute it (the
// instance's share of the GPU's memory rounded up to eighths, times the
// GPU's memory in whole GB rounded up, rounded to the nearest GB), then the
// variant's suffix. It is informational: profiles are keyed by id.
func profileName(slices int, memMiB, deviceMemBytes uint64, suffix string) string {
	return fmt.Sprintf("%dg.%dgb%s", slices, profileGB(memMiB, deviceMemBytes), suffix)
}

func profileGB(memMiB, deviceMemBytes uint64) uint64 {
	const (
		gib    = 1 << 30
		eighth = 8
	)
	if deviceMemBytes == 0 {
		return uint64(math.Round(float64(memMiB) / 1024))
	}
	share := float64(memMiB) * mib / float64(deviceMemBytes)
	share = math.Ceil(share*eighth) / eighth
	deviceGB := float64((deviceMemBytes + gib - 1) / gib)
	return uint64(math.Round(share * deviceGB))
}
