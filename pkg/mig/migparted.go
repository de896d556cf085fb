package mig

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// This file reads NVIDIA mig-parted's configuration format, version v1, as
// its api/spec/v1 package defines it:
//
//	version: v1
//	mig-configs:
//	  all-balanced:                  # a named config
//	    - device-filter: ["0x233510DE", "0x233B10DE"]   # optional
//	      devices: all               # or a list of GPU indices: [0, 1]
//	      mig-enabled: true
//	      mig-devices:               # required when mig-enabled is true
//	        "1g.18gb": 2
//	        "2g.35gb": 1
//	        "3g.71gb": 1
//
// An entry applies to the GPUs that match both its device-filter (PCI
// device ids with the vendor in the low 16 bits, optionally
// ":<subsystem id>"; no filter matches every GPU) and its devices. mig-parted
// creates the instances without placements; Layout plans real placements
// with PlanLayout, so what mig-parted would leave to the driver is decided
// here, deterministically.
//
// The parser is stricter than mig-parted where mig-parted's leniency hides
// mistakes, and says where each mistake is: every error is a *ConfigError
// with the line.

// Error classes of the mig-parted reader.
var (
	// ErrInvalidConfig: the config is malformed or does not suit the host.
	// Every error ParseMigParted and Layout return is of this class.
	ErrInvalidConfig = errors.New("invalid mig-parted config")
	// ErrUnknownConfig: Layout was asked for a config name the file does
	// not define.
	ErrUnknownConfig = errors.New("unknown mig-parted config name")
)

// MigPartedVersion is the only version of the format this package reads.
const MigPartedVersion = "v1"

// maxConfigNodes bounds how many YAML nodes the reader visits, aliases
// expanded, so that a small file of nested aliases cannot make it work
// forever.
const maxConfigNodes = 1 << 16

// ConfigError is a mistake in a mig-parted config, with the line it is on.
// It is of class ErrInvalidConfig and of its cause's class (ErrUnknownConfig,
// ErrUnknownProfile, ErrUnknownModel, ErrNoCapacity), if any.
type ConfigError struct {
	// Line is the 1-based line of the offending node; 0 when the mistake is
	// not on one line (an empty file).
	Line int
	// Reason says what is wrong.
	Reason string
	// Err is the cause's class, or nil.
	Err error
}

// Error renders "mig-parted config line N: reason".
func (e *ConfigError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("mig-parted config line %d: %s", e.Line, e.Reason)
	}
	return "mig-parted config: " + e.Reason
}

// Unwrap makes the error of class ErrInvalidConfig and of Err's class.
func (e *ConfigError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrInvalidConfig}
	}
	return []error{ErrInvalidConfig, e.Err}
}

// MigPartedConfig is a parsed mig-parted config file.
type MigPartedConfig struct {
	// Version is always MigPartedVersion.
	Version string
	// Configs are the named configs in file order.
	Configs []MigPartedNamed
}

// MigPartedNamed is one named config: its entries in file order.
type MigPartedNamed struct {
	Name    string
	Line    int
	Entries []MigPartedEntry
}

// MigPartedEntry is one entry of a named config.
type MigPartedEntry struct {
	// Line is the entry's first line.
	Line int
	// AllDevices is "devices: all"; otherwise Devices lists GPU indices.
	AllDevices bool
	Devices    []DeviceIndex
	// DeviceFilter lists the PCI ids the entry is limited to; empty
	// matches every GPU.
	DeviceFilter []DeviceFilter
	MIGEnabled   bool
	// MIGDevices are the requested instances, in file order. Empty when
	// mig-enabled is false, or true with "mig-devices: {}".
	MIGDevices []ProfileCount
	// MIGDevicesLine is the line of the mig-devices key, 0 when absent.
	MIGDevicesLine int
}

// DeviceIndex is a GPU index of a devices list, with its line.
type DeviceIndex struct {
	Index int
	Line  int
}

