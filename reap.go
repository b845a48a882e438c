package ccexecutor

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unsafe"
)

// orphans is what the reaper needs to know: which children of this process belong to a run's
// exec.Cmd.Wait, and when it last reaped. It is package-level because what it describes is
// process-wide: the subreaper attribute, SIGCHLD and the set of children belong to the process,
// not to a Server, and the reaper must leave alone the leaders of every Server's runs.
var orphans struct {
	// forking is read-held by startLeader from the fork until the new leader is in leaders,
	// and write-held by reap while it reaps: so a leader that exits at once is never taken for
	// an orphan.
	forking sync.RWMutex

	mu      sync.Mutex    // guards the fields below; held for map and channel work only
	leaders map[int]bool  // PIDs of run leaders that their exec.Cmd.Wait has yet to reap
	round   chan struct{} // closed, and replaced, at the end of each reaping round
}

// startReaper starts the goroutine that reaps the children of this process that no run waits
// for. It runs once per process.
var startReaper = sync.OnceFunc(func() {
	wake := make(chan os.Signal, 1)
	signal.Notify(wake, syscall.SIGCHLD)
	select {
	case wake <- syscall.SIGCHLD: // a first round, for what exited before Notify
	default: // a SIGCHLD is queued already
	}
	go reapLoop(wake) // runs for the life of the process, as the subreaper attribute it serves
})

// reapLoop reaps once per SIGCHLD. Signals that arrive during a round are coalesced into one
// more round, which scans every child, so no exit is missed.
func reapLoop(wake <-chan os.Signal) {
	for range wake {
		reap()
	}
}

// reap waits for every child of this process that has exited (a zombie) and is not the leader
// of a run, and then ends the round. It names each PID it reaps (wait4(pid), never wait4(-1)),
// so it cannot take the exit status that a run's exec.Cmd.Wait is waiting for.
func reap() {
	if anyZombie() {
		orphans.forking.Lock()
		for _, pid := range childPIDs() {
			if st, ok := readStat(pid); ok && st.state == 'Z' && !isLeader(pid) {
				var ws syscall.WaitStatus
				syscall.Wait4(pid, &ws, syscall.WNOHANG, nil) // ECHILD: a group's wait got there first
			}
		}
		orphans.forking.Unlock()
	}
	orphans.mu.Lock()
	if orphans.round != nil {
		close(orphans.round)
		orphans.round = nil
	}
	orphans.mu.Unlock()
}

// anyZombie reports whether a child of this process has exited and is not reaped yet, with a
// waitid that only looks (WNOWAIT). Most rounds follow the exit of a leader that its
// exec.Cmd.Wait has reaped already; this saves them the scan of every child.
func anyZombie() bool {
	const pAll = 0     // waitid's P_ALL: any child
	var info [128]byte // siginfo_t; its first field, si_signo, is SIGCHLD if a child was found
	_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pAll, 0, uintptr(unsafe.Pointer(&info)),
		syscall.WEXITED|syscall.WNOHANG|syscall.WNOWAIT, 0, 0)
	if errno == syscall.ECHILD {
		return false // no child at all
	}
	return errno != 0 || *(*int32)(unsafe.Pointer(&info[0])) == int32(syscall.SIGCHLD)
}

func isLeader(pid int) bool {
	orphans.mu.Lock()
	defer orphans.mu.Unlock()
	return orphans.leaders[pid]
}

// nextRound returns a channel closed at the end of the next reaping round.
func nextRound() <-chan struct{} {
	orphans.mu.Lock()
	defer orphans.mu.Unlock()
	if orphans.round == nil {
		orphans.round = make(chan struct{})
	}
	return orphans.round
}

// startLeader starts cmd, the leader of a run, and records it as one until waitLeader.
func startLeader(cmd *exec.Cmd) error {
	orphans.forking.RLock()
	defer orphans.forking.RUnlock()
	if err := cmd.Start(); err != nil {
		return err
	}
	orphans.mu.Lock()
	defer orphans.mu.Unlock()
	if orphans.leaders == nil {
		orphans.leaders = make(map[int]bool)
	}
	orphans.leaders[cmd.Process.Pid] = true
	return nil
}

// waitLeader waits for cmd, started by startLeader, and forgets the leader.
func waitLeader(cmd *exec.Cmd) error {
	err := cmd.Wait()
	orphans.mu.Lock()
	delete(orphans.leaders, cmd.Process.Pid)
	orphans.mu.Unlock()
	// Should the PID be reused at once by an orphan that a round skipped as a leader, the next
	// SIGCHLD reaps it.
	return err
}

// groupLeft reports whether process group pgid, whose leader has been reaped, still has a
// member to wait for: one that runs, or one that has exited and is this process's to reap
// (the reaper reaps it). A member that has exited and whose parent is some other process is
// that parent's to reap, and may never be (init here does not reap): it is not waited for. A
// member that left the group (setsid) is not in it. The kernel gives the number pgid to no new
// process while a member of the old group is left, so a process whose PID is pgid means that
// the old group is gone and the number was taken again.
func groupLeft(pgid int) bool {
	if syscall.Kill(-pgid, 0) == syscall.ESRCH {
		return false // no process at all is in the group: the usual case, without a scan
	}
	me := os.Getpid()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, ok := readStat(pid); ok && st.pgrp == pgid {
			if pid == pgid {
				return false
			}
			if st.state != 'Z' || st.ppid == me {
				return true
			}
		}
	}
	return false
}

// childPIDs lists the PIDs whose parent is this process. The kernel lists them per thread (a
// re-parented orphan goes to any thread of the subreaper); without that file
// (CONFIG_PROC_CHILDREN), every process's stat is read instead.
func childPIDs() []int {
	var pids []int
	files, _ := filepath.Glob("/proc/self/task/*/children")
	read := false
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		read = true
		for w := range strings.FieldsSeq(string(b)) {
			if pid, err := strconv.Atoi(w); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	if read {
		return pids
	}
	me := os.Getpid()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			if st, ok := readStat(pid); ok && st.ppid == me {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// pidStat is what reap needs of /proc/PID/stat.
type pidStat struct {
	state      byte // R, S, D, T, Z...
	ppid, pgrp int
}

// readStat reads the state, parent and process group of pid; false if pid is gone.
func readStat(pid int) (pidStat, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	i := bytes.LastIndexByte(b, ')') // the command name, in parentheses, may hold anything
	if err != nil || i < 0 {
		return pidStat{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 3 {
		return pidStat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	pgrp, _ := strconv.Atoi(f[2])
	return pidStat{f[0][0], ppid, pgrp}, true
}
