package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cgroupParent makes a cgroup v2 for the test under this process's own and returns its
// directory, or skips the test where there is none to write to.
func cgroupParent(t *testing.T) string {
	t.Helper()
	mountinfo, _ := os.ReadFile("/proc/self/mountinfo")
	var mount, root string
	for line := range strings.Lines(string(mountinfo)) {
		pre, post, ok := strings.Cut(line, " - ")
		if f := strings.Fields(pre); ok && len(f) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
			mount, root = f[4], f[3]
			break
		}
	}
	own, _ := os.ReadFile("/proc/self/cgroup")
	var rel string
	for line := range strings.Lines(string(own)) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			rel = strings.TrimPrefix(p, root)
		}
	}
	if mount == "" {
		t.Skip("no cgroup v2 hierarchy is mounted")
	}
	dir := filepath.Join(mount, rel, fmt.Sprintf("ccexecutor-test-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "-")))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("cgroup v2 is not writable here: %v", err)
	}
	t.Cleanup(func() {
		// Whatever a failed test left: kill it, then remove its cgroup once it is empty.
		for _, sub := range subdirs(dir) {
			os.WriteFile(filepath.Join(dir, sub, "cgroup.kill"), []byte("1"), 0)
		}
		for deadline := time.Now().Add(runWait); ; runtime.Gosched() {
			for _, sub := range subdirs(dir) {
				syscall.Rmdir(filepath.Join(dir, sub))
			}
			if syscall.Rmdir(dir) == nil || time.Now().After(deadline) {
				return
			}
		}
	})
	return dir
}

// containment asks a server's /health how it contains runs.
func containment(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var h struct{ Containment string }
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		t.Fatal(err)
	}
	return h.Containment
}

// TestCgroupFlag checks --cgroup and CGROUP: off keeps process groups, a parent cgroup is used,
// and a parent that cannot be used stops the start with status 2 and a clear message.
func TestCgroupFlag(t *testing.T) {
	parent := cgroupParent(t)
	for _, row := range []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"--cgroup off", []string{"--cgroup", "off"}, nil, "process-group"},
		{"CGROUP=off", nil, []string{"CGROUP=off"}, "process-group"},
		{"--cgroup PATH", []string{"--cgroup", parent}, nil, "cgroup"},
		{"CGROUP=PATH", nil, []string{"CGROUP=" + parent}, "cgroup"},
	} {
		t.Run(row.name, func(t *testing.T) {
			s := startServe(t, serveEnv(row.env...), append([]string{"--addr", "127.0.0.1:0"}, row.args...)...)
			if got := containment(t, s.addr); got != row.want {
				t.Errorf("/health containment = %q, want %q", got, row.want)
			}
		})
	}
	for _, row := range []struct {
		name string
		args []string
		env  []string
	}{
		{"--cgroup a plain directory", []string{"--cgroup", t.TempDir()}, nil},
		{"CGROUP=a plain directory", nil, []string{"CGROUP=" + t.TempDir()}},
		{"--cgroup missing", []string{"--cgroup", filepath.Join(parent, "missing")}, nil},
	} {
		t.Run(row.name, func(t *testing.T) {
			res := runServe(t, serveEnv(row.env...), append([]string{"--addr", "127.0.0.1:0"}, row.args...)...)
			if res.code != 2 || !strings.Contains(res.stderr, "ccexecutor: cgroup ") {
				t.Errorf("exit status %d, stderr:\n%s\nwant status 2 and the cgroup named", res.code, res.stderr)
			}
			checkNoPanic(t, res.stderr)
		})
	}
	// Each start says once which containment it uses, and why.
	for _, row := range []struct{ args, want string }{
		{"off", `msg="containment: process groups; a process that calls setsid escapes them" why="turned off by configuration"`},
		{parent, `msg="containment: cgroup v2" why="runs start in cgroups under ` + parent + `"`},
	} {
		s := startServe(t, serveEnv(), "--addr", "127.0.0.1:0", "--cgroup", row.args)
		s.cmd.Process.Signal(syscall.SIGTERM)
		<-s.exited
		if log := s.stderr.String(); strings.Count(log, "containment:") != 1 || !strings.Contains(log, row.want) {
			t.Errorf("--cgroup %s: log\n%s\nwant one line with %s", row.args, log, row.want)
		}
	}
	t.Run("-h", func(t *testing.T) {
		if res := runServe(t, serveEnv(), "-h"); !strings.Contains(res.stderr, "  -cgroup ") {
			t.Errorf("-h does not show -cgroup:\n%s", res.stderr)
		}
	})
}