// DeviceFilter is one device-filter id: the PCI device and vendor id as
// NVML reports pciDeviceId (0x233510DE), and optionally the subsystem's.
type DeviceFilter struct {
	ID           uint32
	SubsystemID  uint32
	HasSubsystem bool
	Line         int
}

// String renders the filter as mig-parted writes it.
func (f DeviceFilter) String() string {
	if f.HasSubsystem {
		return fmt.Sprintf("0x%08X:0x%08X", f.ID, f.SubsystemID)
	}
	return fmt.Sprintf("0x%08X", f.ID)
}

// ProfileCount is one "name: count" of mig-devices.
type ProfileCount struct {
	// Name as written, e.g. "1g.18gb" or "1g.18gb+me".
	Name  string
	Count int
	Line  int
}

// DeviceInfo is one GPU of the host Layout plans for.
type DeviceInfo struct {
	// Index is the GPU's index as NVML numbers it (devices: [0, 1] refer
	// to it).
	Index int
	// PCIDeviceID is NVML's pciDeviceId, device id in the upper 16 bits and
	// vendor in the lower (0x233510DE); a bare device id (0x2335) is taken
	// as NVIDIA's.
	PCIDeviceID uint32
	// SubsystemID is NVML's pciSubSystemId; 0 when unknown (a filter with a
	// subsystem then does not match).
	SubsystemID uint32
	// Model is the GPU's model (from ModelFromProfiles); nil looks it up in
	// the built-in table by PCIDeviceID.
	Model *Model
	// NoMIG marks a GPU without MIG support. As mig-parted does, an entry
	// for "devices: all" skips it; one that names its index and enables
	// MIG is an error.
	NoMIG bool
}

// combinedID is the device's id as device-filter writes it.
func (d DeviceInfo) combinedID() uint32 {
	if d.PCIDeviceID <= 0xFFFF {
		return d.PCIDeviceID<<16 | nvidiaVendorID
	}
	return d.PCIDeviceID
}

// DeviceLayout is what a named config asks of one GPU.
type DeviceLayout struct {
	// Index is the GPU's index.
	Index int
	// Line is the line of the entry that selected the GPU.
	Line       int
	MIGEnabled bool
	// Counts are the instances asked for, by profile id; empty when MIG is
	// disabled or no instances are asked for.
	Counts map[ProfileID]int
	// Instances are Counts packed into placements by PlanLayout.
	Instances []Instance
}

