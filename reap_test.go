package ccexecutor

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// escapeLoop is the hostile command of issue 10: five processes that leave the run's group
// with setsid and outlive their parent, so that they are re-parented to the server.
const escapeLoop = "for i in 1 2 3 4 5; do setsid -f sleep 0.3; done"

// escapees lists the children of this process that escapeLoop started, zombies included, with
// their state: sleep processes that lead a session of their own.
func escapees() map[int]string {
	found := map[int]string{}
	for _, pid := range children() {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		// pid (comm) state ppid pgrp session ...; a zombie keeps its comm, not its cmdline.
		comm, rest, _ := strings.Cut(string(b), ") ")
		f := strings.Fields(rest)
		if strings.HasSuffix(comm, "(sleep") && len(f) > 3 && f[3] == strconv.Itoa(pid) {
			found[pid] = f[0]
		}
	}
	return found
}

// TestOrphansReaped guards against zombies under the subreaper: a process that leaves its
// run's group and outlives its parent becomes a child of the server, which no run reaps, so
// 30 runs of escapeLoop left 150 zombies until the server exited. Each must be reaped soon
// after it exits, and the reaper must never take the exit status of a run's leader, which
// exec.Cmd.Wait is waiting for: a reaper that called wait4(-1), or that did not know a leader
// which exited right after its fork, reports -1 for the leaders that exit 3 here at once
// while the escapees of other runs are reaped.
func TestOrphansReaped(t *testing.T) {
	ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond})
	var wg sync.WaitGroup
	for w := range 3 { // three sessions at once, ten runs each
		wg.Go(func() {
			c := dial(t, ts.addr)
			c.connected()
			defer c.close()
			for i := range 10 {
				exit := 3 * ((w + i) % 2) // the leader exits 3 or 0; the escapees exit 0
				_, done := c.run(fmt.Sprintf("%s; exit %d", escapeLoop, exit), nil)
				if done.ExitCode == nil || *done.ExitCode != exit || done.Error != nil {
					t.Errorf("session %d, run %d: exit code %v, error %v; want exit code %d", w, i, deref(done.ExitCode), deref(done.Error), exit)
				}
			}
		})
	}
	stop := make(chan struct{})
	var quick sync.WaitGroup
	quick.Go(func() { // leaders that exit at once, while the others' escapees are reaped
		c := dial(t, ts.addr)
		c.connected()
		defer c.close()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, done := c.run("exit 3", nil); done.ExitCode == nil || *done.ExitCode != 3 {
				t.Errorf("exit 3: exit code %v, error %v", deref(done.ExitCode), deref(done.Error))
			}
		}
	})
	wg.Wait()
	close(stop)
	quick.Wait()
	assertEscapeesReaped(t)
}

// deref returns what p points to, or nil.
func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// assertEscapeesReaped waits until the escapees of escapeLoop, which sleep for 0.3 s, have
// exited and been reaped; it fails the test if any is left, a zombie or not, after 10 s.
func assertEscapeesReaped(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for left := escapees(); len(left) > 0; left = escapees() {
		if time.Now().After(deadline) {
			t.Fatalf("10 s after the runs ended, escaped children are left (PID: state): %v", left)
		}
		<-tick.C
	}
}

// TestGroupEndsAfterEscape guards against a run that never ends: process.wait blocked in
// wait4(-pgid) for the members of the group, and a member that was in the group when the call
// began and then left it (setsid) never woke it, since only an exit in the group does. Then
// supervise, and with it the run, the session and the server's Shutdown, waited for good. It
// happened in about one run in 20 to 35 of escapeLoop, four at a time (12 and 22 of these 400
// runs hung with the fix reverted); here each must end.
func TestGroupEndsAfterEscape(t *testing.T) {
	runs := 400
	if testing.Short() {
		runs = 100
	}
	var hung atomic.Int32
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range runs / 4 {
				p, err := start(command{args: []string{"/bin/sh", "-c", escapeLoop}})
				if err != nil {
					t.Error(err)
					return
				}
				go p.wait() // returns once the group is reaped, which supervise ensures
				done := make(chan struct{})
				go func() { supervise(context.Background(), p, 100*time.Millisecond, func() {}); close(done) }() // returns once the group is gone, which the select below waits for
				select {
				case <-done:
				case <-time.After(10 * time.Second):
					hung.Add(1) // supervise will not return: leave it to the leak check
				}
				p.stdout.Close()
				p.stderr.Close()
			}
		})
	}
	wg.Wait()
	if n := hung.Load(); n > 0 {
		t.Fatalf("%d of %d runs of %q did not end within 10 s", n, runs, escapeLoop)
	}
	assertEscapeesReaped(t)
}
