package ccexecutor

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// requireCgroup2 skips t unless runs can be contained here: a cgroup v2 hierarchy is mounted
// (statfs says CGROUP2_SUPER_MAGIC) and this process may create cgroups under its own. It
// returns the parent directory runs' cgroups are made in.
func requireCgroup2(t *testing.T) string {
	t.Helper()
	cg, why := openCgroups(CgroupAuto)
	if cg == nil {
		t.Skipf("cgroup v2 containment is not available here (%s); run as root where cgroup2 is mounted and writable", why)
	}
	return cg.dir
}

// cgroupDir is the directory of the cgroup v2 that process pid is in.
func cgroupDir(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatalf("cgroup of %d: %v", pid, err)
	}
	mount, root, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			return filepath.Join(mount, strings.TrimPrefix(p, root))
		}
	}
	t.Fatalf("process %d is in no cgroup v2: %q", pid, b)
	return ""
}

// sessionOf returns the state and the session of process pid.
func sessionOf(pid int) (state byte, sid int, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	sid, _ = strconv.Atoi(f[3])
	return f[0][0], sid, true
}

// inSession lists the processes of session sid, zombies included; none for a sid of 0, the
// session of kernel threads, which a test gets for a process that was gone when it looked.
func inSession(sid int) map[int]byte {
	procs := map[int]byte{}
	if sid <= 0 {
		return procs
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			if st, s, ok := sessionOf(pid); ok && s == sid {
				procs[pid] = st
			}
		}
	}
	return procs
}

// reapSession waits until no process of session sid is left, reaping those that are this
// process's children: escapees are re-parented to the test binary, a subreaper, and this
// package does not reap them yet (the zombie half of issue 10 is someone else's). It fails
// the test if a live process is still there after 10 s.
func reapSession(t *testing.T, sid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := inSession(sid)
		for pid, st := range left {
			if st == 'Z' {
				syscall.Wait4(pid, nil, syscall.WNOHANG, nil) // ECHILD if it is not ours
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("session %d still has processes: %v", sid, left)
		}
		runtime.Gosched()
	}
}

// killSession sends SIGKILL to the process group of session sid's leader, where the escapees
// of a test live. A sid of 0 (a process that was already gone when its session was read) is
// never signalled: kill(0, sig) would kill this test binary's own group, and with it go test
// and the shell that started it.
func killSession(sid int) {
	if sid > 0 {
		syscall.Kill(-sid, syscall.SIGKILL)
	}
}

// assertDead checks that no process of session sid is alive; zombies are dead.
func assertDead(t *testing.T, sid int) {
	t.Helper()
	for pid, st := range inSession(sid) {
		if st != 'Z' {
			t.Errorf("escaped process %d (session %d) is still alive, state %c", pid, sid, st)
		}
	}
}