// ParseMigParted parses a mig-parted v1 config. It checks everything that
// does not depend on the host: the version, that every key is known and
// appears once, the types and ranges of every value, profile name syntax,
// and mig-parted's own rules (devices and mig-enabled are required;
// mig-devices is required when MIG is enabled and must be empty when it is
// not). Profiles are checked against GPU models by Layout. Errors are
// *ConfigError.
func ParseMigParted(data []byte) (*MigPartedConfig, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, yamlError(err)
	}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		return nil, &ConfigError{Reason: "empty config: want version and mig-configs"}
	}
	p := &partedParser{}
	root, err := p.node(doc.Content[0])
	if err != nil {
		return nil, err
	}
	cfg := &MigPartedConfig{}
	var configsNode *yaml.Node
	err = p.mapping(root, "the config", func(key string, k, v *yaml.Node) error {
		switch key {
		case "version":
			if v.Kind != yaml.ScalarNode || v.Value != MigPartedVersion {
				return &ConfigError{Line: v.Line, Reason: fmt.Sprintf("version %s, want %q", describe(v), MigPartedVersion)}
			}
			cfg.Version = v.Value
		case "mig-configs":
			configsNode = v
		default:
			return unknownKey(k, "version", "mig-configs")
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	switch {
	case cfg.Version == "":
		return nil, &ConfigError{Line: root.Line, Reason: fmt.Sprintf("missing version: want version: %s", MigPartedVersion)}
	case configsNode == nil:
		return nil, &ConfigError{Line: root.Line, Reason: "missing mig-configs"}
	}
	err = p.mapping(configsNode, "mig-configs", func(name string, k, v *yaml.Node) error {
		named := MigPartedNamed{Name: name, Line: k.Line}
		if v.Kind != yaml.SequenceNode || len(v.Content) == 0 {
			return &ConfigError{Line: v.Line, Reason: fmt.Sprintf("mig-config %q is %s, want a non-empty list of entries", name, describe(v))}
		}
		for _, item := range v.Content {
			e, err := p.entry(item)
			if err != nil {
				return err
			}
			named.Entries = append(named.Entries, e)
		}
		cfg.Configs = append(cfg.Configs, named)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(cfg.Configs) == 0 {
		return nil, &ConfigError{Line: configsNode.Line, Reason: "mig-configs is empty"}
	}
	return cfg, nil
}

// partedParser walks the YAML tree, counting the nodes it visits.
type partedParser struct {
	visited int
}

// node resolves aliases and counts the visit.
func (p *partedParser) node(n *yaml.Node) (*yaml.Node, error) {
	for depth := 0; n.Kind == yaml.AliasNode; depth++ {
		if n.Alias == nil || depth > 16 {
			return nil, &ConfigError{Line: n.Line, Reason: "unresolvable alias"}
		}
		n = n.Alias
	}
	p.visited++
	if p.visited > maxConfigNodes {
		return nil, &ConfigError{Line: n.Line, Reason: fmt.Sprintf("more than %d nodes (with aliases expanded)", maxConfigNodes)}
	}
	return n, nil
}

// mapping calls f for each key of a mapping node, in order, with the
// resolved value; it rejects anything but a mapping of scalar keys and
// duplicate keys.
func (p *partedParser) mapping(n *yaml.Node, what string, f func(key string, k, v *yaml.Node) error) error {
	n, err := p.node(n)
	if err != nil {
		return err
	}
	if n.Kind != yaml.MappingNode {
		return &ConfigError{Line: n.Line, Reason: fmt.Sprintf("%s is %s, want a mapping", what, describe(n))}
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, err := p.node(n.Content[i])
		if err != nil {
			return err
		}
		if k.Kind != yaml.ScalarNode {
			return &ConfigError{Line: k.Line, Reason: fmt.Sprintf("key in %s is %s, want a string", what, describe(k))}
		}
		if line, dup := seen[k.Value]; dup {
			return &ConfigError{Line: k.Line, Reason: fmt.Sprintf("%q in %s already defined at line %d", k.Value, what, line)}
		}
		seen[k.Value] = k.Line
		v, err := p.node(n.Content[i+1])
		if err != nil {
			return err
		}
		if err := f(k.Value, k, v); err != nil {
			return err
		}
	}
	return nil
}

// entry parses one entry of a named config.
func (p *partedParser) entry(n *yaml.Node) (MigPartedEntry, error) {
	n, err := p.node(n)
	if err != nil {
		return MigPartedEntry{}, err
	}
	e := MigPartedEntry{Line: n.Line}
	var hasDevices, hasEnabled, hasMIGDevices bool
	err = p.mapping(n, "the entry", func(key string, k, v *yaml.Node) error {
		switch key {
		case "devices":
			hasDevices = true
			return p.devices(v, &e)
		case "device-filter":
			return p.deviceFilter(v, &e)
		case "mig-enabled":
			hasEnabled = true
			if v.Kind != yaml.ScalarNode || v.Decode(&e.MIGEnabled) != nil {
				return &ConfigError{Line: v.Line, Reason: fmt.Sprintf("mig-enabled is %s, want true or false", describe(v))}
			}
		case "mig-devices":
			hasMIGDevices = true
			e.MIGDevicesLine = k.Line
			return p.migDevices(v, &e)
		default:
			return unknownKey(k, "devices", "device-filter", "mig-enabled", "mig-devices")
		}
		return nil
	})
	if err != nil {
		return MigPartedEntry{}, err
	}
	switch {
	case !hasDevices:
		return e, &ConfigError{Line: n.Line, Reason: "entry lacks devices (all, or a list of GPU indices)"}
	case !hasEnabled:
		return e, &ConfigError{Line: n.Line, Reason: "entry lacks mig-enabled"}
	case e.MIGEnabled && !hasMIGDevices:
		return e, &ConfigError{Line: n.Line, Reason: "mig-enabled is true but mig-devices is missing (write mig-devices: {} for none)"}
	case !e.MIGEnabled && len(e.MIGDevices) > 0:
		return e, &ConfigError{Line: e.MIGDevicesLine, Reason: "mig-devices listed while mig-enabled is false"}
	}
	return e, nil
}

func (p *partedParser) devices(v *yaml.Node, e *MigPartedEntry) error {
	switch v.Kind {
	case yaml.ScalarNode:
		if v.Value == "all" {
			e.AllDevices = true
			return nil
		}
	case yaml.SequenceNode:
		if len(v.Content) == 0 {
			return &ConfigError{Line: v.Line, Reason: "devices is an empty list: it selects no GPU"}
		}
		for _, item := range v.Content {
			item, err := p.node(item)
			if err != nil {
				return err
			}
			idx, ok := smallInt(item)
			if !ok {
				return &ConfigError{Line: item.Line, Reason: fmt.Sprintf("device index %s, want a number from 0 to 1023", describe(item))}
			}
			for _, d := range e.Devices {
				if d.Index == idx {
					return &ConfigError{Line: item.Line, Reason: fmt.Sprintf("device index %d listed twice (line %d)", idx, d.Line)}
				}
			}
			e.Devices = append(e.Devices, DeviceIndex{Index: idx, Line: item.Line})
		}
		return nil
	}
	return &ConfigError{Line: v.Line, Reason: fmt.Sprintf("devices is %s, want all or a list of GPU indices", describe(v))}
}

func (p *partedParser) deviceFilter(v *yaml.Node, e *MigPartedEntry) error {
	items := []*yaml.Node{v}
	if v.Kind == yaml.SequenceNode {
		if len(v.Content) == 0 {
			return &ConfigError{Line: v.Line, Reason: "device-filter is an empty list: leave it out to match every GPU"}
		}
		items = v.Content
	}
	for _, item := range items {
		item, err := p.node(item)
		if err != nil {
			return err
		}
		if item.Kind != yaml.ScalarNode {
			return &ConfigError{Line: item.Line, Reason: fmt.Sprintf("device-filter is %s, want a PCI id such as \"0x233510DE\" or a list of them", describe(item))}
		}
		f, reason := parseDeviceFilter(item.Value)
		if reason != "" {
			return &ConfigError{Line: item.Line, Reason: reason}
		}
		f.Line = item.Line
		e.DeviceFilter = append(e.DeviceFilter, f)
	}
	return nil
}

// parseDeviceFilter reads "0xDDDDVVVV" or "0xDDDDVVVV:0xSSSSVVVV" as
// mig-parted does (strconv base 0), and insists on a vendor id: a bare
// device id would silently match nothing in mig-parted.
func parseDeviceFilter(s string) (DeviceFilter, string) {
	main, sub, hasSub := strings.Cut(s, ":")
	id, err := strconv.ParseUint(main, 0, 32)
	if err != nil {
		return DeviceFilter{}, fmt.Sprintf("device-filter %q is not a PCI id such as \"0x233510DE\"", s)
	}
	if id <= 0xFFFF {
		return DeviceFilter{}, fmt.Sprintf("device-filter %q lacks the vendor id: write 0x%04X10DE for an NVIDIA device", s, id)
	}
	f := DeviceFilter{ID: uint32(id)}
	if hasSub {
		sid, err := strconv.ParseUint(sub, 0, 32)
		if err != nil {
			return DeviceFilter{}, fmt.Sprintf("device-filter %q: subsystem %q is not a PCI id", s, sub)
		}
		f.SubsystemID, f.HasSubsystem = uint32(sid), true
	}
	return f, ""
}

// profileNameSyntax is mig-parted's profile name grammar: an optional
// compute-instance part ("1c."), the GPU instance part ("3g.71gb") and
// optional attributes ("+me", "+me.all", "-me", "+gfx").
var profileNameSyntax = regexp.MustCompile(`^([0-9]{1,2}c\.)?[0-9]{1,2}g\.[0-9]{1,4}gb([+-][a-z][a-z0-9]*([.,][a-z][a-z0-9]*)*)?$`)

func (p *partedParser) migDevices(v *yaml.Node, e *MigPartedEntry) error {
	if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
		return &ConfigError{Line: v.Line, Reason: "mig-devices is empty: write mig-devices: {} for no instances"}
	}
	return p.mapping(v, "mig-devices", func(name string, k, c *yaml.Node) error {
		if !profileNameSyntax.MatchString(name) {
			return &ConfigError{Line: k.Line, Reason: fmt.Sprintf("%q is not a MIG profile name such as \"1g.18gb\" or \"1g.18gb+me\"", name), Err: ErrUnknownProfile}
		}
		n, ok := smallInt(c)
		if !ok {
			return &ConfigError{Line: c.Line, Reason: fmt.Sprintf("count of %q is %s, want a number from 0 to 1023", name, describe(c))}
		}
		e.MIGDevices = append(e.MIGDevices, ProfileCount{Name: name, Count: n, Line: k.Line})
		return nil
	})
}

// smallInt reads a scalar integer in [0, 1023].
func smallInt(n *yaml.Node) (int, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
		return 0, false
	}
	v, err := strconv.ParseInt(n.Value, 0, 64)
	if err != nil || v < 0 || v > 1023 {
		return 0, false
	}
	return int(v), true
}

// describe names a node's kind and value for an error message.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		if len(n.Content) == 0 {
			return "an empty list"
		}
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "empty"
		}
		v := n.Value
		if len(v) > 40 {
			v = v[:40] + "..."
		}
		return strconv.Quote(v)
	}
	return "not a value"
}