// TestCgroupLeftovers checks that a server killed with SIGKILL leaves nothing running for long:
// the next server to start under the same parent cgroup ends the runs it left, removes their
// cgroups, and says how many it found.
func TestCgroupLeftovers(t *testing.T) {
	parent := cgroupParent(t)
	first := startServe(t, serveEnv(), "--addr", "127.0.0.1:0", "--cgroup", parent)
	c := rawDial(t, first.addr)
	// The run leaves an escapee behind and goes on; its first line is the escapee's PID.
	c.send(`{"jsonrpc":"2.0","id":1,"method":"execute","params":{"command":"setsid -f sh -c 'echo $$; exec sleep 300 >/dev/null' | head -n1; sleep 300"}}`)
	var escapee int
	for escapee == 0 {
		if m := c.next(); m.Method == "process.output" {
			escapee, _ = strconv.Atoi(strings.TrimSpace(m.Params.Data))
		}
	}
	first.cmd.Process.Kill()
	<-first.exited
	if err := syscall.Kill(escapee, 0); err != nil {
		t.Fatalf("the escapee did not outlive the killed server: %v", err)
	}
	if len(subdirs(parent)) == 0 {
		t.Fatal("the killed server left no cgroup")
	}

	second := startServe(t, serveEnv(), "--addr", "127.0.0.1:0", "--cgroup", parent)
	second.cmd.Process.Signal(syscall.SIGTERM)
	<-second.exited
	if !strings.Contains(second.stderr.String(), "cgroups=1") {
		t.Errorf("the second server did not report one leftover:\n%s", &second.stderr)
	}
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", escapee)); err == nil && !strings.Contains(string(st), ") Z ") {
		t.Errorf("the escapee %d is still running: %s", escapee, st)
	}
	if left := subdirs(parent); len(left) != 0 {
		t.Errorf("cgroups left under %s: %v", parent, left)
	}
}

// subdirs lists the child cgroups of dir.
func subdirs(dir string) []string {
	var dirs []string
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, e.Name())
		}
	}
	return dirs
}

// TestCgroupFallback checks that auto falls back to process groups where the server may not
// write to its cgroup, here as user nobody, and says why; a parent named on the command line
// that it may not write to stops the start instead.
func TestCgroupFallback(t *testing.T) {
	parent := cgroupParent(t)
	if os.Getuid() != 0 {
		t.Skip("needs root, to run the server as nobody")
	}
	// The test binary's directory is private: give nobody a copy it may run.
	dir, err := os.MkdirTemp("", "ccexecutor-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	bin, err := os.ReadFile(binPath)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "ccexecutor"), bin, 0o755)
	}
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	nobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}

	cmd := exec.Command(filepath.Join(dir, "ccexecutor"), "--addr", "127.0.0.1:0")
	cmd.Env, cmd.SysProcAttr, cmd.Dir = serveEnv(), nobody, dir
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "ccexecutor listening on ws://")
	if ok {
		if got := containment(t, strings.TrimSuffix(addr, "/ws/mcp")); got != "process-group" {
			t.Errorf("/health containment = %q as nobody, want process-group", got)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()
	if !ok || !strings.Contains(stderr.String(), "containment: process groups") || !strings.Contains(stderr.String(), "permission denied") {
		t.Errorf("as nobody: first line %q, log:\n%s\nwant a fallback to process groups, and why", line, &stderr)
	}

	cmd = exec.Command(filepath.Join(dir, "ccexecutor"), "--addr", "127.0.0.1:0", "--cgroup", parent)
	cmd.Env, cmd.SysProcAttr, cmd.Dir = serveEnv(), nobody, dir
	res, err := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 2 || !strings.Contains(string(res), "ccexecutor: cgroup "+parent) {
		t.Errorf("as nobody with --cgroup %s: exit status %d, %v, output:\n%s\nwant status 2 and the cgroup named", parent, code, err, res)
	}
}
