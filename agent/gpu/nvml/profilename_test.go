package nvml

import (
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// TestProfileName_MatchesPublishedNames derives every profile name of
// every model pkg/mig knows from the sizes the driver reports (profile
// memory and whole-GPU memory) and compares it with the name NVIDIA
// publishes, which pkg/mig records.
func TestProfileName_MatchesPublishedNames(t *testing.T) {
	for _, m := range mig.Models() {
		for _, p := range m.Profiles {
			suffix := ""
			if p.MediaExtensions {
				suffix = suffixMediaExtensions
			}
			if got := profileName(p.Slices, p.MemoryMiB, m.MemoryMiB*mib, suffix); got != p.Name {
				t.Errorf("%s profile %d (%d slices, %d MiB): derived %q, published %q", m.ShortName, p.ID, p.Slices, p.MemoryMiB, got, p.Name)
			}
		}
	}
}

func TestProfileName(t *testing.T) {
	const h200 = 143771 * mib
	tests := []struct {
		slices   int
		memMiB   uint64
		devBytes uint64
		suffix   string
		want     string
	}{
		{1, 16384, h200, "", "1g.18gb"},
		{1, 16384, h200, suffixMediaExtensions, "1g.18gb+me"},
		{2, 33024, h200, "", "2g.35gb"},
		{3, 71168, h200, "", "3g.71gb"},
		{7, 143104, h200, "", "7g.141gb"},
		{1, 9728, 81920 * mib, suffixNoMediaExtensions, "1g.10gb-me"},
		{1, 22528, 183359 * mib, suffixAllMediaExtensions, "1g.23gb+me.all"},
		{2, 2048, 0, suffixGraphics, "2g.2gb+gfx"}, // whole-GPU memory unknown: plain GB
	}
	for _, tt := range tests {
		if got := profileName(tt.slices, tt.memMiB, tt.devBytes, tt.suffix); got != tt.want {
			t.Errorf("profileName(%d, %d MiB, %d B, %q) = %q, want %q", tt.slices, tt.memMiB, tt.devBytes, tt.suffix, got, tt.want)
		}
	}
}
