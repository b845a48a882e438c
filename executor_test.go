package ccexecutor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

// TestSessionLocking guards against FIX_001_RACE_CONDITION: the Python service read and wrote
// its session map from concurrent handlers without a lock, so that sessions were lost or
// counted twice under load. Many sessions connect, run, and disconnect at the same time while
// others read the count, and Shutdown comes while sessions are being admitted and removed; the
// race detector must stay silent and the count return to zero.
func TestSessionLocking(t *testing.T) {
	cycles := 240
	if testing.Short() {
		cycles = 60
	}
	rows := []struct {
		name  string
		cycle func(c *client, i int)
	}{
		{"run to completion", func(c *client, i int) {
			out, done := c.run(fmt.Sprintf("echo %d", i), nil)
			if len(out) != 1 || out[0].Data != fmt.Sprintf("%d\n", i) || done.Status != "completed" {
				c.t.Errorf("cycle %d: output %+v, completed %+v", i, out, done)
			}
		}},
		{"disconnect mid-run", func(c *client, i int) { c.start("echo ready; sleep 300", nil) }},
		{"disconnect before any run", func(c *client, i int) {}},
	}

	t.Run("sessions come and go", func(t *testing.T) {
		ts := newTestServer(t, Config{KillGrace: time.Second})
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() { // returns after its share of the cycles
				for i := w; i < cycles; i += 8 {
					row := rows[i%len(rows)]
					c := dial(t, ts.addr)
					c.connected()
					row.cycle(c, i)
					c.close()
				}
			})
		}
		for range 2 {
			wg.Go(func() { // reads the count while sessions come and go; returns after cycles reads
				for i := 0; i < cycles; i++ {
					resp, err := http.Get("http://" + ts.addr + "/health")
					if err != nil {
						t.Error(err)
						return
					}
					resp.Body.Close()
				}
			})
		}
		wg.Wait()
		if n := ts.sessions.len(); n != 0 {
			t.Errorf("%d sessions left after every client disconnected, want 0", n)
		}
	})

	// Shutdown sets the registry's closing flag and reads its map while handlers add and remove
	// sessions: without the lock in registry.close, or in remove, the race detector reports it
	// here. Each client connects again and again, in the cycles of the rows above, until the
	// server refuses it; Shutdown comes once each has had a session. Every session admitted
	// gets connected, or close 1001; with a reattach window too, whose sessions end otherwise.
	for _, window := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprintf("Shutdown while sessions come and go/window=%v", window), func(t *testing.T) {
			ts := newTestServer(t, Config{KillGrace: time.Second, ReattachWindow: window})
			const clients = 8
			var admitted, wg sync.WaitGroup
			admitted.Add(clients)
			for w := range clients {
				wg.Go(func() { // returns once the server refuses a connection: it is shutting down
					first := true
					for i := w; ; i += clients {
						if !cycleUntilShutdown(t, ts, i) {
							return
						}
						if first {
							admitted.Done()
							first = false
						}
					}
				})
			}
			admitted.Wait()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			if err := ts.Shutdown(ctx); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
			if n := ts.sessions.len(); n != 0 {
				t.Errorf("%d sessions left after Shutdown returned, want 0", n)
			}
			wg.Wait()
		})
	}
}