// TestContainment guards against escapes from a run: a process group is not a container, so a
// command that calls setsid (every daemon does) survived CANCEL, timeouts, disconnects and
// shutdown, and was not stopped by PAUSE. With containment each run is a cgroup, and every end
// of a run ends all of it, escapees included; with containment off the escapee survives, as it
// always did, and the test ends it itself.
func TestContainment(t *testing.T) {
	requireCgroup2(t)
	// Each command prints, as its first line, the PID of a process that left the run's
	// process group, and leaves it running; tail is what the leader does after that. The
	// leader waits for that line (through head), so that a natural end comes after it.
	commands := []struct {
		name, command string
	}{
		{"setsid -f sleep", `setsid -f sh -c 'echo $$; exec sleep 300 >/dev/null 2>&1' | head -n1`},
		{"double fork with setsid in the middle", `setsid sh -c 'sleep 300 >/dev/null 2>&1 & echo $!' | head -n1`},
		{"forks forever and ignores SIGTERM", `setsid -f sh -c 'trap "" TERM; echo $$; while :; do sleep 0.01; done' | head -n1`},
		{"escapee holds stdout", `setsid -f sh -c 'echo $$ >&2; exec sleep 300' 2>&1 | head -n1`},
	}
	ends := []struct {
		name   string
		params map[string]any
		cause  string // the error of process.completed, "" for none
		tail   string
		end    func(t *testing.T, ts *testServer, c *client)
	}{
		{"CANCEL", nil, "canceled", "; sleep 300", func(t *testing.T, ts *testServer, c *client) {
			c.call("control", map[string]any{"type": "CANCEL"})
		}},
		{"stream timeout", map[string]any{"timeout": 1}, "stream timeout after 1s", "; sleep 300", nil},
		// The leader waits until the test has looked at the escapee, which its end would kill.
		{"natural end", nil, "", `; until [ -e "$CC_TEST_RELEASE" ]; do sleep 0.01; done`, nil},
		{"client disconnect", nil, "", "; sleep 300", func(t *testing.T, ts *testServer, c *client) {
			c.close()
		}},
		{"Shutdown", nil, "server shutting down", "; sleep 300", func(t *testing.T, ts *testServer, c *client) {
			shut := make(chan error, 1)
			go func() { shut <- ts.Shutdown(t.Context()) }() // returns once every session is over
			done, before := c.until("process.completed")
			checkCompleted(t, ts, done, before, "server shutting down")
			if _, err := c.read(); err != io.EOF || c.closed.code != 1001 {
				t.Errorf("after shutdown: %v, close code %d; want close 1001", err, c.closed.code)
			}
			if err := <-shut; err != nil {
				t.Errorf("Shutdown: %v", err)
			}
		}},
	}
	for _, mode := range []string{CgroupAuto, CgroupOff} {
		for _, cmd := range commands {
			for _, end := range ends {
				t.Run(mode+"/"+cmd.name+"/"+end.name, func(t *testing.T) {
					t.Parallel()
					ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond, Cgroup: mode})
					contained := mode == CgroupAuto
					checkContainment(t, ts, contained)
					sessionEnds := end.name == "client disconnect" || end.name == "Shutdown"
					c := dial(t, ts.addr)
					c.connected()
					release := filepath.Join(t.TempDir(), "release")
					params := map[string]any{"env": map[string]string{"CC_TEST_RELEASE": release}}
					maps.Copy(params, end.params)
					_, first := c.start(cmd.command+end.tail, params)
					escapee, err := strconv.Atoi(strings.TrimSpace(first))
					if err != nil {
						t.Fatalf("first line %q: want the escapee's PID", first)
					}
					_, sid, ok := sessionOf(escapee)
					if !ok {
						t.Fatalf("escapee %d was gone before the test looked at it", escapee)
					}
					t.Cleanup(func() {
						if !t.Failed() {
							return
						}
						killSession(sid) // the escapees' group: not to leave them to TestMain
						reapSession(t, sid)
					})
					dir := cgroupDir(t, escapee)
					if contained != strings.HasPrefix(filepath.Base(dir), runPrefix) {
						t.Fatalf("escapee %d is in cgroup %s; want a run's cgroup: %v", escapee, dir, contained)
					}
					if err := os.WriteFile(release, nil, 0o644); err != nil {
						t.Fatal(err)
					}
					if end.end != nil {
						end.end(t, ts, c)
					}
					if !sessionEnds {
						done, before := c.until("process.completed")
						checkCompleted(t, ts, done, before, end.cause)
					} else if n := ts.sessions.len(); n != 0 {
						// The server closed the connection only after the session ended.
						t.Errorf("sessions = %d after the session ended, want 0", n)
					}
					if !contained {
						// The limit of process groups: the escapee is still running.
						if st, _, ok := sessionOf(escapee); !ok || st == 'Z' {
							t.Errorf("escapee %d ended without containment (state %c); the test no longer shows the limit", escapee, st)
						}
						killSession(sid)
						reapSession(t, sid)
						return
					}
					assertDead(t, sid)
					if _, err := os.Stat(dir); !os.IsNotExist(err) {
						t.Errorf("the run's cgroup %s is still there: %v", dir, err)
					}
					reapSession(t, sid)
					if !sessionEnds {
						c.assertWorks() // the session is free again, and no second process.completed came
					}
				})
			}
		}
	}

	// PAUSE freezes the whole cgroup, the escapee included, without a signal; RESUME thaws it.
	for _, mode := range []string{CgroupAuto, CgroupOff} {
		t.Run(mode+"/PAUSE and RESUME reach an escapee", func(t *testing.T) {
			t.Parallel()
			ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond, Cgroup: mode})
			contained := mode == CgroupAuto
			checkContainment(t, ts, contained)
			c := dial(t, ts.addr)
			c.connected()
			// The escapee prints its PID, then counts, writing each number to a file before it
			// prints it.
			counter := filepath.Join(t.TempDir(), "counter")
			_, first := c.start(`setsid -f sh -c 'echo $$; i=0; while :; do i=$((i+1)); echo $i > `+counter+`; echo $i; sleep 0.01; done'; sleep 300`, nil)
			escapee, err := strconv.Atoi(strings.TrimSpace(first))
			if err != nil {
				t.Fatalf("first line %q: want the escapee's PID", first)
			}
			_, sid, ok := sessionOf(escapee)
			if !ok {
				t.Fatalf("escapee %d was gone before the test looked at it", escapee)
			}
			defer reapSession(t, sid)
			defer killSession(sid) // no-op when containment ended it
			count := func() int {
				b, _ := os.ReadFile(counter)
				n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
				return n
			}
			// The escapee's cgroup says whether it is frozen; outside a run's cgroup it is not.
			frozen := func() bool {
				c := cgroup{dir: cgroupDir(t, escapee)}
				_, f, err := c.events()
				return err == nil && f
			}
			// The response to PAUSE comes once the kernel reports the cgroup frozen.
			if r := c.call("control", map[string]any{"type": "PAUSE"}); r.Error != nil {
				t.Fatalf("PAUSE: %s", r.raw)
			}
			if !contained {
				// Today's limit: the escapee goes on counting while the run is paused.
				at := count()
				for deadline := time.Now().Add(10 * time.Second); count() <= at; runtime.Gosched() {
					if time.Now().After(deadline) {
						t.Fatalf("the escapee stopped counting at %d without containment", at)
					}
				}
				c.call("control", map[string]any{"type": "CANCEL"})
				c.until("process.completed")
				return
			}
			if !frozen() {
				t.Fatalf("after PAUSE the escapee %d is not frozen", escapee)
			}
			if st, _, _ := sessionOf(escapee); st == 'T' {
				t.Errorf("the escapee was stopped by a signal (state T); a freeze sends none")
			}
			// Nothing runs while frozen: the counter stands still while a process that is not
			// frozen sleeps five times as long as the escapee does between two numbers.
			at := count()
			if err := runOwn(exec.Command("sh", "-c", "for i in 1 2 3 4 5; do sleep 0.01; done")); err != nil {
				t.Fatal(err)
			}
			if now := count(); now != at {
				t.Errorf("the escapee counted from %d to %d while paused", at, now)
			}
			for len(c.backlog) > 0 {
				if m := c.next(); m.Method == "process.output" {
					if n, _ := strconv.Atoi(strings.TrimSpace(m.Params.Data)); n > at {
						t.Errorf("printed %d while paused at %d", n, at)
					}
				}
			}
			if r := c.call("control", map[string]any{"type": "RESUME"}); r.Error != nil {
				t.Fatalf("RESUME: %s", r.raw)
			}
			// RESUME lets it go on: a number beyond at comes.
			for {
				m := c.next()
				if n, _ := strconv.Atoi(strings.TrimSpace(m.Params.Data)); m.Method == "process.output" && n > at {
					break
				}
			}
			if frozen() {
				t.Errorf("after RESUME the escapee is still frozen")
			}
			c.call("control", map[string]any{"type": "CANCEL"})
			done, _ := c.until("process.completed")
			if done.Params.Error == nil || *done.Params.Error != "canceled" {
				t.Errorf("process.completed = %s", done.raw)
			}
			assertDead(t, sid)
		})
	}
}

