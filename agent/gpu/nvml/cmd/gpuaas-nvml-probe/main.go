// Command gpuaas-nvml-probe prints, as JSON, what the NVML backend reads on
// this host: driver version, GPUs, MIG mode, GPU instance profiles (the
// derived name beside the driver's own), possible placements, GPU and
// compute instances, MIG devices with their device nodes, and telemetry;
// optionally the XID/ECC events seen during a short watch. It only reads:
// it never changes MIG mode or creates or destroys anything, so it is safe
// on a production host.
//
// Exit status: 0 when every read succeeded, 1 when the driver could not be
// loaded, 3 when some read failed (the JSON says which, under "errors").
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/nvml"
	"github.com/gpuaas/gpuaas/pkg/mig"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
)

type report struct {
	Library       string         `json:"library"`
	DriverVersion string         `json:"driverVersion,omitempty"`
	Devices       []deviceReport `json:"devices"`
	Events        []gpu.Event    `json:"events,omitempty"`
	EventsDropped uint64         `json:"eventsDropped,omitempty"`
	Errors        []string       `json:"errors,omitempty"`
}

type deviceReport struct {
	Device       gpu.Device          `json:"device"`
	MIGMode      *gpu.MIGMode        `json:"migMode,omitempty"`
	Profiles     []profileReport     `json:"profiles,omitempty"`
	GPUInstances []gpuInstanceReport `json:"gpuInstances,omitempty"`
	MIGDevices   []gpu.MIGDevice     `json:"migDevices,omitempty"`
	Telemetry    *gpu.Telemetry      `json:"telemetry,omitempty"`
	MIGTelemetry []gpu.Telemetry     `json:"migTelemetry,omitempty"`
	Errors       []string            `json:"errors,omitempty"`
}

type profileReport struct {
	gpu.GPUInstanceProfile
	// DriverName is the driver's own name for the profile, to compare with
	// the derived Name.
	DriverName string          `json:"driverName,omitempty"`
	Placements []mig.Placement `json:"possiblePlacements"`
}

type gpuInstanceReport struct {
	gpu.GPUInstance
	ComputeInstances []gpu.ComputeInstance `json:"computeInstances"`
}

func main() {
	library := flag.String("library", nvml.DefaultLibrary, "NVML library to load (file name or path)")
	devRoot := flag.String("dev-root", nvml.DefaultDevRoot, "where the driver's device nodes are")
	procRoot := flag.String("proc-root", nvml.DefaultProcRoot, "where procfs is mounted")
	watch := flag.Duration("events", 0, "also watch XID/ECC events for this long (0: do not)")
	flag.Parse()

	log := sanitize.Logger(os.Stderr, slog.LevelInfo, false)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	b, err := nvml.New(nvml.Options{LibraryPath: *library, Logger: log, DevRoot: *devRoot, ProcRoot: *procRoot})
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-nvml-probe:", err)
		os.Exit(1)
	}
	r := probe(ctx, b, *library, *watch)
	if err := b.Close(); err != nil {
		r.Errors = append(r.Errors, err.Error())
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-nvml-probe: write report:", err)
		os.Exit(1)
	}
	if len(r.Errors) > 0 {
		os.Exit(3)
	}
	for _, d := range r.Devices {
		if len(d.Errors) > 0 {
			os.Exit(3)
		}
	}
}

func probe(ctx context.Context, b *nvml.Backend, library string, watch time.Duration) report {
	r := report{Library: library}
	fail := func(errs *[]string, err error) bool {
		if err != nil {
			*errs = append(*errs, err.Error())
		}
		return err != nil
	}
	var events <-chan gpu.Event
	if watch > 0 {
		wctx, cancel := context.WithTimeout(ctx, watch)
		defer cancel()
		var err error
		if events, err = b.Events(wctx); fail(&r.Errors, err) {
			events = nil
		}
	}
	v, err := b.DriverVersion(ctx)
	fail(&r.Errors, err)
	r.DriverVersion = v
	devs, err := b.Devices(ctx)
	if fail(&r.Errors, err) {
		return r
	}
	for _, d := range devs {
		r.Devices = append(r.Devices, probeDevice(ctx, b, d))
	}
	for ev := range events {
		r.Events = append(r.Events, ev)
	}
	r.EventsDropped = b.Dropped()
	return r
}

func probeDevice(ctx context.Context, b *nvml.Backend, d gpu.Device) deviceReport {
	dr := deviceReport{Device: d}
	fail := func(err error) bool {
		if err != nil {
			dr.Errors = append(dr.Errors, err.Error())
		}
		return err != nil
	}
	if tel, err := b.DeviceTelemetry(ctx, d.UUID); !fail(err) {
		dr.Telemetry = &tel
	}
	mode, err := b.MIGMode(ctx, d.UUID)
	if fail(err) {
		return dr
	}
	dr.MIGMode = &mode
	if !mode.Current {
		return dr
	}
	names, err := b.DriverProfileNames(ctx, d.UUID)
	if !errors.Is(err, gpu.ErrNotSupported) { // an older library: no names to compare
		fail(err)
	}
	profiles, err := b.GPUInstanceProfiles(ctx, d.UUID)
	fail(err)
	for _, p := range profiles {
		pls, err := b.PossiblePlacements(ctx, d.UUID, p.ID)
		fail(err)
		dr.Profiles = append(dr.Profiles, profileReport{GPUInstanceProfile: p, DriverName: names[p.ID], Placements: pls})
	}
	gis, err := b.GPUInstances(ctx, d.UUID)
	fail(err)
	for _, gi := range gis {
		cis, err := b.ComputeInstances(ctx, d.UUID, gi.ID)
		fail(err)
		dr.GPUInstances = append(dr.GPUInstances, gpuInstanceReport{GPUInstance: gi, ComputeInstances: cis})
	}
	mds, err := b.MIGDevices(ctx, d.UUID)
	fail(err)
	dr.MIGDevices = mds
	for _, md := range mds {
		if tel, err := b.MIGTelemetry(ctx, md.UUID); !fail(err) {
			dr.MIGTelemetry = append(dr.MIGTelemetry, tel)
		}
	}
	return dr
}
