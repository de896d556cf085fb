package footprint

import (
	"errors"
	"math"
	"os"
	"testing"
	"time"
)

// A real /proc/PID/stat line (kernel 6.x) whose command name holds spaces
// and a parenthesis, as a process may choose.
const statLine = "4242 (gpuaas) (x y) S 1 4242 4242 0 -1 4194560 1234 0 5 0 321 123 7 9 20 0 14 0 555 1300000000 6000 18446744073709551615 1 1 0 0 0 0 0 0 2143420159 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"

const statusText = `Name:	gpuaas-agent
Umask:	0022
State:	S (sleeping)
Tgid:	4242
Pid:	4242
VmPeak:	 1300000 kB
VmHWM:	   30720 kB
VmRSS:	   25600 kB
RssAnon:	   12000 kB
Threads:	14
voluntary_ctxt_switches:	100
`

func TestParseStatCountsFieldsFromTheLastParenthesis(t *testing.T) {
	u, s, err := ParseStat([]byte(statLine))
	if err != nil || u != 321 || s != 123 {
		t.Fatalf("ParseStat = %d, %d, %v; want 321, 123", u, s, err)
	}
}

func TestParseStatRejectsWhatTheKernelDoesNotWrite(t *testing.T) {
	for name, in := range map[string]string{
		"empty":          "",
		"no comm":        "4242 S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
		"truncated":      "4242 (a) S 1 4242 4242 0 -1 4194560 1234 0 5 0 321",
		"utime not num":  "4242 (a) S 1 4242 4242 0 -1 4194560 1234 0 5 0 x 123 7",
		"stime negative": "4242 (a) S 1 4242 4242 0 -1 4194560 1234 0 5 0 321 -1 7",
		"paren reversed": ") 4242 ( S 1 4242 4242 0 -1 4194560 1234 0 5 0 321 1 7",
	} {
		t.Run(name, func(t *testing.T) {
			if _, _, err := ParseStat([]byte(in)); !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseStat(%q) error = %v, want ErrMalformed", in, err)
			}
		})
	}
}

func TestParseStatusReadsRSSPeakAndThreads(t *testing.T) {
	rss, hwm, threads, err := ParseStatus([]byte(statusText))
	if err != nil || rss != 25600 || hwm != 30720 || threads != 14 {
		t.Fatalf("ParseStatus = %d, %d, %d, %v; want 25600, 30720, 14", rss, hwm, threads, err)
	}
}

func TestParseStatusRejectsAProcessWithoutMemory(t *testing.T) {
	// A zombie's or a kernel thread's status has no VmRSS.
	zombie := "Name:	gpuaas-agent\nState:	Z (zombie)\nThreads:	1\n"
	if _, _, _, err := ParseStatus([]byte(zombie)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("zombie status: %v, want ErrMalformed", err)
	}
	for _, in := range []string{"VmRSS:	12 MB\n", "VmRSS:	x kB\n", "VmRSS:	1 kB\nThreads:	-2\n"} {
		if _, _, _, err := ParseStatus([]byte(in)); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseStatus(%q): %v, want ErrMalformed", in, err)
		}
	}
}