func unknownKey(k *yaml.Node, known ...string) error {
	return &ConfigError{Line: k.Line, Reason: fmt.Sprintf("unknown key %q, want one of %s", k.Value, strings.Join(known, ", "))}
}

// yamlError turns a YAML syntax error ("yaml: line 3: ...") into a
// ConfigError with that line.
func yamlError(err error) error {
	msg := err.Error()
	rest, ok := strings.CutPrefix(msg, "yaml: line ")
	if ok {
		num, reason, found := strings.Cut(rest, ": ")
		if n, convErr := strconv.Atoi(num); found && convErr == nil {
			return &ConfigError{Line: n, Reason: "yaml: " + reason}
		}
	}
	return &ConfigError{Reason: msg}
}

// Config finds a named config.
func (c *MigPartedConfig) Config(name string) (MigPartedNamed, bool) {
	for _, n := range c.Configs {
		if n.Name == name {
			return n, true
		}
	}
	return MigPartedNamed{}, false
}

// Names lists the config names in file order.
func (c *MigPartedConfig) Names() []string {
	out := make([]string, len(c.Configs))
	for i, n := range c.Configs {
		out[i] = n.Name
	}
	return out
}

// matches reports whether the entry selects the device.
func (e *MigPartedEntry) matches(d DeviceInfo) bool {
	if !e.AllDevices && !slices.ContainsFunc(e.Devices, func(x DeviceIndex) bool { return x.Index == d.Index }) {
		return false
	}
	if len(e.DeviceFilter) == 0 {
		return true
	}
	for _, f := range e.DeviceFilter {
		if f.ID == d.combinedID() && (!f.HasSubsystem || f.SubsystemID == d.SubsystemID) {
			return true
		}
	}
	return false
}