// cycleUntilShutdown connects to ts and runs the i-th of TestSessionLocking's cycles (a run to
// completion, a disconnect mid-run, a disconnect before any run), any step of which Shutdown
// may cut short. It reports false if the server refused the connection because it is shutting
// down, and fails the test if the session ends in any way that is not the protocol's.
func cycleUntilShutdown(t *testing.T, ts *testServer, i int) bool {
	c, resp, err := tryDial(t, ts.addr, nil)
	switch {
	case err != nil:
		t.Errorf("dial: %v", err)
		return false
	case resp.StatusCode == http.StatusServiceUnavailable:
		return false // Shutdown has begun
	case resp.StatusCode != http.StatusSwitchingProtocols:
		t.Errorf("dial: HTTP %s", resp.Status)
		return false
	}
	m, err := c.read()
	switch {
	case err == io.EOF && c.closed.code == 1001:
		return false // the registry admits no more
	case err != nil || m.Method != "connected":
		t.Errorf("first frame: %s, %v (close code %d)", m.raw, err, c.closed.code)
		return false
	}
	// From here on the server may end the session at any moment: a failed write only means
	// that it did, and the reads below then see the close frame.
	switch i % 3 {
	case 0: // run to completion
		c.tryWriteFrame(0x1, []byte(`{"jsonrpc":"2.0","method":"execute","params":{"command":"echo done"},"id":1}`))
		c.readUntil(func(m msg) bool { return m.Method == "process.completed" })
	case 1: // disconnect mid-run
		c.tryWriteFrame(0x1, []byte(`{"jsonrpc":"2.0","method":"execute","params":{"command":"echo ready; sleep 300"},"id":1}`))
		c.readUntil(func(m msg) bool { return m.Method == "process.output" })
	}
	c.tryWriteFrame(0x8, []byte{0x03, 0xe8})
	c.readUntil(func(msg) bool { return false })
	if errors.Is(c.closeErr, os.ErrDeadlineExceeded) {
		t.Errorf("cycle %d: the server neither answered nor closed the connection", i)
	}
	return true
}

// TestSessionLimit guards against FIX_002_SESSION_LIMIT: the Python service accepted any
// number of sessions. One beyond the limit must get the -32001 error and a close frame with
// status 1008, concurrent connects must never exceed the limit, and a freed slot must be
// usable at once. The check against the limit and the insert must be one step: a registry
// that checks under one lock and inserts under another admits two sessions into the last slot.
func TestSessionLimit(t *testing.T) {
	// Many callers race for the last free slot, with registry.add and remove in a loop: the
	// registry never holds more than limit sessions. A check and an insert that are two steps
	// let a second caller check between the first one's check and insert, and both get the
	// slot. The race needs no sleep: the callers hammer the one mutex from every processor, so
	// that a caller waiting for it often takes it between another caller's check and insert.
	for _, limit := range []int{1, 2, 3} {
		t.Run(fmt.Sprintf("registry.add at once/limit=%d", limit), func(t *testing.T) {
			adds := 40000 // per caller
			if testing.Short() {
				adds = 10000
			}
			callers := 16 * runtime.GOMAXPROCS(0)
			r := registry{max: limit, sessions: map[*session]struct{}{}, drained: make(chan struct{})}
			for range limit - 1 {
				if err := r.add(&session{}); err != nil {
					t.Fatal(err)
				}
			}
			var admitted, refused, overflows atomic.Int64
			var ready, wg sync.WaitGroup
			ready.Add(callers)
			start := make(chan struct{})
			for range callers {
				wg.Go(func() { // returns after its adds
					ready.Done()
					<-start
					s := &session{}
					for range adds {
						switch err := r.add(s); err {
						case nil:
						case errLimit:
							refused.Add(1)
							continue
						default:
							t.Errorf("add = %v", err)
							return
						}
						admitted.Add(1)
						if r.len() > limit {
							overflows.Add(1)
						}
						r.remove(s)
					}
				})
			}
			ready.Wait() // every caller is running: close(start) releases them together
			close(start)
			wg.Wait()
			if n := overflows.Load(); n > 0 {
				t.Errorf("the registry held more than %d sessions %d times", limit, n)
			}
			if admitted.Load() == 0 || refused.Load() == 0 || r.len() != limit-1 {
				t.Errorf("%d adds admitted, %d refused, %d sessions left; want some of each and %d left",
					admitted.Load(), refused.Load(), r.len(), limit-1)
			}
		})
	}

	for _, limit := range []int{1, 3} {
		t.Run(fmt.Sprintf("limit=%d", limit), func(t *testing.T) {
			ts := newTestServer(t, Config{MaxSessions: limit})

			// 2N at once: exactly N admitted, N refused as the protocol says.
			results := make(chan *client, 2*limit)
			var wg sync.WaitGroup
			for range 2 * limit {
				wg.Go(func() { results <- dial(t, ts.addr) })
			}
			wg.Wait()
			close(results)
			var admitted []*client
			for c := range results {
				m, err := c.read()
				switch {
				case err == nil && m.Method == "connected":
					admitted = append(admitted, c)
				case err == nil && m.Error != nil && m.Error.Code == -32001:
					assertRefused(t, c, m)
				default:
					t.Fatalf("first frame: %+v, %v", m, err)
				}
			}
			if len(admitted) != limit {
				t.Fatalf("admitted %d of %d simultaneous connects, want %d", len(admitted), 2*limit, limit)
			}

			// N+1 while N are held.
			extra := dial(t, ts.addr)
			m, err := extra.read()
			if err != nil || m.Error == nil || m.Error.Code != -32001 {
				t.Fatalf("connection %d: %+v, %v; want -32001", limit+1, m, err)
			}
			assertRefused(t, extra, m)

			// N+1 that sent its first request before it read anything, as many clients do: it
			// still gets the refusal and the close frame, which closing with its request unread
			// would have destroyed with a reset.
			request := maskedFrame(opText, []byte(`{"jsonrpc":"2.0","method":"execute","params":{"command":"echo `+strings.Repeat("x", 60<<10)+`"},"id":1}`))
			eager, resp, err := dialAhead(t, ts.addr, nil, request)
			if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("handshake with a request sent ahead: %v, %v", resp, err)
			}
			m, err = eager.read()
			if err != nil || m.Error == nil || m.Error.Code != -32001 {
				t.Fatalf("connection %d with a request sent: %+v, %v; want -32001", limit+1, m, err)
			}
			assertRefused(t, eager, m)

			// A slot freed by a disconnect is usable at once, and the sessions held still work.
			admitted[0].close()
			c := dial(t, ts.addr)
			c.connected()
			c.assertWorks()
			for _, a := range admitted[1:] {
				a.assertWorks()
			}
			if n := ts.sessions.len(); n != limit {
				t.Errorf("sessions = %d, want %d", n, limit)
			}
		})
	}
}