func TestReadSampleReadsThisProcess(t *testing.T) {
	s, err := ReadSample(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.RSSKiB == 0 || s.HWMKiB < s.RSSKiB || s.Threads < 1 {
		t.Fatalf("sample of this process: %+v", s)
	}
	if _, err := ReadSample(-1); err == nil {
		t.Fatal("ReadSample(-1) succeeded")
	}
}

func TestClockTicksIsPositive(t *testing.T) {
	if hz := ClockTicks(); hz <= 0 {
		t.Fatalf("ClockTicks() = %d", hz)
	}
}

func TestSummarizeReportsRSSAndCPUOverThePhase(t *testing.T) {
	t0 := time.Unix(1000, 0)
	// 21 s at 100 Hz: 2 ticks a second except 10 extra ticks in one
	// second (12 ticks = 12% of a core there).
	var samples []Sample
	var ticks uint64
	for i := range 22 {
		if i > 0 {
			ticks += 2
			if i == 15 {
				ticks += 10
			}
		}
		samples = append(samples, Sample{Time: t0.Add(time.Duration(i) * time.Second), RSSKiB: uint64(20480 + 1024*(i%3)), HWMKiB: 24576, Threads: 10 + i%2, CPUTicks: ticks})
	}
	s := Summarize(samples, 100, 10*time.Second)
	if s.Samples != 22 || s.Seconds != 21 || s.RSSMaxMiB != 22 || s.HWMMiB != 24 || s.ThreadsMax != 11 {
		t.Fatalf("summary: %+v", s)
	}
	if want := 100 * 52.0 / 100 / 21; math.Abs(s.CPUPercent-want) > 1e-9 {
		t.Fatalf("cpu %% = %v, want %v", s.CPUPercent, want)
	}
	// The busiest 10 s window holds the burst: 20 + 10 ticks in 10 s.
	if math.Abs(s.CPUMaxWindowPercent-3) > 1e-9 {
		t.Fatalf("busiest window cpu %% = %v, want 3", s.CPUMaxWindowPercent)
	}
	if mean := (20.0*8 + 21*7 + 22*7) / 22; math.Abs(s.RSSMeanMiB-mean) > 1e-9 {
		t.Fatalf("rss mean = %v, want %v", s.RSSMeanMiB, mean)
	}
}

func TestSummarizeOfNothingIsZero(t *testing.T) {
	if s := Summarize(nil, 100, time.Second); s.Samples != 0 || s.CPUPercent != 0 || s.RSSMaxMiB != 0 {
		t.Fatalf("empty summary: %+v", s)
	}
	// A phase shorter than the window has no busiest-window figure.
	one := []Sample{{Time: time.Unix(0, 0), RSSKiB: 1024}, {Time: time.Unix(2, 0), RSSKiB: 1024, CPUTicks: 100}}
	if s := Summarize(one, 100, 10*time.Second); s.CPUMaxWindowPercent != 0 || s.CPUPercent != 50 {
		t.Fatalf("short phase: %+v", s)
	}
}

func TestSummarizeScrapesTakesPercentiles(t *testing.T) {
	var ls []time.Duration
	for i := 1; i <= 100; i++ {
		ls = append(ls, time.Duration(i)*time.Millisecond)
	}
	st := SummarizeScrapes(ls, 4096, 70)
	if st.Scrapes != 100 || st.LatencyMaxMs != 100 || st.LatencyP99Ms != 99 || st.LatencyMeanMs != 50.5 || st.Bytes != 4096 || st.Series != 70 {
		t.Fatalf("scrape stats: %+v", st)
	}
	if st := SummarizeScrapes(nil, 0, 0); st.Scrapes != 0 || st.LatencyMaxMs != 0 {
		t.Fatalf("no scrapes: %+v", st)
	}
}

func TestCountSeriesCountsSampleLinesAndOneName(t *testing.T) {
	body := []byte(`# HELP gpuaas_agent_gpu_healthy 1 when healthy.
# TYPE gpuaas_agent_gpu_healthy gauge
gpuaas_agent_gpu_healthy{gpu="GPU-1"} 1
gpuaas_agent_gpu_healthy{gpu="GPU-2"} 0
gpuaas_agent_gpu_healthy_extra 1
go_goroutines 42

`)
	all, named := CountSeries(body, "gpuaas_agent_gpu_healthy")
	if all != 4 || named != 2 {
		t.Fatalf("CountSeries = %d, %d; want 4, 2", all, named)
	}
}

// FuzzParseStat: any input gives either utime and stime or ErrMalformed,
// never a panic.
func FuzzParseStat(f *testing.F) {
	f.Add([]byte(statLine))
	f.Add([]byte("1 (a) R"))
	f.Add([]byte("1 ()) ) ) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, _, err := ParseStat(b); err != nil && !errors.Is(err, ErrMalformed) {
			t.Fatalf("error of another class: %v", err)
		}
	})
}

// FuzzParseStatus: any input gives either figures or ErrMalformed, never a
// panic or a negative thread count.
func FuzzParseStatus(f *testing.F) {
	f.Add([]byte(statusText))
	f.Add([]byte("VmRSS:\n"))
	f.Add([]byte("VmRSS: 1 kB\nThreads: 99999999999999999999\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _, threads, err := ParseStatus(b)
		if err != nil && !errors.Is(err, ErrMalformed) {
			t.Fatalf("error of another class: %v", err)
		}
		if threads < 0 {
			t.Fatalf("threads %d", threads)
		}
	})
}
