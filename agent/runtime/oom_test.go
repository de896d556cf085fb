package runtime

import (
	"syscall"
	"testing"
)

// TestOOMKillIsToldApartFromSIGKILL: a container that allocates past its
// memory limit is killed by the kernel's OOM killer, and Status says so
// (OOMKilled), read from its memory cgroup; a container killed with
// SIGKILL by someone else exits the same way (137) but is not OOMKilled.
// Status keeps saying it for a new runtime client (an agent restart),
// until the task is deleted.
func TestOOMKillIsToldApartFromSIGKILL(t *testing.T) {
	e := newEnv(t)

	hog := e.spec("sh", "-c", `x=$(head -c 200000000 /dev/zero | tr '\0' a); echo survived`)
	hog.Limits.MemoryBytes = 16 << 20
	e.create(hog)
	e.start(hog.ID)
	st := e.waitExit(hog.ID)
	if st.ExitCode != 128+uint32(syscall.SIGKILL) || !st.OOMKilled {
		t.Errorf("memory hog: exit %d, OOMKilled %t; want 137 and true", st.ExitCode, st.OOMKilled)
	}
	restarted, err := e.connect().Status(t.Context(), hog.ID)
	if err != nil || !restarted.OOMKilled {
		t.Errorf("after an agent restart: %+v, %v; want OOMKilled", restarted, err)
	}
	e.stop(hog.ID, 0)

	victim := e.spec("sleep", "600")
	victim.Limits.MemoryBytes = 16 << 20
	e.create(victim)
	e.start(victim.ID)
	c, err := e.raw.LoadContainer(e.ctx, victim.ID)
	if err != nil {
		t.Fatal(err)
	}
	task, err := c.Task(e.ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Kill(e.ctx, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = e.waitExit(victim.ID)
	if st.ExitCode != 128+uint32(syscall.SIGKILL) || st.OOMKilled {
		t.Errorf("killed with SIGKILL: exit %d, OOMKilled %t; want 137 and false", st.ExitCode, st.OOMKilled)
	}
	e.stop(victim.ID, 0)
}

func TestParseOOMKill(t *testing.T) {
	for _, tt := range []struct {
		in string
		n  uint64
		ok bool
	}{
		{"low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n", 1, true}, // cgroup v2 memory.events
		{"oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", 2, true},               // v1 memory.oom_control
		{"oom_kill_disable 0\nunder_oom 0\n", 0, false},                          // kernel before 4.13
		{"oom_kill x\n", 0, false},
		{"", 0, false},
	} {
		n, ok := parseOOMKill([]byte(tt.in))
		if n != tt.n || ok != tt.ok {
			t.Errorf("parseOOMKill(%q) = %d, %t; want %d, %t", tt.in, n, ok, tt.n, tt.ok)
		}
	}
}

func FuzzParseOOMKill(f *testing.F) {
	f.Add([]byte("oom 1\noom_kill 1\n"))
	f.Add([]byte("oom_kill_disable 0\nunder_oom 0\noom_kill 18446744073709551615\n"))
	f.Add([]byte("oom_kill  7"))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, ok := parseOOMKill(b)
		if !ok && n != 0 {
			t.Fatalf("not ok but n = %d", n)
		}
	})
}