// fakeGroup is a process group for supervise that exists only in memory, so that its timers
// can run in a synctest bubble.
type fakeGroup struct {
	mu       sync.Mutex
	signals  []syscall.Signal
	onSignal func(g *fakeGroup, sig syscall.Signal) // how the group reacts
	leader   chan struct{}
	empty    chan struct{}
	gone     bool
}

func newFakeGroup(onSignal func(*fakeGroup, syscall.Signal)) *fakeGroup {
	return &fakeGroup{onSignal: onSignal, leader: make(chan struct{}), empty: make(chan struct{})}
}

func (g *fakeGroup) signal(sig syscall.Signal) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gone {
		return syscall.ESRCH
	}
	if sig != 0 {
		g.signals = append(g.signals, sig)
		g.onSignal(g, sig)
	}
	return nil
}

// dieLocked ends the fake group: its leader exits and everything is reaped.
func (g *fakeGroup) dieLocked() {
	g.gone = true
	close(g.leader)
	close(g.empty)
}

func (g *fakeGroup) sent() []syscall.Signal {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.signals)
}

func (g *fakeGroup) exited() <-chan struct{} { return g.leader }
func (g *fakeGroup) reaped() <-chan struct{} { return g.empty }

// TestStreamTimeout guards against FIX_003_STREAM_TIMEOUT: in the Python service the stream
// timeout was not in effect, or a run still going was reported completed with exit 0. A run
// that outlives its timeout must be ended, group and all, and reported as failed with the
// cause "stream timeout after <N>s".
func TestStreamTimeout(t *testing.T) {
	const grace = 5 * time.Second
	term, cont, kill := syscall.SIGTERM, syscall.SIGCONT, syscall.SIGKILL
	rows := []struct {
		name     string
		onSignal func(*fakeGroup, syscall.Signal)
		want     []syscall.Signal // signals sent by the time everything is over
		took     time.Duration    // from the start to the group being gone
	}{
		{"group ends on SIGTERM", func(g *fakeGroup, sig syscall.Signal) {
			if sig == syscall.SIGTERM {
				g.dieLocked()
			}
		}, []syscall.Signal{term}, StreamTimeout},
		{"group ignores SIGTERM", func(g *fakeGroup, sig syscall.Signal) {
			if sig == syscall.SIGKILL {
				g.dieLocked()
			}
		}, []syscall.Signal{term, cont, kill}, StreamTimeout + grace},
	}
	for _, row := range rows {
		t.Run("fake time/"+row.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := newFakeGroup(row.onSignal)
				ctx, cancel := withStreamTimeout(t.Context(), StreamTimeout)
				defer cancel()
				start := time.Now()
				var cause error
				done := make(chan struct{})
				go func() { cause = supervise(ctx, g, grace, func() {}); close(done) }()

				time.Sleep(StreamTimeout - time.Nanosecond)
				synctest.Wait()
				if s := g.sent(); len(s) != 0 {
					t.Fatalf("signals before the timeout: %v", s)
				}
				time.Sleep(time.Nanosecond)
				synctest.Wait()
				if s := g.sent(); len(s) == 0 || s[0] != term {
					t.Fatalf("signals at the timeout: %v, want SIGTERM first", s)
				}
				<-done
				if took := time.Since(start); took != row.took {
					t.Errorf("group gone after %v, want %v", took, row.took)
				}
				if s := g.sent(); !slices.Equal(s, row.want) {
					t.Errorf("signals = %v, want %v", s, row.want)
				}
				if want := "stream timeout after 300s"; cause == nil || cause.Error() != want {
					t.Errorf("cause = %v, want %q", cause, want)
				}
			})
		})
	}

	realRows := []struct {
		name, command string
	}{
		{"sleep", "echo ready; sleep 300"},
		{"ignores SIGTERM, with a grandchild", "trap '' TERM; sleep 300 & echo ready; sleep 300"},
		// Ended by the timeout, so failed although its exit code is 0.
		{"exits 0 on SIGTERM", "trap 'exit 0' TERM; echo ready; sleep 300"},
	}
	for _, row := range realRows {
		t.Run("real process/"+row.name, func(t *testing.T) {
			t.Parallel()
			ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond})
			c := dial(t, ts.addr)
			c.connected()
			pgid, _ := c.start(row.command, map[string]any{"timeout": 0.5})
			done, _ := c.until("process.completed")
			p := done.Params
			if p.Status != "failed" || p.Error == nil || *p.Error != "stream timeout after 0.5s" || p.PGID != pgid {
				t.Errorf("process.completed = %s", done.raw)
			}
			assertGroupGone(t, pgid)
			c.assertWorks()
		})
	}
}