// checkContainment checks that ts contains runs in cgroups if contained, and says so.
func checkContainment(t *testing.T, ts *testServer, contained bool) {
	t.Helper()
	want := map[bool]string{true: "cgroup", false: "process-group"}[contained]
	if got, err := ts.Containment(); got != want || err != nil {
		t.Fatalf("Containment() = %q, %v; want %q", got, err, want)
	}
	resp, err := http.Get(ts.hs.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var h struct{ Containment string }
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil || h.Containment != want {
		t.Errorf("/health containment = %q, %v; want %q", h.Containment, err, want)
	}
}

// checkCompleted checks a run's process.completed and what came before it: the cause of its
// end, and, with containment, no complaint that output was left open.
func checkCompleted(t *testing.T, ts *testServer, done msg, before []msg, cause string) {
	t.Helper()
	p := done.Params
	switch {
	case cause == "" && (p.Status != "completed" || p.Error != nil || p.ExitCode == nil || *p.ExitCode != 0):
		t.Errorf("process.completed = %s, want completed with exit code 0", done.raw)
	case cause != "" && (p.Status != "failed" || p.Error == nil || *p.Error != cause):
		t.Errorf("process.completed = %s, want error %q", done.raw, cause)
	}
	if ts.containment != "cgroup" {
		return
	}
	for _, m := range before {
		if m.Method == "process.error" || m.Method == "process.completed" {
			t.Errorf("before process.completed: %s", m.raw)
		}
	}
}

// TestContainmentLeftovers checks that a server finds the run cgroups a killed server left
// behind, ends what runs in them and removes them, and leaves alone those of a server that
// still runs. It also uses Config.Cgroup naming a parent, and refuses one that is not a cgroup.
func TestContainmentLeftovers(t *testing.T) {
	parent := filepath.Join(requireCgroup2(t), fmt.Sprintf("ccexecutor-test-%d", os.Getpid()))
	if err := os.Mkdir(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	defer syscall.Rmdir(parent)
	// A run of a dead server: our PID with another start time is a server no longer running.
	dead := filepath.Join(parent, fmt.Sprintf("%s%d-0-server-1", runPrefix, os.Getpid()))
	if err := os.Mkdir(dead, 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(dead)
	if err != nil {
		t.Fatal(err)
	}
	left := exec.Command("sleep", "300")
	left.SysProcAttr = &syscall.SysProcAttr{Setsid: true, UseCgroupFD: true, CgroupFD: int(d.Fd())}
	err = startLeader(left) // this binary's own child: the reaper leaves it to Wait
	d.Close()
	if err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- waitLeader(left) }() // returns once sleep is killed
	// A run of a live server: this process is one.
	owner, _ := ownerName(os.Getpid())
	live := filepath.Join(parent, owner+"999999")
	if err := os.Mkdir(live, 0o755); err != nil {
		t.Fatal(err)
	}
	defer syscall.Rmdir(live)

	var logs bytes.Buffer
	ts := newTestServer(t, Config{Cgroup: parent, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if mode, err := ts.Containment(); mode != "cgroup" || err != nil {
		t.Fatalf("Containment() = %q, %v", mode, err)
	}
	// sweep removes a cgroup only once it is empty.
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("leftover %s is still there: %v", dead, err)
		c := cgroup{dir: dead}
		c.signal(syscall.SIGKILL)
		c.remove(time.Time{})
	}
	if err := <-exited; err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("the leftover's process: %v, want killed", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("a live server's cgroup was removed: %v", err)
	}
	if !strings.Contains(logs.String(), "cgroups=1") {
		t.Errorf("log does not say that one leftover was found:\n%s", logs.String())
	}
	// Runs start under the parent named.
	c := dial(t, ts.addr)
	c.connected()
	pid, _ := c.start("echo ready; sleep 300", nil)
	if dir := cgroupDir(t, pid); filepath.Dir(dir) != parent {
		t.Errorf("run in %s, want a cgroup under %s", dir, parent)
	}
	c.call("control", map[string]any{"type": "CANCEL"})
	c.until("process.completed")

	// A parent that is not a cgroup: the server says so, and starts no run.
	bad := newTestServer(t, Config{Cgroup: t.TempDir()})
	if _, err := bad.Containment(); err == nil || !strings.Contains(err.Error(), "not on a cgroup v2 file system") {
		t.Errorf("Containment() with a plain directory: %v", err)
	}
	c = dial(t, bad.addr)
	c.connected()
	if r := c.call("execute", map[string]any{"command": "echo hi"}); r.Error == nil || !strings.Contains(r.Error.Message, "cgroup") {
		t.Errorf("execute with an unusable cgroup: %s", r.raw)
	}
}

// TestProcsPIDs guards against signalling the server itself: cgroup.procs lists 0 for a
// process the kernel cannot name in the reader's PID namespace, and kill(0, sig) would send
// sig to the caller's own process group.
func TestProcsPIDs(t *testing.T) {
	rows := []struct {
		procs string
		want  []int
	}{
		{"", nil},
		{"12\n345\n", []int{12, 345}},
		{"0\n", nil},                    // not in this PID namespace
		{"7\n0\n8\n", []int{7, 8}},      // and the others still get the signal
		{"-1\n-42\n", nil},              // never kill(-1): every process we may signal
		{"x\n9\n", []int{9}},            // not a number
		{"99999999999999999999\n", nil}, // out of range
	}
	for _, row := range rows {
		if got := procsPIDs([]byte(row.procs)); !slices.Equal(got, row.want) {
			t.Errorf("procsPIDs(%q) = %v, want %v", row.procs, got, row.want)
		}
	}
}