// Layout says what the named config asks of each of the host's GPUs: for
// every GPU some entry selects, in index order, whether MIG is enabled and
// which instances to create, packed into placements. GPUs no entry selects
// are left out (mig-parted leaves them as they are).
//
// It is an error (a *ConfigError naming the line) when the name is not
// defined (ErrUnknownConfig); the config selects no GPU of the host at all
// (its device filters match none); an entry lists a GPU index the host
// lacks, or its filter excludes every GPU it lists; two entries select the
// same GPU (mig-parted would apply both, the last winning); MIG is enabled
// on a GPU whose model is unknown (ErrUnknownModel) or that lacks MIG; a
// profile is not one of the GPU model's (ErrUnknownProfile); or the
// instances do not fit the GPU (ErrNoCapacity). An entry whose filter
// matches none of the host's GPUs is otherwise fine: shared configs carry
// one entry per GPU model.
func (c *MigPartedConfig) Layout(name string, devices []DeviceInfo) ([]DeviceLayout, error) {
	named, ok := c.Config(name)
	if !ok {
		return nil, &ConfigError{Reason: fmt.Sprintf("no mig-config %q; the file defines %s", name, strings.Join(c.Names(), ", ")), Err: ErrUnknownConfig}
	}
	devs := slices.Clone(devices)
	slices.SortFunc(devs, func(a, b DeviceInfo) int { return a.Index - b.Index })
	for i := 1; i < len(devs); i++ {
		if devs[i].Index == devs[i-1].Index {
			return nil, fmt.Errorf("layout %q: device index %d given twice: %w", name, devs[i].Index, ErrInvalidConfig)
		}
	}
	selectedBy := make([]int, len(devs)) // entry index + 1, 0 for none
	anyMatch := false
	for ei := range named.Entries {
		e := &named.Entries[ei]
		for _, di := range e.Devices {
			if !slices.ContainsFunc(devs, func(d DeviceInfo) bool { return d.Index == di.Index }) {
				return nil, &ConfigError{Line: di.Line, Reason: fmt.Sprintf("mig-config %q: device index %d: the host has %s", name, di.Index, describeIndices(devs))}
			}
		}
		matched := 0
		for i, d := range devs {
			if !e.matches(d) {
				continue
			}
			if prev := selectedBy[i]; prev != 0 {
				return nil, &ConfigError{Line: e.Line, Reason: fmt.Sprintf("mig-config %q: device %d is selected by this entry and by the entry at line %d", name, d.Index, named.Entries[prev-1].Line)}
			}
			selectedBy[i] = ei + 1
			matched++
		}
		if matched > 0 {
			anyMatch = true
		} else if !e.AllDevices {
			return nil, &ConfigError{Line: e.DeviceFilter[0].Line, Reason: fmt.Sprintf("mig-config %q: device-filter %s matches none of the devices the entry lists (%s)", name, describeFilters(e.DeviceFilter), describeDevices(devs))}
		}
	}
	if !anyMatch {
		var filters []DeviceFilter
		for _, e := range named.Entries {
			filters = append(filters, e.DeviceFilter...)
		}
		return nil, &ConfigError{Line: named.Line, Reason: fmt.Sprintf("mig-config %q selects no device of this host: device-filter %s matches none of %s", name, describeFilters(filters), describeDevices(devs))}
	}

	var out []DeviceLayout
	for i, d := range devs {
		if selectedBy[i] == 0 {
			continue
		}
		e := &named.Entries[selectedBy[i]-1]
		dl := DeviceLayout{Index: d.Index, Line: e.Line, MIGEnabled: e.MIGEnabled}
		if !e.MIGEnabled {
			out = append(out, dl)
			continue
		}
		if d.NoMIG {
			if e.AllDevices {
				continue
			}
			return nil, &ConfigError{Line: e.Line, Reason: fmt.Sprintf("mig-config %q enables MIG on device %d, which does not support MIG", name, d.Index)}
		}
		var m Model
		if d.Model != nil {
			m = *d.Model
		} else if m, ok = ModelByPCIDeviceID(d.combinedID()); !ok {
			return nil, &ConfigError{Line: e.Line, Reason: fmt.Sprintf("mig-config %q: device %d (pci 0x%08X) is not a known MIG model; pass its reported profiles", name, d.Index, d.combinedID()), Err: ErrUnknownModel}
		}
		dl.Counts = map[ProfileID]int{}
		for _, pc := range e.MIGDevices {
			if pc.Count == 0 {
				continue
			}
			norm := normalizeProfileName(pc.Name)
			if strings.Contains(norm, "c.") {
				return nil, &ConfigError{Line: pc.Line, Reason: fmt.Sprintf("mig-config %q: %q asks for a compute instance smaller than its GPU instance; only full-size compute instances are supported", name, pc.Name), Err: ErrUnknownProfile}
			}
			prof, ok := m.ProfileByName(norm)
			if !ok {
				return nil, &ConfigError{Line: pc.Line, Reason: fmt.Sprintf("mig-config %q: device %d (%s) has no profile %q; it has %s", name, d.Index, m.Name, pc.Name, profileNames(m)), Err: ErrUnknownProfile}
			}
			dl.Counts[prof.ID] += pc.Count
		}
		insts, err := m.PlanLayout(dl.Counts)
		if err != nil {
			cause := ErrNoCapacity
			if !errors.Is(err, ErrNoCapacity) {
				cause = ErrInvalidLayout
			}
			return nil, &ConfigError{Line: e.MIGDevicesLine, Reason: fmt.Sprintf("mig-config %q: device %d: %v", name, d.Index, err), Err: cause}
		}
		dl.Instances = insts
		out = append(out, dl)
	}
	return out, nil
}