// TestControlFlow guards against FIX_004_CONTROL_FLOW: the Python service accepted unknown
// control types silently and signalled a single PID, or a stale one. Each control request
// must get its exact result or error, act on the whole process group, and leave the session
// usable.
func TestControlFlow(t *testing.T) {
	type want struct {
		status string // the result's status, or
		code   int    // the error's code
		msg    string // and message
	}
	rows := []struct {
		name   string
		params any
		idle   want // with no process running
		busy   want // with one running
	}{
		{"PAUSE", map[string]any{"type": "PAUSE"}, want{"", -32003, "No process is running"}, want{status: "paused"}},
		{"RESUME", map[string]any{"type": "RESUME"}, want{"", -32003, "No process is running"}, want{status: "resumed"}},
		{"CANCEL", map[string]any{"type": "CANCEL"}, want{"", -32003, "No process is running"}, want{status: "canceled"}},
		{"unknown type", map[string]any{"type": "STOP"}, want{"", -32602, "Unknown control type: STOP"}, want{"", -32602, "Unknown control type: STOP"}},
		{"lower case", map[string]any{"type": "pause"}, want{"", -32602, "Unknown control type: pause"}, want{"", -32602, "Unknown control type: pause"}},
		{"missing type", map[string]any{}, want{"", -32602, "Invalid params: missing control type (PAUSE, RESUME or CANCEL)"}, want{"", -32602, "Invalid params: missing control type (PAUSE, RESUME or CANCEL)"}},
		{"non-string type", map[string]any{"type": 1}, want{"", -32602, "Invalid params: control type must be a string (PAUSE, RESUME or CANCEL)"}, want{"", -32602, "Invalid params: control type must be a string (PAUSE, RESUME or CANCEL)"}},
		{"params not an object", []any{"PAUSE"}, want{"", -32602, "Invalid params: params must be an object"}, want{"", -32602, "Invalid params: params must be an object"}},
	}
	check := func(t *testing.T, m msg, w want) {
		t.Helper()
		if w.status != "" {
			var res struct{ Status string }
			json.Unmarshal(m.Result, &res)
			if m.Error != nil || res.Status != w.status {
				t.Errorf("response %s, want status %q", m.raw, w.status)
			}
			return
		}
		if m.Error == nil || m.Error.Code != w.code || m.Error.Message != w.msg || string(m.Error.Data) != "null" {
			t.Errorf("response %s, want error %d %q", m.raw, w.code, w.msg)
		}
	}
	ts := newTestServer(t, Config{KillGrace: time.Second})
	for _, row := range rows {
		t.Run(row.name+"/no process", func(t *testing.T) {
			c := dial(t, ts.addr)
			c.connected()
			check(t, c.call("control", row.params), row.idle)
			c.assertWorks()
		})
		t.Run(row.name+"/running", func(t *testing.T) {
			c := dial(t, ts.addr)
			c.connected()
			pgid, _ := c.start("echo ready; sleep 300", nil)
			check(t, c.call("control", row.params), row.busy)
			if row.busy.status != "" {
				n, _ := c.until("process." + row.busy.status)
				if n.Params.Status != row.busy.status || n.Params.PGID != pgid || n.Params.ExitCode != nil || n.Params.Error != nil {
					t.Errorf("notification %s", n.raw)
				}
			}
			if row.busy.status != "canceled" {
				c.call("control", map[string]any{"type": "CANCEL"})
			}
			done, _ := c.until("process.completed")
			if done.Params.Error == nil || *done.Params.Error != "canceled" {
				t.Errorf("process.completed = %s, want error canceled", done.raw)
			}
			assertGroupGone(t, pgid)
			c.assertWorks()
		})
	}

	// PAUSE stops every member of the group, not only the leader, and RESUME starts them again.
	// This is the process group's way; TestContainment checks the cgroup's.
	t.Run("PAUSE and RESUME act on the whole group", func(t *testing.T) {
		ts := newTestServer(t, Config{KillGrace: time.Second, Cgroup: CgroupOff})
		c := dial(t, ts.addr)
		c.connected()
		// The output comes from a grandchild, a loop in a subshell of the leader, which records
		// in a file how far it got before it prints each number.
		counter := filepath.Join(t.TempDir(), "counter")
		pgid, _ := c.start(`(i=0; while :; do i=$((i+1)); echo $i > `+counter+`; echo $i; sleep 0.01; done); wait`, nil)
		check(t, c.call("control", map[string]any{"type": "PAUSE"}), want{status: "paused"})
		waitGroupState(t, pgid, stopped, "stopped")
		check(t, c.call("control", map[string]any{"type": "PAUSE"}), want{status: "paused"}) // no change
		waitGroupState(t, pgid, stopped, "stopped")
		b, err := os.ReadFile(counter)
		stoppedAt, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || stoppedAt == 0 {
			t.Fatalf("counter: %q, %v", b, err)
		}
		check(t, c.call("control", map[string]any{"type": "RESUME"}), want{status: "resumed"})
		waitGroupState(t, pgid, func(pid int, st byte) bool { return st != 'T' }, "running")
		// The stopped loop had printed at most stoppedAt; a later number shows it runs again.
		for {
			m := c.next()
			if n, _ := strconv.Atoi(strings.TrimSpace(m.Params.Data)); m.Method == "process.output" && n > stoppedAt {
				break
			}
		}
		c.call("control", map[string]any{"type": "CANCEL"})
		c.until("process.completed")
		assertGroupGone(t, pgid)
	})
}

