package ccexecutor

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

type procState struct {
	state      byte
	ppid, pgrp int
}

// procStat reads the state, parent and process group of pid from /proc.
func procStat(pid int) (procState, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procState{}, false
	}
	// The command name is in parentheses and may hold spaces; the fields after it are fixed.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	ppid, _ := strconv.Atoi(f[1])
	pgrp, _ := strconv.Atoi(f[2])
	return procState{f[0][0], ppid, pgrp}, true
}

// groupMembers lists the PIDs in process group pgid.
func groupMembers(pgid int) map[int]procState {
	members := map[int]procState{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			if st, ok := procStat(pid); ok && st.pgrp == pgid {
				members[pid] = st
			}
		}
	}
	return members
}

// assertGroupGone checks that no member of group pgid is left, zombies included, and that its
// leader was reaped.
func assertGroupGone(t *testing.T, pgid int) {
	t.Helper()
	if os.Getenv(noSubreaperEnv) != "" {
		// Without a subreaper, members that outlived their parent are init's to reap, and
		// init may never reap them: what counts is that none of them runs.
		for pid, st := range groupMembers(pgid) {
			if st.state != 'Z' {
				t.Errorf("member %d of group %d is still alive, state %c", pid, pgid, st.state)
			}
		}
	} else if err := syscall.Kill(-pgid, 0); err != syscall.ESRCH {
		t.Errorf("kill(-%d, 0) = %v, want ESRCH; members left: %v", pgid, err, groupMembers(pgid))
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pgid)); err == nil {
		t.Errorf("leader %d was not reaped", pgid)
	}
}

// stopped reports whether process pid will not run again before a SIGCONT: it is stopped, or
// it is blocked in the kernel (a shell in vfork, waiting for a child that was stopped before it
// could exec) with a SIGSTOP pending, which it acts on before it returns.
func stopped(pid int, state byte) bool {
	if state == 'T' {
		return true
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for l := range strings.Lines(string(status)) {
		if pending, ok := strings.CutPrefix(l, "ShdPnd:"); ok {
			mask, _ := strconv.ParseUint(strings.TrimSpace(pending), 16, 64)
			return state == 'D' && mask&(1<<(syscall.SIGSTOP-1)) != 0
		}
	}
	return false
}

// waitGroupState waits until every member of group pgid is in a state for which ok is true.
// A signal takes effect when the kernel next schedules each member, so this polls /proc; it
// fails the test if that does not happen within 10 s.
func waitGroupState(t *testing.T, pgid int, ok func(pid int, state byte) bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		members := groupMembers(pgid)
		all := len(members) > 1 // the leader and at least the subshell
		for pid, st := range members {
			all = all && ok(pid, st.state)
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %d is not all %s: %v", pgid, what, members)
		}
		runtime.Gosched()
	}
}

// waitPaused waits until a PAUSE has taken effect on the group of pgid: every member stopped by
// SIGSTOP or, for a run contained in a cgroup, the cgroup frozen, which the answer to PAUSE
// has already waited for.
func waitPaused(t *testing.T, ts *testServer, pgid int) {
	t.Helper()
	if kind, _ := ts.Containment(); kind == "cgroup" {
		cg := cgroup{dir: cgroupDir(t, pgid)}
		if _, frozen, err := cg.events(); err != nil || !frozen {
			t.Fatalf("after PAUSE the cgroup of %d is not frozen (%v)", pgid, err)
		}
		return
	}
	waitGroupState(t, pgid, stopped, "stopped")
}
