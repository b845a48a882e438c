package ccexecutor

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMain makes the test binary a child subreaper, as the ccexecutor binary is, so that the
// tests can see every member of a group reaped; after the tests it checks that no goroutine of
// the package and no child process is left.
func TestMain(m *testing.M) {
	if os.Getenv(noSubreaperEnv) == "" {
		if err := SetSubreaper(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	if code == 0 {
		if g := leakedGoroutines(); g != "" {
			fmt.Fprintf(os.Stderr, "leaked goroutines:\n%s\n", g)
			code = 1
		}
		if kids := children(); len(kids) > 0 {
			fmt.Fprintf(os.Stderr, "child processes left behind: %v\n", kids)
			code = 1
		}
	}
	os.Exit(code)
}

// Environment variables with which a test binary runs its tests again in another setting (see
// TestCancellationCleanup's "without a subreaper").
const (
	noSubreaperEnv = "CCEXECUTOR_TEST_NO_SUBREAPER" // set: TestMain does not call SetSubreaper
	testCgroupEnv  = "CCEXECUTOR_TEST_CGROUP"       // Config.Cgroup of test servers that set none
)

// runOwn runs cmd to its end as a child of this test binary. TestMain made the binary a
// subreaper, whose reaper reaps every exited child but the leaders of runs; cmd is recorded as
// one, so that its Wait keeps its exit status (see SetSubreaper).
func runOwn(cmd *exec.Cmd) error {
	if err := startLeader(cmd); err != nil {
		return err
	}
	return waitLeader(cmd)
}

// leakedGoroutines returns the stacks of the package's goroutines still running, but the
// reaper that SetSubreaper started, waiting up to a few seconds for those that are on their way
// out (closing a test server is asynchronous).
func leakedGoroutines() string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			if strings.Contains(g, "ccexecutor.") && !strings.Contains(g, "ccexecutor.TestMain") &&
				!strings.Contains(g, "ccexecutor.leakedGoroutines") &&
				!strings.Contains(g, "ccexecutor.reapLoop") { // lives as long as the process
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		runtime.Gosched()
		time.Sleep(10 * time.Millisecond) // a bounded wait for exits, not a wait for state to settle
	}
}

// children lists the PIDs whose parent is this process: with SetSubreaper, every process a
// test started and that is still alive or unreaped.
func children() []int {
	var kids []int
	me := os.Getpid()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, ok := procStat(pid); ok && st.ppid == me {
			kids = append(kids, pid)
		}
	}
	return kids
}