// normalizeProfileName drops a compute-instance part equal to the GPU
// instance's ("3c.3g.71gb" is "3g.71gb"), as mig-parted prints it. A
// smaller compute instance ("1c.3g.71gb") is kept and matches no profile:
// this package creates full-size compute instances only.
func normalizeProfileName(name string) string {
	cPart, rest, ok := strings.Cut(name, ".")
	if !ok || !strings.HasSuffix(cPart, "c") {
		return name
	}
	gPart, _, _ := strings.Cut(rest, ".")
	if strings.TrimSuffix(cPart, "c") == strings.TrimSuffix(gPart, "g") {
		return rest
	}
	return name
}

func profileNames(m Model) string {
	names := make([]string, len(m.Profiles))
	for i, p := range m.Profiles {
		names[i] = p.Name
	}
	return strings.Join(names, ", ")
}

func describeFilters(fs []DeviceFilter) string {
	if len(fs) == 0 {
		return "(none)"
	}
	parts := make([]string, len(fs))
	for i, f := range fs {
		parts[i] = f.String()
	}
	return strings.Join(parts, ", ")
}

func describeDevices(devs []DeviceInfo) string {
	if len(devs) == 0 {
		return "no devices"
	}
	parts := make([]string, len(devs))
	for i, d := range devs {
		parts[i] = fmt.Sprintf("%d: 0x%08X", d.Index, d.combinedID())
	}
	return strings.Join(parts, ", ")
}

func describeIndices(devs []DeviceInfo) string {
	if len(devs) == 0 {
		return "no devices"
	}
	parts := make([]string, len(devs))
	for i, d := range devs {
		parts[i] = strconv.Itoa(d.Index)
	}
	return "devices " + strings.Join(parts, ", ")
}
