package ccexecutor

import (
	"bufio"
	"context"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pacedReader lets through at most perTick bytes per tick: a client that reads slowly.
type pacedReader struct {
	r       io.Reader
	tick    <-chan time.Time
	perTick int
	left    int
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if p.left == 0 {
		<-p.tick
		p.left = p.perTick
	}
	n, err := p.r.Read(b[:min(len(b), p.left)])
	p.left -= n
	return n, err
}

// TestOutputDelivered guards against losing output that a run wrote before its group ended:
// the pipes got one kill grace of wall time to drain once the group was gone, and when the
// client read slowly the pump spent it waiting on the client, so the rest of the pipe was
// thrown away and process.error blamed a process that held the pipe open, which none did.
// Output written after the group ended by a process that left it is read for a kill grace at
// most, then process.error names the stream.
func TestOutputDelivered(t *testing.T) {
	// Both ways a run can end: the pipes' deadline after the group (process groups), or none once
	// the cgroup is empty (containment, where the machine allows it).
	for _, cgroup := range []string{CgroupOff, CgroupAuto} {
		t.Run("slow client, seq 1 300000, cgroup "+cgroup, func(t *testing.T) {
			if testing.Short() && cgroup == CgroupAuto {
				t.Skip("one way is enough with -short")
			}
			t.Parallel()
			slowClient(t, cgroup)
		})
	}

	// A server that shuts down waits for no slow client: it gives the pipes one kill grace,
	// as before. Delivering the whole backlog at this pace would take half a minute.
	t.Run("Shutdown with a slow client", func(t *testing.T) {
		t.Parallel()
		ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond})
		c := dial(t, ts.addr)
		c.connected()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		c.br = bufio.NewReader(&pacedReader{r: c.br, tick: tick.C, perTick: 8 << 10})
		c.start("seq 1 300000", nil)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		shut := make(chan error, 1)
		go func() { shut <- ts.Shutdown(ctx) }() // returns once every session is over, or at ctx's end
		var done msg
		for {
			m, err := c.read()
			if err != nil {
				break // the close frame, after process.completed
			}
			if m.Method == "process.completed" {
				done = m
			}
		}
		if err := <-shut; err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if done.Params.Error == nil || *done.Params.Error != "server shutting down" {
			t.Errorf("process.completed = %s", done.raw)
		}
	})

	// A process that left the group holds stdout open: the run ends all the same, at most a
	// kill grace after the group's output was read, and process.error names the stream.
	escapees := []struct{ name, script string }{
		{"escaped holder of stdout, silent", "exec sleep 300"},
		{"escaped holder of stdout, writing on", "while :; do echo tick; sleep 0.01; done"},
	}
	for _, row := range escapees {
		t.Run(row.name, func(t *testing.T) {
			t.Parallel()
			// Process groups: with containment the escapee would end with the cgroup.
			ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond, Cgroup: CgroupOff})
			c := dial(t, ts.addr)
			c.connected()
			_, first := c.start(escape(row.script), nil)
			pid, err := strconv.Atoi(strings.TrimSpace(first))
			if err != nil {
				t.Fatalf("first line %q, want the PID of the escaped process", first)
			}
			defer killReaped(t, pid)
			deadline := time.Now().Add(10 * time.Second)
			var errs []string
			m := c.next()
			for ; m.Method != "process.completed"; m = c.next() {
				if m.Method == "process.error" {
					errs = append(errs, m.raw)
				}
				if time.Now().After(deadline) {
					t.Fatalf("no process.completed within 10 s; process.error: %q", errs)
				}
			}
			if m.Params.Status != "completed" || *m.Params.ExitCode != 0 {
				t.Errorf("process.completed = %s", m.raw)
			}
			if len(errs) != 1 || !strings.Contains(errs[0], "stdout was still held open") || strings.Contains(errs[0], "stderr") {
				t.Errorf("process.error: %q, want one naming stdout alone", errs)
			}
			c.assertWorks()
		})
	}
}

// escape returns a command whose leader starts a process that leaves the group, prints its
// PID, holds stdout (not stderr) and runs script. The leader exits once that process has left
// the group, so that ending the group does not reach it.
func escape(script string) string {
	return `d=$(mktemp -d) && mkfifo $d/left && ` +
		`setsid -f sh -c 'echo $$; echo > '$d/left'; ` + script + `' 2>/dev/null; ` +
		`read x < $d/left; rm -r $d`
}

// killReaped kills pid, a child of this process that left its run's group, and waits until the
// reaper has reaped it.
func killReaped(t *testing.T, pid int) {
	t.Helper()
	syscall.Kill(pid, syscall.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if st, ok := procStat(pid); !ok || st.ppid != os.Getpid() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d was not reaped within 10 s of SIGKILL", pid)
		}
		<-tick.C
	}
}

// slowClient reads the output of seq 1 300000 at about 100 kB/s from a server with the
// containment setting cgroup, and checks that every line comes, in order, with no process.error.
func slowClient(t *testing.T, cgroup string) {
	const lines = 300000
	ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond, Cgroup: cgroup})
	c := dial(t, ts.addr)
	c.connected()
	// 80 kB of frames per 10 ms: about 100 bytes a line, so 800 lines per 10 ms, and about
	// 4 s for the whole run, of which seq takes a small part: once it has exited the pipe
	// still holds up to 1 MiB, which the client needs seconds to take.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	c.br = bufio.NewReader(&pacedReader{r: c.br, tick: tick.C, perTick: 80 << 10})
	if r := c.call("execute", map[string]any{"command": "seq 1 " + strconv.Itoa(lines)}); r.Error != nil {
		t.Fatalf("execute: %s", r.raw)
	}
	next := 1
	for {
		m := c.next()
		switch m.Method {
		case "process.output":
			if m.Params.Type != "stdout" || m.Params.Data != strconv.Itoa(next)+"\n" {
				t.Fatalf("after line %d: %s", next-1, trim(m.raw))
			}
			next++
			continue
		case "process.error":
			t.Errorf("after line %d: %s", next-1, m.raw)
			continue
		case "process.completed":
			if next != lines+1 || m.Params.Status != "completed" || *m.Params.ExitCode != 0 {
				t.Errorf("process.completed after %d of %d lines: %s", next-1, lines, m.raw)
			}
		default:
			continue
		}
		break
	}
}