// TestPartialLines guards against FIX_005_PARTIAL_LINES: the Python service marked any line
// ending in "..." as truncated, and a line over 8 MiB stopped its stream for good while the
// child blocked. A line over the limit must be cut at a character boundary and marked, the
// rest of it discarded without being held, and the next line delivered as usual.
func TestPartialLines(t *testing.T) {
	type line struct {
		data    string
		dropped int
	}
	const limit = 16
	a := func(n int) string { return strings.Repeat("a", n) }
	rows := []struct {
		name  string
		input string
		want  []line
	}{
		{"empty line", "\n", []line{{"\n", 0}}},
		{"no input", "", nil},
		{"short lines", "one\ntwo\n", []line{{"one\n", 0}, {"two\n", 0}}},
		{"exactly the limit", a(limit) + "\nnext\n", []line{{a(limit) + "\n", 0}, {"next\n", 0}}},
		{"limit+1", a(limit+1) + "\nnext\n", []line{{a(limit) + "...\n", 1}, {"next\n", 0}}},
		{"many times the limit", a(limit*100+7) + "\nnext\n", []line{{a(limit) + "...\n", limit*99 + 7}, {"next\n", 0}}},
		{"CRLF", "one\r\ntwo\r\n", []line{{"one\r\n", 0}, {"two\r\n", 0}}},
		{"CRLF at the limit", a(limit-1) + "\r\n", []line{{a(limit-1) + "\r\n", 0}}},
		{"lone CR stays in the line", "a\rb\n", []line{{"a\rb\n", 0}}},
		{"last line without newline", "one\ntwo", []line{{"one\n", 0}, {"two", 0}}},
		{"last line without newline at the limit", a(limit), []line{{a(limit), 0}}},
		{"truncated last line without newline", a(limit + 5), []line{{a(limit) + "...\n", 5}}},
		{"multi-byte character across the cut", a(limit-1) + "é" + "\n", []line{{a(limit-1) + "...\n", 2}}},
		{"4-byte character across the cut", a(limit-2) + "😀\n", []line{{a(limit-2) + "...\n", 4}}},
		{"character ending at the limit", a(limit-2) + "é" + "b\n", []line{{a(limit-2) + "é...\n", 1}}},
		{"invalid UTF-8 passes to the encoder", "\xff\xfeok\n", []line{{"\xff\xfeok\n", 0}}},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			var got []line
			err := readLines(strings.NewReader(row.input), limit, func(l []byte, dropped int, _ bool) error {
				got = append(got, line{string(l), dropped})
				return nil
			})
			if err != nil || !slices.Equal(got, row.want) {
				t.Errorf("readLines(%q) = %+v, %v; want %+v", row.input, got, err, row.want)
			}
			for _, l := range got {
				if len(l.data) > limit+len(truncMarker) {
					t.Errorf("line of %d bytes, limit %d", len(l.data), limit)
				}
			}
		})
	}

	encRows := []struct{ name, line, want string }{
		{"invalid UTF-8 becomes U+FFFD", "\xff\xfeok\n", "\uFFFD\uFFFDok\n"},
		{"control characters", "a\tb\x01\"\\\n", "a\tb\x01\"\\\n"},
		{"valid multi-byte", "é😀\n", "é😀\n"},
	}
	for _, row := range encRows {
		t.Run("encode/"+row.name, func(t *testing.T) {
			var m msg
			b := appendOutput(nil, "stdout", []byte(row.line), 0, 0)
			if err := json.Unmarshal(b, &m); err != nil || m.Params.Data != row.want || m.Params.Truncated {
				t.Errorf("appendOutput(%q) = %s (%v); want data %q", row.line, b, err, row.want)
			}
		})
	}

	t.Run("100 MB line through a 64 KiB limit", func(t *testing.T) {
		if testing.Short() {
			t.Skip("reads 100 MB")
		}
		const big, limit = 100 << 20, 64 << 10
		src := io.MultiReader(io.LimitReader(repeatReader('x'), big), strings.NewReader("\nafter\n"))
		var got []line
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		err := readLines(src, limit, func(l []byte, dropped int, _ bool) error {
			got = append(got, line{string(l[:min(len(l), 8)]) + strconv.Itoa(len(l)), dropped})
			return nil
		})
		runtime.ReadMemStats(&after)
		want := []line{{"xxxxxxxx" + strconv.Itoa(limit+len(truncMarker)), big - limit}, {"after\n6", 0}}
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("got %v, %v; want %v", got, err, want)
		}
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 8*limit {
			t.Errorf("allocated %d bytes for a 100 MB line, want at most %d", alloc, 8*limit)
		}
	})

	t.Run("real process", func(t *testing.T) {
		ts := newTestServer(t, Config{MaxLineBytes: 1024})
		c := dial(t, ts.addr)
		c.connected()
		out, done := c.run("head -c 300000 /dev/zero | tr '\\0' x; echo; echo after; printf 'x...\\n'", nil)
		want := []event{
			{Type: "stdout", Data: strings.Repeat("x", 1024) + "...\n", Truncated: true, DroppedBytes: 300000 - 1024},
			{Type: "stdout", Data: "after\n"},
			{Type: "stdout", Data: "x...\n"}, // ends in dots, but is not truncated
		}
		if !slices.Equal(out, want) || done.Status != "completed" {
			t.Errorf("output %+v\ncompleted %+v", out, done)
		}
	})
}

