package sim

// The state file: what the simulated driver remembers across agent
// restarts. One JSON document, replaced atomically (temp file, fsync,
// rename, fsync of the directory) on every change:
//
//	{
//	  "version": 1,
//	  "gpus": [{
//	    "uuid": "GPU-...",          // a configured GPU, at most once
//	    "migCurrent": true,
//	    "migPending": true,
//	    "gpuInstances": [{          // by id; requires migCurrent
//	      "id": 13,                 // derived from the placement
//	      "profile": 19,
//	      "start": 6, "size": 1,    // a valid layout per pkg/mig
//	      "computeInstances": [{"id": 0, "processes": [4242]}]
//	    }],
//	    "ecc": {                    // injected ECC history; omitted while zero
//	      "corrected": 3,           // volatile counters (since "driver load")
//	      "uncorrected": 1,
//	      "remappedCorrectable": 0, // rows recorded for remapping (InfoROM)
//	      "remappedUncorrectable": 1,
//	      "remapPending": true,     // activated by the next GPU reset
//	      "remapFailed": false
//	    }
//	  }]
//	}
//
// A configured GPU the file does not mention starts from its GPUConfig.
// Any other deviation (unknown fields, another version, a GPU not
// configured, a broken MIG rule) makes New fail with an error naming the
// file; nothing is repaired silently.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

const stateVersion = 1

// errNoState: the state file does not exist yet.
var errNoState = errors.New("no state file")

type stateFile struct {
	Version int         `json:"version"`
	GPUs    []gpuRecord `json:"gpus"`
}

type gpuRecord struct {
	UUID         string     `json:"uuid"`
	MIGCurrent   bool       `json:"migCurrent"`
	MIGPending   bool       `json:"migPending"`
	GPUInstances []giRecord `json:"gpuInstances,omitempty"`
	ECC          eccRecord  `json:"ecc,omitzero"`
}

// eccRecord is what injected ECC errors left behind: the volatile counters
// and the row remapper's InfoROM state, as NVML reports them.
type eccRecord struct {
	Corrected             uint64 `json:"corrected,omitempty"`
	Uncorrected           uint64 `json:"uncorrected,omitempty"`
	RemappedCorrectable   uint32 `json:"remappedCorrectable,omitempty"`
	RemappedUncorrectable uint32 `json:"remappedUncorrectable,omitempty"`
	RemapPending          bool   `json:"remapPending,omitempty"`
	RemapFailed           bool   `json:"remapFailed,omitempty"`
}

type giRecord struct {
	ID               int           `json:"id"`
	Profile          mig.ProfileID `json:"profile"`
	Start            int           `json:"start"`
	Size             int           `json:"size"`
	ComputeInstances []ciRecord    `json:"computeInstances,omitempty"`
}

type ciRecord struct {
	ID        int   `json:"id"`
	Processes []int `json:"processes,omitempty"`
}

func (gi giRecord) placement() mig.Placement { return mig.Placement{Start: gi.Start, Size: gi.Size} }

// clone deep-copies the record so an update can be abandoned.
func (r gpuRecord) clone() gpuRecord {
	gis := make([]giRecord, len(r.GPUInstances))
	for i, gi := range r.GPUInstances {
		cis := make([]ciRecord, len(gi.ComputeInstances))
		for j, ci := range gi.ComputeInstances {
			ci.Processes = slices.Clone(ci.Processes)
			cis[j] = ci
		}
		gi.ComputeInstances = cis
		gis[i] = gi
	}
	r.GPUInstances = gis
	return r
}

// maxStateSize bounds what loadState reads: a full 32-GPU host is a few
// hundred KiB even with many attached processes.
const maxStateSize = 16 << 20

