// Package footprint measures what a running gpuaas daemon costs its host:
// resident memory and CPU time, read from /proc while a test drives the
// daemon (issue 9: the agent's footprint with 8 simulated H200s fully
// partitioned, idle and under a 1 s Prometheus scrape).
//
// It only measures and reports. Timed figures on a shared machine are
// noise-prone, so the test records them against their targets and never
// fails on one; it fails only when the daemon stops or its endpoint errs.
package footprint

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DefaultClockTicks is USER_HZ, the unit of /proc/PID/stat's CPU times. The
// kernel reports them in USER_HZ whatever its own HZ, and USER_HZ is 100 on
// every architecture Go supports on Linux.
const DefaultClockTicks = 100

// ClockTicks returns the host's clock ticks per second (getconf CLK_TCK),
// or DefaultClockTicks when getconf cannot say.
func ClockTicks() int {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err != nil {
		return DefaultClockTicks
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil || n <= 0 {
		return DefaultClockTicks
	}
	return n
}

// Sample is one reading of a process's /proc files.
type Sample struct {
	Time time.Time
	// RSSKiB is VmRSS: resident memory now. HWMKiB is VmHWM, the peak
	// resident memory since the process started.
	RSSKiB, HWMKiB uint64
	// Threads is the process's thread count.
	Threads int
	// CPUTicks is utime + stime of the whole process (every thread), in
	// clock ticks. Reaped children are not counted.
	CPUTicks uint64
}

// ErrMalformed is the class of every error ParseStat and ParseStatus return
// for text that is not what the kernel writes.
var ErrMalformed = errors.New("malformed /proc file")

// ReadSample reads pid's /proc/PID/status and /proc/PID/stat.
func ReadSample(pid int) (Sample, error) {
	now := time.Now()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Sample{}, fmt.Errorf("read status of pid %d: %w", pid, err)
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Sample{}, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	s := Sample{Time: now}
	if s.RSSKiB, s.HWMKiB, s.Threads, err = ParseStatus(status); err != nil {
		return Sample{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	utime, stime, err := ParseStat(stat)
	if err != nil {
		return Sample{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	s.CPUTicks = utime + stime
	return s, nil
}

// ParseStat returns utime and stime (fields 14 and 15, in clock ticks) of a
// /proc/PID/stat line. The command name (field 2) is in parentheses and may
// itself hold spaces and parentheses, so the fields are counted from the
// last ')'.
func ParseStat(b []byte) (utime, stime uint64, err error) {
	end := bytes.LastIndexByte(b, ')')
	if end < 0 || bytes.IndexByte(b, '(') < 0 || bytes.IndexByte(b, '(') > end {
		return 0, 0, fmt.Errorf("%w: stat: no (comm)", ErrMalformed)
	}
	// After "(comm)": field 3 (state) is rest[0], so field N is rest[N-3].
	rest := strings.Fields(string(b[end+1:]))
	if len(rest) < 13 {
		return 0, 0, fmt.Errorf("%w: stat: %d fields after comm, want at least 13", ErrMalformed, len(rest))
	}
	if utime, err = strconv.ParseUint(rest[14-3], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%w: stat utime %q", ErrMalformed, rest[14-3])
	}
	if stime, err = strconv.ParseUint(rest[15-3], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%w: stat stime %q", ErrMalformed, rest[15-3])
	}
	return utime, stime, nil
}

// ParseStatus returns VmRSS and VmHWM (KiB) and Threads from a
// /proc/PID/status file. VmRSS is required; a kernel thread or a zombie has
// none.
func ParseStatus(b []byte) (rssKiB, hwmKiB uint64, threads int, err error) {
	var haveRSS bool
	for line := range strings.SplitSeq(string(b), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch key {
		case "VmRSS", "VmHWM":
			f := strings.Fields(val)
			if len(f) != 2 || f[1] != "kB" {
				return 0, 0, 0, fmt.Errorf("%w: status %s %q", ErrMalformed, key, strings.TrimSpace(val))
			}
			n, perr := strconv.ParseUint(f[0], 10, 64)
			if perr != nil {
				return 0, 0, 0, fmt.Errorf("%w: status %s %q", ErrMalformed, key, f[0])
			}
			if key == "VmRSS" {
				rssKiB, haveRSS = n, true
			} else {
				hwmKiB = n
			}
		case "Threads":
			n, perr := strconv.Atoi(strings.TrimSpace(val))
			if perr != nil || n < 0 {
				return 0, 0, 0, fmt.Errorf("%w: status Threads %q", ErrMalformed, strings.TrimSpace(val))
			}
			threads = n
		}
	}
	if !haveRSS {
		return 0, 0, 0, fmt.Errorf("%w: status has no VmRSS", ErrMalformed)
	}
	return rssKiB, hwmKiB, threads, nil
}

// Summary is a phase's footprint.
type Summary struct {
	Samples int `json:"samples"`
	// Seconds is the wall time from the first sample to the last.
	Seconds float64 `json:"seconds"`
	// RSS over the samples, and the process's peak (VmHWM) at the last one.
	RSSMaxMiB  float64 `json:"rss_max_mib"`
	RSSMeanMiB float64 `json:"rss_mean_mib"`
	HWMMiB     float64 `json:"hwm_mib"`
	// CPUPercent is CPU time over wall time across the phase, in percent
	// of one core. CPUMaxWindowPercent is the same over the busiest
	// window of Window seconds (0 when the phase is shorter).
	CPUPercent          float64 `json:"cpu_pct_one_core"`
	CPUMaxWindowPercent float64 `json:"cpu_pct_max_window"`
	Window              float64 `json:"window_s"`
	ThreadsMax          int     `json:"threads_max"`
}

// Summarize sums up samples taken in time order. hz is the clock ticks per
// second; window the span of the busiest-window figure.
func Summarize(samples []Sample, hz int, window time.Duration) Summary {
	var s Summary
	s.Samples, s.Window = len(samples), window.Seconds()
	if len(samples) == 0 || hz <= 0 {
		return s
	}
	var sum float64
	for _, x := range samples {
		mib := float64(x.RSSKiB) / 1024
		sum += mib
		s.RSSMaxMiB = max(s.RSSMaxMiB, mib)
		s.ThreadsMax = max(s.ThreadsMax, x.Threads)
	}
	s.RSSMeanMiB = sum / float64(len(samples))
	first, last := samples[0], samples[len(samples)-1]
	s.HWMMiB = float64(last.HWMKiB) / 1024
	s.Seconds = last.Time.Sub(first.Time).Seconds()
	s.CPUPercent = cpuPercent(first, last, hz)
	// The busiest window: for each sample, the earliest later one at least
	// window after it.
	j := 0
	for i := range samples {
		for j < len(samples) && samples[j].Time.Sub(samples[i].Time) < window {
			j++
		}
		if j == len(samples) {
			break
		}
		s.CPUMaxWindowPercent = max(s.CPUMaxWindowPercent, cpuPercent(samples[i], samples[j], hz))
	}
	return s
}

// cpuPercent is the CPU time between two samples over their wall time, in
// percent of one core.
func cpuPercent(a, b Sample, hz int) float64 {
	wall := b.Time.Sub(a.Time).Seconds()
	if wall <= 0 || b.CPUTicks < a.CPUTicks {
		return 0
	}
	return 100 * float64(b.CPUTicks-a.CPUTicks) / float64(hz) / wall
}

// ScrapeStats sums up a phase's scrapes of a Prometheus endpoint.
type ScrapeStats struct {
	Scrapes int `json:"scrapes"`
	// Bytes and Series are those of the last scrape (a series is one
	// sample line of the text format).
	Bytes  int `json:"bytes"`
	Series int `json:"series"`
	// Latency of one scrape, request to the body's end.
	LatencyMeanMs float64 `json:"latency_mean_ms"`
	LatencyMaxMs  float64 `json:"latency_max_ms"`
	LatencyP99Ms  float64 `json:"latency_p99_ms"`
}

// SummarizeScrapes sums up scrape latencies (one per scrape); bytes and
// series are the last scrape's.
func SummarizeScrapes(latencies []time.Duration, bytes, series int) ScrapeStats {
	st := ScrapeStats{Scrapes: len(latencies), Bytes: bytes, Series: series}
	if len(latencies) == 0 {
		return st
	}
	ls := slices.Clone(latencies)
	slices.Sort(ls)
	var sum time.Duration
	for _, l := range ls {
		sum += l
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	st.LatencyMeanMs = ms(sum / time.Duration(len(ls)))
	st.LatencyMaxMs = ms(ls[len(ls)-1])
	st.LatencyP99Ms = ms(ls[(len(ls)*99+99)/100-1])
	return st
}

// CountSeries counts the sample lines of a Prometheus text exposition and
// those whose metric name is name.
func CountSeries(body []byte, name string) (all, named int) {
	for line := range bytes.SplitSeq(body, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		all++
		n := line
		if i := bytes.IndexAny(line, "{ "); i >= 0 {
			n = line[:i]
		}
		if string(n) == name {
			named++
		}
	}
	return all, named
}