// repeatReader is an endless stream of one byte.
type repeatReader byte

func (r repeatReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

// TestCancellationCleanup guards against FIX_006_CANCELLED_CLEANUP: the Python service sent no
// process.completed after a cancel, left a paused group stopped, and leaked processes and
// sessions when a client vanished. Every way a run can end must end and reap the whole group,
// including a background grandchild and a child that ignores SIGTERM, and free what the
// session held. A run that was ended is failed with its cause whatever its exit code; a paused
// group gets SIGCONT, so that it can act on SIGTERM; and a group that exits within the kill
// grace is not killed.
func TestCancellationCleanup(t *testing.T) {
	const grace = 300 * time.Millisecond
	commands := []struct {
		name, command string
		exit          int           // how the leader ends: by SIGTERM, by SIGKILL after the grace, by its trap
		last          string        // the last line it prints, from its SIGTERM trap; "" for none
		grace         time.Duration // the server's kill grace
	}{
		{"background grandchild", "sleep 300 & echo ready; sleep 300", -int(syscall.SIGTERM), "", grace},
		{"ignores SIGTERM", "trap '' TERM; sleep 300 & echo ready; sleep 300", -int(syscall.SIGKILL), "", grace},
		// Exit code 0, yet failed with its cause: a status taken from the exit code alone
		// would say completed.
		{"exits 0 on SIGTERM", "trap 'exit 0' TERM; sleep 300 & echo ready; wait", 0, "", grace},
		// Its trap takes a quarter of the grace: no SIGKILL may cut it short. While paused, it
		// runs its trap only if SIGCONT reached it before the grace ran out.
		{"takes a while to exit on SIGTERM", "trap 'sleep 0.5; echo bye; exit 3' TERM; sleep 300 & echo ready; wait", 3, "bye\n", 2 * time.Second},
	}
	ends := []struct {
		name  string
		cause string // the error of process.completed, when the client sees it
		// end ends the run; after, if not nil, checks what follows its process.completed.
		end func(t *testing.T, ts *testServer, c *client, pgid int) (after func())
	}{
		{"CANCEL", "canceled", func(t *testing.T, ts *testServer, c *client, pgid int) func() {
			c.call("control", map[string]any{"type": "CANCEL"})
			return nil
		}},
		{"CANCEL while paused", "canceled", func(t *testing.T, ts *testServer, c *client, pgid int) func() {
			c.call("control", map[string]any{"type": "PAUSE"})
			waitPaused(t, ts, pgid)
			c.call("control", map[string]any{"type": "CANCEL"})
			return nil
		}},
		{"stream timeout", "stream timeout after 1s", nil}, // the run's timeout ends it
		{"client disconnect", "", func(t *testing.T, ts *testServer, c *client, pgid int) func() {
			c.close()
			return nil
		}},
		{"Shutdown", "server shutting down", func(t *testing.T, ts *testServer, c *client, pgid int) func() {
			shut := make(chan error, 1)
			go func() { shut <- ts.Shutdown(t.Context()) }() // returns once every session is over
			return func() {
				if _, err := c.read(); err != io.EOF || c.closed.code != 1001 {
					t.Errorf("after shutdown: %v, close code %d; want close 1001", err, c.closed.code)
				}
				if err := <-shut; err != nil {
					t.Errorf("Shutdown: %v", err)
				}
				if n := ts.sessions.len(); n != 0 {
					t.Errorf("sessions = %d after Shutdown returned, want 0", n)
				}
			}
		}},
	}
	for _, cmd := range commands {
		for _, end := range ends {
			t.Run(cmd.name+"/"+end.name, func(t *testing.T) {
				t.Parallel()
				ts := newTestServer(t, Config{KillGrace: cmd.grace})
				c := dial(t, ts.addr)
				c.connected()
				params := map[string]any{}
				if end.end == nil {
					params["timeout"] = 1
				}
				pgid, _ := c.start(cmd.command, params)
				var after func()
				if end.end != nil {
					after = end.end(t, ts, c, pgid)
				}
				if end.cause == "" {
					// The server closed the connection only after the session ended.
					if n := ts.sessions.len(); n != 0 {
						t.Errorf("sessions = %d after the session ended, want 0", n)
					}
				} else {
					done, before := c.until("process.completed")
					p := done.Params
					if p.Status != "failed" || p.Error == nil || *p.Error != end.cause || p.ExitCode == nil || *p.ExitCode != cmd.exit {
						t.Errorf("process.completed = %s, want failed with error %q and exit code %d",
							done.raw, end.cause, cmd.exit)
					}
					var last string
					for _, m := range before {
						if m.Method == "process.output" {
							last = m.Params.Data
						}
					}
					if cmd.last != "" && last != cmd.last {
						t.Errorf("last output %q, want %q from the SIGTERM trap", last, cmd.last)
					}
					if after != nil {
						after()
					} else {
						c.assertWorks()
					}
				}
				assertGroupGone(t, pgid)
			})
		}
	}

	// The leader exits by itself and leaves a member behind, which holds stdout: the run ends
	// the member too before it reports the leader's exit.
	t.Run("the leader exits, a member is left", func(t *testing.T) {
		t.Parallel()
		ts := newTestServer(t, Config{KillGrace: grace})
		c := dial(t, ts.addr)
		c.connected()
		pgid, first := c.start("sleep 300 & echo $!", nil)
		member, err := strconv.Atoi(strings.TrimSpace(first))
		if err != nil {
			t.Fatalf("first line %q, want the member's PID", first)
		}
		done, _ := c.until("process.completed")
		if p := done.Params; p.Status != "completed" || p.Error != nil || p.ExitCode == nil || *p.ExitCode != 0 {
			t.Errorf("process.completed = %s, want completed, exit code 0, no error", done.raw)
		}
		if st, ok := procStat(member); ok && st.state != 'Z' {
			t.Errorf("member %d is still alive after process.completed, state %c", member, st.state)
		}
		assertGroupGone(t, pgid)
		c.assertWorks()
	})

	// As in a program that embeds the package and never calls SetSubreaper, with process
	// groups: no member of a run's group is then a child of the server, and every run must
	// still end all of them. The test binary runs this test again in that setting.
	t.Run("without a subreaper", func(t *testing.T) {
		if os.Getenv(noSubreaperEnv) != "" {
			t.Skip("this is the run without a subreaper")
		}
		if testing.Short() {
			t.Skip("the whole test again, in a second test binary; it runs without -short")
		}
		t.Parallel()
		cmd := exec.Command(os.Args[0], "-test.run=^TestCancellationCleanup$", "-test.count=1",
			"-test.short="+strconv.FormatBool(testing.Short()))
		cmd.Env = append(os.Environ(), noSubreaperEnv+"=1", testCgroupEnv+"="+CgroupOff)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := runOwn(cmd); err != nil {
			t.Fatalf("TestCancellationCleanup without a subreaper, with process groups: %v\n%s", err, out.Bytes())
		}
	})
}