// loadState reads and validates the state file; errNoState when it does not
// exist.
func loadState(path string, models map[string]mig.Model) (stateFile, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return stateFile{}, errNoState
	}
	if err != nil {
		return stateFile{}, fmt.Errorf("load state: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxStateSize+1))
	if err != nil {
		return stateFile{}, fmt.Errorf("load state %s: %w", path, err)
	}
	if len(data) > maxStateSize {
		return stateFile{}, fmt.Errorf("load state %s: larger than %d bytes", path, maxStateSize)
	}
	st, err := decodeState(data, models)
	if err != nil {
		return stateFile{}, fmt.Errorf("load state %s: %w", path, err)
	}
	return st, nil
}

// decodeState parses a state file and checks it describes the configured
// GPUs (models, by UUID) and obeys every rule the simulator enforces.
func decodeState(data []byte, models map[string]mig.Model) (stateFile, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var st stateFile
	if err := dec.Decode(&st); err != nil {
		return stateFile{}, fmt.Errorf("corrupt state file: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return stateFile{}, errors.New("corrupt state file: data after the document")
	}
	if st.Version != stateVersion {
		return stateFile{}, fmt.Errorf("state file version %d, want %d", st.Version, stateVersion)
	}
	seen := map[string]bool{}
	for i, g := range st.GPUs {
		m, ok := models[g.UUID]
		if !ok {
			return stateFile{}, fmt.Errorf("state file gpu %d: %q is not a configured gpu (was the configuration changed?)", i, g.UUID)
		}
		if seen[g.UUID] {
			return stateFile{}, fmt.Errorf("state file lists gpu %s twice", g.UUID)
		}
		seen[g.UUID] = true
		if err := validateGPU(g, m); err != nil {
			return stateFile{}, fmt.Errorf("state file gpu %s: %w", g.UUID, err)
		}
	}
	return st, nil
}

// validateGPU checks one GPU's record against the MIG rules and the
// simulator's own invariants.
func validateGPU(g gpuRecord, m mig.Model) error {
	if e := g.ECC; uint64(e.RemappedCorrectable)+uint64(e.RemappedUncorrectable) > maxRemappedRows {
		return fmt.Errorf("%d remapped rows, at most %d", uint64(e.RemappedCorrectable)+uint64(e.RemappedUncorrectable), maxRemappedRows)
	}
	if len(g.GPUInstances) > 0 && !g.MIGCurrent {
		return fmt.Errorf("%d gpu instances with mig mode not current", len(g.GPUInstances))
	}
	var layout []mig.Instance
	for i, gi := range g.GPUInstances {
		if err := m.Check(layout, gi.Profile, gi.placement()); err != nil {
			return fmt.Errorf("gpu instance %d: %w", gi.ID, err)
		}
		layout = append(layout, mig.Instance{Profile: gi.Profile, Placement: gi.placement()})
		if id, _ := gpuInstanceID(gi.placement()); id != gi.ID {
			return fmt.Errorf("gpu instance %d at %s: id should be %d", gi.ID, gi.placement(), id)
		}
		if i > 0 && g.GPUInstances[i-1].ID >= gi.ID {
			return fmt.Errorf("gpu instances not in ascending id order at %d", gi.ID)
		}
		if len(gi.ComputeInstances) > 1 {
			return fmt.Errorf("gpu instance %d: %d compute instances, at most 1", gi.ID, len(gi.ComputeInstances))
		}
		for _, ci := range gi.ComputeInstances {
			if ci.ID != 0 {
				return fmt.Errorf("gpu instance %d: compute instance id %d, want 0", gi.ID, ci.ID)
			}
			for j, pid := range ci.Processes {
				if pid < 1 {
					return fmt.Errorf("gpu instance %d: invalid pid %d", gi.ID, pid)
				}
				if j > 0 && ci.Processes[j-1] >= pid {
					return fmt.Errorf("gpu instance %d: pids not ascending and unique at %d", gi.ID, pid)
				}
			}
		}
	}
	return nil
}

// saveState writes the state file atomically.
func saveState(path string, st stateFile) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err := writeFileAtomic(path, append(data, '\n')); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	return nil
}

// writeFileAtomic replaces path with data so that a crash at any point
// leaves either the old file or the new one, never a mix: write a temp file
// in the same directory, fsync it, rename it over path, fsync the directory.
func writeFileAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
