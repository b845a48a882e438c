package ccexecutor

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// reattachWindowEnv, when set, replaces the window of every reattach test server: with
// CCEXECUTOR_TEST_REATTACH_WINDOW=0 each reattach test runs against a server without the
// extension, and must fail.
const reattachWindowEnv = "CCEXECUTOR_TEST_REATTACH_WINDOW"

// reattachConfig is cfg with the reattach window w, unless reattachWindowEnv overrides it.
func reattachConfig(t testing.TB, cfg Config, w time.Duration) Config {
	t.Helper()
	cfg.ReattachWindow = w
	if v, ok := os.LookupEnv(reattachWindowEnv); ok {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("%s=%q: %v", reattachWindowEnv, v, err)
		}
		cfg.ReattachWindow = d
	}
	return cfg
}

// rmsg is a message from the server, with the members that reattaching adds.
type rmsg struct {
	Method string          `json:"method"`
	ID     json.RawMessage `json:"id"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Params struct {
		SessionID      string   `json:"session_id"`
		ResumeToken    *string  `json:"resume_token"`
		ReattachWindow *float64 `json:"reattach_window"`
		Type           string   `json:"type"`
		Data           string   `json:"data"`
		Seq            *int64   `json:"seq"`
		Status         string   `json:"status"`
		PID            int      `json:"pid"`
		ExitCode       *int     `json:"exit_code"`
		Error          *string  `json:"error"`
	} `json:"params"`
	raw string
}

// rclient is a client that reattaches, as PROTOCOL.md (Reattach) describes one: it counts the
// messages it receives after the first connected, answers every Ping with a Pong echoing its
// payload once it has read everything before it, and reattaches with the token of the latest
// connected and its count.
type rclient struct {
	t *testing.T
	*client
	id       string   // the session's id
	token    string   // the resume_token of the latest connected
	tokens   []string // every token received, in order
	received int64    // messages received since the first connected, connected excluded
	msgs     []rmsg   // those messages, in order, across connections
	pings    []ping   // Pings answered, in order
	calls    int      // requests sent
}

// ping is a Ping a client answered.
type ping struct {
	at      int64 // how many messages the client had received then
	count   int64 // the count it carried, or -1 without one
	attachs int   // how many connections the client had made by then
}

// rattach connects to addr and reads connected, which must offer reattaching.
func rattach(t *testing.T, addr string) *rclient {
	t.Helper()
	c := &rclient{t: t, client: dial(t, addr)}
	c.expectConnected()
	return c
}

// expectConnected reads the connected that starts a connection: the first for a session, or
// one after a reattach, which must name the same session and bring a new token.
func (c *rclient) expectConnected() {
	c.t.Helper()
	m, err := c.readFrameMsg()
	if err != nil {
		c.t.Fatalf("waiting for connected: %v (close %d %q)", err, c.closed.code, c.closed.reason)
	}
	p := m.Params
	switch {
	case m.Method != "connected":
		c.t.Fatalf("first message %s, want connected", trim(m.raw))
	case c.id != "" && p.SessionID != c.id:
		c.t.Fatalf("connected after reattaching to %s names session %s", c.id, p.SessionID)
	}
	// Without a token the test goes on, to show what a lost connection then does to the run.
	token := ""
	if p.ResumeToken != nil {
		token = *p.ResumeToken
	}
	if len(token) != 32 || strings.Trim(token, "0123456789abcdef") != "" {
		c.t.Errorf("connected %s: want a resume_token of 32 hex digits", trim(m.raw))
	}
	if p.ReattachWindow == nil || *p.ReattachWindow <= 0 {
		c.t.Errorf("connected %s: want a positive reattach_window", trim(m.raw))
	}
	if slices.Contains(c.tokens, token) {
		c.t.Errorf("connected %s repeats an earlier token", trim(m.raw))
	}
	c.id, c.token = p.SessionID, token
	c.tokens = append(c.tokens, c.token)
}

// readFrameMsg reads the next text message of the current connection, answering Pings; a
// close frame is recorded and reported as io.EOF. It counts nothing.
func (c *rclient) readFrameMsg() (rmsg, error) {
	for {
		op, p, err := c.readFrame()
		switch {
		case err != nil:
			return rmsg{}, err
		case op == opClose:
			if len(p) >= 2 {
				c.closed.code, c.closed.reason = int(binary.BigEndian.Uint16(p)), string(p[2:])
			}
			return rmsg{}, io.EOF
		case op == opPing:
			if err := c.answer(p); err != nil {
				return rmsg{}, err
			}
			continue
		case op != opText:
			continue
		}
		m := rmsg{raw: string(p)}
		if err := json.Unmarshal(p, &m); err != nil {
			return rmsg{}, fmt.Errorf("frame %q: %v", p, err)
		}
		return m, nil
	}
}

// answer records a Ping with payload p and answers it with a Pong that echoes p.
func (c *rclient) answer(p []byte) error {
	pg := ping{at: c.received, count: -1, attachs: len(c.tokens)}
	if len(p) == 8 {
		pg.count = int64(binary.BigEndian.Uint64(p))
	}
	c.pings = append(c.pings, pg)
	return c.tryWriteFrame(opPong, p)
}

// read reads and counts the next message.
func (c *rclient) read() (rmsg, error) {
	m, err := c.readFrameMsg()
	if err != nil {
		return m, err
	}
	if m.Method == "connected" {
		return m, fmt.Errorf("connected in the middle of a connection: %s", trim(m.raw))
	}
	c.received++
	c.msgs = append(c.msgs, m)
	return m, nil
}

// next is read, failing the test on an error.
func (c *rclient) next() rmsg {
	c.t.Helper()
	m, err := c.read()
	if err != nil {
		c.t.Fatalf("read after %d messages: %v (close %d %q)", c.received, err, c.closed.code, c.closed.reason)
	}
	return m
}

// call sends a request and reads until its response.
func (c *rclient) call(method string, params any) rmsg {
	c.t.Helper()
	c.calls++
	id := strconv.Itoa(c.calls)
	c.send(map[string]any{"jsonrpc": "2.0", "method": method, "params": params, "id": id})
	for {
		if m := c.next(); m.Method == "" && string(m.ID) == strconv.Quote(id) {
			if m.Error != nil {
				c.t.Fatalf("%s: %s", method, trim(m.raw))
			}
			return m
		}
	}
}

// start executes command and reads until its first line of output; it returns the PID.
func (c *rclient) start(command string) int {
	c.t.Helper()
	r := c.call("execute", map[string]any{"command": command})
	var res struct{ PID int }
	json.Unmarshal(r.Result, &res)
	for {
		switch m := c.next(); m.Method {
		case "process.output":
			return res.PID
		case "process.completed":
			c.t.Fatalf("%q completed before printing: %s", command, trim(m.raw))
		}
	}
}

// readUntilCompleted reads until a process.completed, or until the connection fails, which it
// returns.
func (c *rclient) readUntilCompleted() error {
	for {
		m, err := c.read()
		if err != nil {
			return err
		}
		if m.Method == "process.completed" {
			return nil
		}
	}
}

// readUntilLost reads until the connection fails, which it must because l is cut. A reset
// fails the read by itself; a black hole the client notices as its own keep-alive would,
// which here is the socket closed once the proxy has cut l. A process.completed before the cut
// fails the test: the cut came too late to show anything.
func (c *rclient) readUntilLost(l *link) {
	c.t.Helper()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() { // returns at the cut, or when the reads below are over
		select {
		case <-l.cut:
			c.c.Close()
		case <-stop:
		}
	})
	defer wg.Wait()
	defer close(stop)
	for {
		m, err := c.read()
		if err != nil {
			select {
			case <-l.cut:
				return
			default:
				c.t.Fatalf("connection ended before the cut: %v (close %d %q)", err, c.closed.code, c.closed.reason)
			}
		}
		if m.Method == "process.completed" {
			c.t.Fatalf("the run completed before the cut: %s", trim(m.raw))
		}
	}
}

// reattachQuery is the query of a reattach handshake.
func reattachQuery(id, token, received string) string {
	return "/ws/mcp?" + url.Values{"session_id": {id}, "resume": {token}, "received": {received}}.Encode()
}

// reattach makes a new connection to addr that reattaches to the session, and reads its
// connected.
func (c *rclient) reattach(addr string) {
	c.t.Helper()
	nc, resp, err := dialTarget(c.t, addr, reattachQuery(c.id, c.token, strconv.FormatInt(c.received, 10)), nil, nil)
	if err != nil {
		c.t.Fatalf("reattach: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		c.t.Fatalf("reattach: HTTP %s", resp.Status)
	}
	if c.client != nil {
		c.client.c.Close()
	}
	c.client = nc
	c.expectConnected()
}

// assertResumeRefused makes a reattach handshake to addr with the given query values and
// checks that it is refused for reason, as PROTOCOL.md says: the -32004 error, a close frame
// 1008, then the end of the connection.
func assertResumeRefused(t *testing.T, addr, id, token, received, reason string) {
	t.Helper()
	c, resp, err := dialTarget(t, addr, reattachQuery(id, token, received), nil, nil)
	if err != nil {
		t.Fatalf("refused reattach: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("refused reattach: HTTP %s, want an upgrade", resp.Status)
	}
	want := `{"jsonrpc":"2.0","error":{"code":-32004,"message":"Resume refused: ` + reason + `","data":null}}`
	m, err := c.read()
	if err != nil || m.raw != want {
		t.Fatalf("reattach with received=%s: %q, %v; want %s", received, trim(m.raw), err, want)
	}
	if _, err := c.read(); err != io.EOF || c.closed.code != 1008 || c.closed.reason != "Resume refused" {
		t.Errorf("after the refusal: %v, close %d %q; want close 1008 Resume refused", err, c.closed.code, c.closed.reason)
	}
	if _, _, err := c.readFrame(); err != io.EOF {
		t.Errorf("after the close frame: %v, want the connection closed", err)
	}
}

// sessionCounts is what /health says of sessions.
type sessionCounts struct {
	Active   int  `json:"active_sessions"`
	Detached *int `json:"detached_sessions"`
}

func health(t testing.TB, ts *testServer) sessionCounts {
	t.Helper()
	resp, err := http.Get(ts.hs.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var h sessionCounts
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		t.Fatal(err)
	}
	return h
}

// assertRun checks what a client received of the one run it started, with the execute whose id
// is execID, for a run that prints want: the execute's response once, process.started once,
// output whose data makes want and whose seq counts from 1 without a gap or a repeat, then one
// process.completed, completed with exit code 0, last.
func (c *rclient) assertRun(want string, execID string) {
	c.t.Helper()
	var (
		data               bytes.Buffer
		responses, started int
		completed          []rmsg
		seq                int64
		badSeq             string
	)
	for _, m := range c.msgs {
		switch {
		case m.Method == "" && string(m.ID) == strconv.Quote(execID):
			responses++
		case m.Method == "process.started":
			started++
		case m.Method == "process.output":
			data.WriteString(m.Params.Data)
			seq++
			if badSeq == "" && (m.Params.Seq == nil || *m.Params.Seq != seq) {
				badSeq = fmt.Sprintf("line %d has %s", seq, trim(m.raw))
			}
		case m.Method == "process.completed":
			completed = append(completed, m)
		}
	}
	if responses != 1 || started != 1 {
		c.t.Errorf("the execute's response came %d times, process.started %d times; want once each", responses, started)
	}
	if badSeq != "" {
		c.t.Errorf("seq does not count the lines from 1: %s", badSeq)
	}
	if got := data.String(); got != want {
		i := 0
		for i < min(len(got), len(want)) && got[i] == want[i] {
			i++
		}
		c.t.Errorf("output of %d bytes differs from the %d expected at byte %d: got %q, want %q",
			len(got), len(want), i, got[i:min(i+40, len(got))], want[i:min(i+40, len(want))])
	}
	if len(completed) != 1 || completed[0].Params.Status != "completed" || completed[0].Params.ExitCode == nil || *completed[0].Params.ExitCode != 0 {
		var raws []string
		for _, m := range completed {
			raws = append(raws, trim(m.raw))
		}
		c.t.Errorf("process.completed %q; want one, completed with exit code 0", raws)
	} else if c.msgs[len(c.msgs)-1].Method != "process.completed" {
		c.t.Errorf("messages after process.completed: %s", trim(c.msgs[len(c.msgs)-1].raw))
	}
}

// mkfifo makes a named pipe in a test directory: a run that reads it waits for the test.
func mkfifo(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "gate")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// openGate lets a run that reads the fifo at path go on: it opens it for writing and closes it,
// so the reader gets the end of the file.
func openGate(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0) // a reader is waiting, so this does not block
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// lose cuts the client's current connection, which l carries, reads what arrives until the
// client notices, and waits until the server has detached the session.
func (c *rclient) lose(l *link, mode cutMode, logs *logWatch, detached int) {
	c.t.Helper()
	l.cutNow(mode)
	c.readUntilLost(l)
	waitDetached(c.t, logs, detached)
}

// waitDetached waits until the server has logged n detaches; it fails the test at once if a
// session closes instead, and after 20 s.
func waitDetached(t testing.TB, logs *logWatch, n int) {
	t.Helper()
	timer := time.NewTimer(20 * time.Second)
	defer timer.Stop()
	for {
		closed, _ := logs.count("session closed")
		got, changed := logs.count("session detached")
		switch {
		case got >= n:
			return
		case closed > 0:
			t.Fatalf("the session closed instead of detaching; log: %q", logs.messages())
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Fatalf("%d detaches were not logged within 20s; log: %q", n, logs.messages())
		}
	}
}

// TestReattach guards against the loss of a long run to a network blip when the server offers
// reattaching, and against a reattach that loses, repeats or misorders a message, or attaches
// to a session it has no right to. Every row but the two about a server without a window
// fails with the window at 0: run them so with CCEXECUTOR_TEST_REATTACH_WINDOW=0.
func TestReattach(t *testing.T) {
	t.Run("seq 1 200000 through a reset and a black hole", func(t *testing.T) {
		if testing.Short() {
			t.Skip("200000 lines; skipped with -short")
		}
		logs := newLogWatch()
		// A short ping interval and write wait, so that the server notices the black hole soon.
		ts := newTestServer(t, reattachConfig(t, Config{PingInterval: 300 * time.Millisecond, WriteWait: time.Second, Logger: slog.New(logs)}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		// The cuts fall in the middle of frames: after about a tenth of the run on the first
		// connection, then after about as much again on the second.
		cuts := []struct {
			after int64
			mode  cutMode
		}{{2_000_003, cutReset}, {2_000_001, cutHole}}
		p.last().cutAfter(cuts[0].after, cuts[0].mode)
		c.calls++
		c.send(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]any{"command": "seq 1 200000"}, "id": "1"})
		for i, cut := range cuts {
			c.readUntilLost(p.last())
			t.Logf("%v after %d messages", cut.mode, c.received)
			// The server notices a reset at once, a black hole by its Pings or write deadline;
			// the client reattaches only then, so that this is no takeover.
			waitDetached(t, logs, i+1)
			if h := health(t, ts); h.Active != 1 || h.Detached == nil || *h.Detached != 1 {
				t.Errorf("/health while detached: %+v; want 1 active session, 1 detached", h)
			}
			c.reattach(p.addr())
			if i+1 < len(cuts) {
				p.last().cutAfter(cuts[i+1].after, cuts[i+1].mode)
			}
		}
		if err := c.readUntilCompleted(); err != nil {
			t.Fatalf("after the cuts: %v", err)
		}
		c.assertRun(string(seqOutput(200000)), "1")
		c.assertPingCounts()
	})

	t.Run("long lines, cut in the middle of one", func(t *testing.T) {
		// Each line's JSON is twice its length (a quote escapes to two bytes), longer than a
		// frame the server encodes whole: the writer escapes it as it writes.
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{PingInterval: 300 * time.Millisecond, WriteWait: time.Second, Logger: slog.New(logs)}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		l := p.last()
		l.cutAfter(500_001, cutHole)
		c.calls++
		c.send(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]any{
			"command": `for i in 1 2 3 4 5; do head -c 200000 /dev/zero | tr '\0' '"'; echo; done`}, "id": "1"})
		c.readUntilLost(l)
		waitDetached(t, logs, 1)
		c.reattach(p.addr())
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		c.assertRun(strings.Repeat(strings.Repeat(`"`, 200000)+"\n", 5), "1")
	})

	t.Run("cut while paused, RESUME after reattaching", func(t *testing.T) {
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{Logger: slog.New(logs)}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		gate := mkfifo(t)
		pgid := c.start("seq 1 1000; cat " + gate + " >/dev/null; seq 1001 2000") // execute: id 1
		c.call("control", map[string]any{"type": "PAUSE"})                        // id 2
		waitPaused(t, ts, pgid)
		c.lose(p.last(), cutReset, logs, 1)
		c.reattach(p.addr())
		waitPaused(t, ts, pgid)                             // a reattach changes nothing for the run
		c.call("control", map[string]any{"type": "RESUME"}) // id 3
		openGate(t, gate)
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		c.assertRun(string(seqOutput(2000)), "1")
		n := map[string]int{}
		for _, m := range c.msgs {
			if m.Method == "" {
				n[string(m.ID)]++
			}
		}
		if n[`"2"`] != 1 || n[`"3"`] != 1 {
			t.Errorf("PAUSE answered %d times, RESUME %d times; want once each", n[`"2"`], n[`"3"`])
		}
	})

	t.Run("nobody returns: the window ends the run", func(t *testing.T) {
		logs := newLogWatch()
		const window = 500 * time.Millisecond
		ts := newTestServer(t, reattachConfig(t, Config{KillGrace: 200 * time.Millisecond, Logger: slog.New(logs)}, window))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		pgid := c.start("echo ready; sleep 300")
		lost := time.Now()
		c.lose(p.last(), cutReset, logs, 1)
		if err := syscall.Kill(-pgid, 0); err != nil {
			t.Errorf("the run's group is gone once the session is detached: %v", err)
		}
		if h := health(t, ts); h.Active != 1 || h.Detached == nil || *h.Detached != 1 {
			t.Errorf("/health while detached: %+v; want 1 active session, 1 detached", h)
		}
		logs.wait(t, "session closed", 1, window+20*time.Second)
		if d := time.Since(lost); d < window {
			t.Errorf("the session ended %v after the cut, before its window of %v", d, window)
		}
		assertGroupGone(t, pgid)
		if n := ts.sessions.len(); n != 0 {
			t.Errorf("sessions = %d, want 0", n)
		}
		if h := health(t, ts); h.Active != 0 || h.Detached == nil || *h.Detached != 0 {
			t.Errorf("/health after the window: %+v; want no session", h)
		}
		if causes := logs.attrs("run ended", "cause"); len(causes) != 1 || causes[0] != "client disconnected" {
			t.Errorf("run ended with causes %q, want client disconnected", causes)
		}
		assertResumeRefused(t, ts.addr, c.id, c.token, strconv.FormatInt(c.received, 10), "unknown session or token")
	})

	t.Run("a spent or wrong token is refused, and spends nothing", func(t *testing.T) {
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{Logger: slog.New(logs)}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		c.runEcho()
		spent := c.token
		c.lose(p.last(), cutReset, logs, 1)
		c.reattach(p.addr())
		received := strconv.FormatInt(c.received, 10)
		for _, token := range []string{
			spent,
			newToken(""),
			strings.ToUpper(c.token),
			c.token[:31],
			c.token + "0",
			"",
		} {
			assertResumeRefused(t, ts.addr, c.id, token, received, "unknown session or token")
		}
		c.runEcho() // the session is still attached where it was
		// The current token still works: a reattach with it takes the session over.
		c2 := &rclient{t: t, id: c.id, token: c.token, tokens: c.tokens, received: c.received}
		c2.reattach(ts.addr)
		c2.runEcho()
	})

	t.Run("the token of another session is refused", func(t *testing.T) {
		ts := newTestServer(t, reattachConfig(t, Config{}, time.Minute))
		a, b := rattach(t, ts.addr), rattach(t, ts.addr)
		a.runEcho()
		b.runEcho()
		assertResumeRefused(t, ts.addr, b.id, a.token, "0", "unknown session or token")
		assertResumeRefused(t, ts.addr, a.id, b.token, "0", "unknown session or token")
		assertResumeRefused(t, ts.addr, "", a.token, "0", "unknown session or token")
		a.runEcho()
		b.runEcho()
		a2 := &rclient{t: t, id: a.id, token: a.token, tokens: a.tokens, received: a.received}
		a2.reattach(ts.addr) // a's token still works, for a
		a2.runEcho()
	})

	t.Run("takeover", func(t *testing.T) {
		ts := newTestServer(t, reattachConfig(t, Config{}, time.Minute))
		old := rattach(t, ts.addr)
		gate := mkfifo(t)
		old.start("seq 1 1000; cat " + gate + " >/dev/null; seq 1001 2000")
		for m := old.next(); m.Params.Data != "500\n"; m = old.next() {
		}
		n := old.received
		c := &rclient{t: t, id: old.id, token: old.token, tokens: old.tokens, received: n, msgs: slices.Clone(old.msgs), calls: old.calls}
		c.reattach(ts.addr)
		// The old connection gets what was already on its way, then the close frame that says
		// why, then the end of the connection.
		var extra []rmsg
		for {
			m, err := old.read()
			if err != nil {
				if err != io.EOF || old.closed.code != 4001 || old.closed.reason != "Session taken over by another connection" {
					t.Errorf("old connection: %v, close %d %q; want close 4001 Session taken over by another connection", err, old.closed.code, old.closed.reason)
				}
				break
			}
			extra = append(extra, m)
		}
		if _, _, err := old.readFrame(); err != io.EOF {
			t.Errorf("old connection after its close frame: %v, want the end", err)
		}
		openGate(t, gate)
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		c.assertRun(string(seqOutput(2000)), "1")
		for i, m := range extra {
			if int(n)+i >= len(c.msgs) || c.msgs[int(n)+i].raw != m.raw {
				t.Fatalf("message %d of the old connection %s differs from the new one's", int(n)+i+1, trim(m.raw))
			}
		}
	})

	t.Run("the buffer bound holds while detached", func(t *testing.T) {
		if testing.Short() {
			t.Skip("8 MB of output; skipped with -short")
		}
		const (
			buffer = 64 << 10
			lines  = 8000 // of 1000 bytes: far more than the buffer, the pipe and the reader hold
		)
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{ReattachBuffer: buffer, PingInterval: 300 * time.Millisecond, WriteWait: time.Second, Logger: slog.New(logs)}, time.Minute))
		// The client gets the first 3000 bytes: what the server holds then is nearly all of
		// what it sent.
		c, p, pid := runIntoHole(t, ts, logs, lines)
		waitDetached(t, logs, 1)
		n := c.received
		wrote := waitPipeFull(t, pid) // the run waits
		c.reattach(p.addr())
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		var want strings.Builder
		for i := 1; i <= lines; i++ {
			fmt.Fprintf(&want, "%0999d\n", i)
		}
		c.assertRun(want.String(), "1")
		// What the server held is what it replayed: the messages between the new connected
		// and the first Ping after it, which counts every message sent before it.
		i := slices.IndexFunc(c.pings, func(p ping) bool { return p.attachs == 2 })
		if i < 0 || c.pings[i].count != c.pings[i].at {
			t.Fatalf("pings %+v: want one after the replay, counting what came before it", c.pings)
		}
		replayed, before := frameBytes(c.msgs[n:c.pings[i].at]), frameBytes(c.msgs[:n])
		t.Logf("the run wrote %d bytes (it has a 1 MiB pipe); %d messages of %d bytes replayed after %d of %d bytes received",
			wrote, c.pings[i].at-n, replayed, n, before)
		// A batch of this run is at most maxBatch bytes and a line's frame.
		if limit := buffer + maxBatch + frameBytes(c.msgs[n:n+1]); replayed > limit {
			t.Errorf("%d bytes replayed: more than the buffer and a batch (%d)", replayed, limit)
		}
		// The run waits only once the buffer is full. The server held the messages the client
		// had not acknowledged: at most those it received, and those replayed.
		if replayed+before < buffer {
			t.Errorf("%d bytes replayed after %d received: the run waited before the buffer was full", replayed, before)
		}
	})

	t.Run("the run ends while detached", func(t *testing.T) {
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{PingInterval: 300 * time.Millisecond, WriteWait: time.Second, Logger: slog.New(logs)}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		gate := mkfifo(t)
		c.start("seq 1 1000; cat " + gate + " >/dev/null; seq 1001 2000")
		c.lose(p.last(), cutHole, logs, 1)
		openGate(t, gate)
		logs.wait(t, "run ended", 1, 20*time.Second)
		c.reattach(p.addr())
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		c.assertRun(string(seqOutput(2000)), "1")
		c.runEcho()
	})

	t.Run("the stream timeout ends a detached run", func(t *testing.T) {
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{StreamTimeout: 300 * time.Millisecond, KillGrace: 200 * time.Millisecond, Logger: slog.New(logs)}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		pgid := c.start("echo ready; sleep 300")
		c.lose(p.last(), cutReset, logs, 1)
		logs.wait(t, "run ended", 1, 20*time.Second)
		assertGroupGone(t, pgid)
		c.reattach(p.addr())
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		done := c.msgs[len(c.msgs)-1].Params
		if done.Status != "failed" || done.Error == nil || *done.Error != "stream timeout after 0.3s" {
			t.Errorf("process.completed %+v; want failed, stream timeout after 0.3s", done)
		}
		c.runEcho()
	})

	t.Run("Shutdown ends a detached session", func(t *testing.T) {
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{KillGrace: 200 * time.Millisecond, Logger: slog.New(logs)}, time.Hour))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		pgid := c.start("echo ready; sleep 300")
		c.lose(p.last(), cutReset, logs, 1)
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		if err := ts.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown with a detached session: %v", err)
		}
		assertGroupGone(t, pgid)
		if causes := logs.attrs("run ended", "cause"); len(causes) != 1 || causes[0] != "server shutting down" {
			t.Errorf("run ended with causes %q, want server shutting down", causes)
		}
	})

	t.Run("takeover of a black-holed connection", func(t *testing.T) {
		// The server has not noticed the black hole: its writer may be stuck on it when the
		// client comes back.
		ts := newTestServer(t, reattachConfig(t, Config{}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		l := p.last()
		l.cutAfter(300_001, cutHole)
		c.calls++
		c.send(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]any{"command": "seq 1 100000"}, "id": "1"})
		c.readUntilLost(l)
		c.reattach(p.addr())
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		c.assertRun(string(seqOutput(100000)), "1")
	})

	t.Run("takeover while the writer is stuck on the old connection", func(t *testing.T) {
		// A black hole after a few bytes, a long write wait, and a buffer that holds the whole
		// run: once the run waits on its full pipe, the writer is stuck in a write to the old
		// connection, which only the takeover's short deadline ends before the write wait.
		if testing.Short() {
			t.Skip("20 MB of output; skipped with -short")
		}
		const lines = 20000 // of 1000 bytes: more than the socket buffers and the pipe hold
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{ReattachBuffer: 64 << 20, WriteWait: time.Minute, PingInterval: time.Minute, Logger: slog.New(logs)}, time.Minute))
		c, p, pid := runIntoHole(t, ts, logs, lines)
		waitPipeFull(t, pid)
		c.reattach(p.addr()) // waits 20 s at most for connected
		if err := c.readUntilCompleted(); err != nil {
			t.Fatal(err)
		}
		var want strings.Builder
		for i := 1; i <= lines; i++ {
			fmt.Fprintf(&want, "%0999d\n", i)
		}
		c.assertRun(want.String(), "1")
	})

	// A close frame or a protocol error ends the session as without a window: the run ends,
	// process.completed, the close frame that answers, and the connection closes once the slot
	// is free.
	for _, row := range []struct {
		name    string
		command string // "" for no run
		frame   []byte
		code    int
	}{
		{"a close frame during a run ends the session", "echo ready; sleep 300", closeWire(1000, ""), 1000},
		{"a close frame ends an idle session", "", closeWire(1001, ""), 1001},
		{"a protocol error during a run ends the session", "echo ready; sleep 300", wire(0x83, "reserved"), 1002},
	} {
		t.Run(row.name, func(t *testing.T) {
			logs := newLogWatch()
			ts := newTestServer(t, reattachConfig(t, Config{KillGrace: 200 * time.Millisecond, Logger: slog.New(logs)}, time.Minute))
			c := rattach(t, ts.addr)
			pgid := 0
			if row.command != "" {
				pgid = c.start(row.command)
			}
			c.rawWrite(row.frame)
			before, p := c.untilClosed()
			n := len(before)
			if closeCode(p) != row.code || pgid != 0 && (n == 0 || !strings.Contains(before[n-1], `"client disconnected"`)) {
				t.Errorf("frames %q, then close %d; want process.completed (client disconnected) if a run, then close %d", before, closeCode(p), row.code)
			}
			if n := ts.sessions.len(); n != 0 {
				t.Errorf("sessions = %d once the connection closed, want 0", n)
			}
			if pgid != 0 {
				assertGroupGone(t, pgid)
			}
			if n, _ := logs.count("session detached"); n != 0 {
				t.Errorf("the session detached %d times", n)
			}
			assertResumeRefused(t, ts.addr, c.id, c.token, strconv.FormatInt(c.received, 10), "unknown session or token")
		})
	}

	t.Run("the access rules apply to a reattach", func(t *testing.T) {
		ts := newTestServer(t, reattachConfig(t, Config{Token: "secret"}, time.Minute))
		auth := http.Header{"Authorization": {"Bearer secret"}}
		nc, resp, err := dialTarget(t, ts.addr, "/ws/mcp", auth, nil)
		if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("dial: %v %v", resp, err)
		}
		c := &rclient{t: t, client: nc}
		c.expectConnected()
		c.runEcho()
		for _, h := range []http.Header{nil, {"Authorization": {"Bearer wrong"}}, {"Origin": {"http://evil.example"}, "Authorization": {"Bearer secret"}}} {
			_, resp, err := dialTarget(t, ts.addr, reattachQuery(c.id, c.token, strconv.FormatInt(c.received, 10)), h, nil)
			if err != nil || resp.StatusCode == http.StatusSwitchingProtocols {
				t.Errorf("reattach with headers %v: %v, %v; want it refused before the upgrade", h, resp.Status, err)
			}
		}
		// The token was not spent: with the access token, it reattaches.
		nc, resp, err = dialTarget(t, ts.addr, reattachQuery(c.id, c.token, strconv.FormatInt(c.received, 10)), auth, nil)
		if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("reattach: %v %v", resp, err)
		}
		c.client = nc
		c.expectConnected()
		c.runEcho()
	})

	t.Run("a reattach on /ws, at the session limit", func(t *testing.T) {
		logs := newLogWatch()
		ts := newTestServer(t, reattachConfig(t, Config{MaxSessions: 1, Logger: slog.New(logs)}, time.Minute))
		p := newCutProxy(t, ts.addr)
		c := rattach(t, p.addr())
		c.runEcho()
		c.lose(p.last(), cutReset, logs, 1)
		// The detached session keeps its slot.
		other := dial(t, ts.addr)
		assertRefused(t, other, other.next())
		nc, resp, err := dialTarget(t, p.addr(), "/ws?"+strings.TrimPrefix(reattachQuery(c.id, c.token, strconv.FormatInt(c.received, 10)), "/ws/mcp?"), nil, nil)
		if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("reattach on /ws: %v %v", resp, err)
		}
		c.client.c.Close()
		c.client = nc
		c.expectConnected()
		c.runEcho()
	})

	t.Run("the connection taken over is not read", func(t *testing.T) {
		ts := newTestServer(t, reattachConfig(t, Config{}, time.Minute))
		old := rattach(t, ts.addr)
		old.runEcho()
		c := &rclient{t: t, id: old.id, token: old.token, tokens: old.tokens, received: old.received}
		c.reattach(ts.addr)
		marker := filepath.Join(t.TempDir(), "marker")
		// Sent after the takeover; the server may have closed the connection already.
		old.tryWriteFrame(opText, fmt.Appendf(nil, `{"jsonrpc":"2.0","method":"execute","params":{"command":"touch %s"},"id":"old"}`, marker))
		c.runEcho()
		if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the execute sent on the connection taken over ran: %v", err)
		}
		for _, m := range c.msgs {
			if string(m.ID) == `"old"` {
				t.Errorf("the new connection got the answer to the old one's request: %s", trim(m.raw))
			}
		}
	})

	t.Run("refused positions", func(t *testing.T) {
		ts := newTestServer(t, reattachConfig(t, Config{PingInterval: 50 * time.Millisecond}, time.Minute))
		c := rattach(t, ts.addr)
		c.runEcho()
		sent := c.received // everything sent was received: the run completed
		addr, id, token := ts.addr, c.id, c.token
		for _, row := range []struct{ received, reason string }{
			{strconv.FormatInt(sent+1, 10), fmt.Sprintf("received %d but only %d messages were sent", sent+1, sent)},
			{"18446744073709551615", fmt.Sprintf("received 18446744073709551615 but only %d messages were sent", sent)},
			{"-1", "invalid received"},
			{"1.5", "invalid received"},
			{"x", "invalid received"},
			{"18446744073709551616", "invalid received"},
		} {
			assertResumeRefused(t, addr, id, token, row.received, row.reason)
		}
		// Once a Pong acknowledged every message, no reattach can ask for them again.
		c.awaitAck(sent)
		c.runEcho() // the server read the Pong before this execute
		assertResumeRefused(t, addr, id, token, "0", fmt.Sprintf("messages up to %d were acknowledged and are no longer held", sent))
		c.runEcho() // none of them changed anything
		c2 := &rclient{t: t, id: c.id, token: c.token, tokens: c.tokens, received: c.received}
		c2.reattach(ts.addr)
		c2.runEcho()
	})

	// The members the extension adds, where PROTOCOL.md puts them; without a window, the
	// bytes of the protocol without the extension.
	for _, row := range []struct {
		name      string
		window    time.Duration
		connected string // after the session id; TOKEN stands for the token
		out       []string
		ping      []byte
	}{
		{"wire bytes without a window", 0, `","version":"1.0.0","capabilities":["execute","control","stream"]}}`, []string{
			`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"a\n","truncated":false}}`,
			`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"0123456789...\n","truncated":true,"dropped_bytes":6}}`,
		}, []byte{}},
		{"wire bytes with a window", time.Minute, `","version":"1.0.0","capabilities":["execute","control","stream"],"resume_token":"TOKEN","reattach_window":60}}`, []string{
			`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"a\n","truncated":false,"seq":1}}`,
			`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"0123456789...\n","truncated":true,"dropped_bytes":6,"seq":2}}`,
		}, []byte{0, 0, 0, 0, 0, 0, 0, 5}}, // the response, process.started, two lines, process.completed
	} {
		t.Run(row.name, func(t *testing.T) {
			cfg := Config{PingInterval: 50 * time.Millisecond, MaxLineBytes: 10}
			if row.window > 0 {
				cfg = reattachConfig(t, cfg, row.window)
			}
			ts := newTestServer(t, cfg)
			c := dial(t, ts.addr)
			m := c.next()
			var p struct {
				Params struct {
					SessionID   string `json:"session_id"`
					ResumeToken string `json:"resume_token"`
				} `json:"params"`
			}
			json.Unmarshal([]byte(m.raw), &p)
			want := `{"jsonrpc":"2.0","method":"connected","params":{"session_id":"` + p.Params.SessionID +
				strings.Replace(row.connected, "TOKEN", p.Params.ResumeToken, 1)
			if m.raw != want || row.window > 0 && len(p.Params.ResumeToken) != 32 {
				t.Errorf("connected:\n%s\nwant\n%s", m.raw, want)
			}
			c.call("execute", map[string]any{"command": "echo a; echo 0123456789abcdef"})
			_, before := c.until("process.completed")
			var out []string
			for _, m := range before {
				if m.Method == "process.output" {
					out = append(out, m.raw)
				}
			}
			if !slices.Equal(out, row.out) {
				t.Errorf("output:\n%s\nwant\n%s", strings.Join(out, "\n"), strings.Join(row.out, "\n"))
			}
			for {
				op, payload, err := c.readFrame()
				if err != nil {
					t.Fatalf("waiting for a Ping: %v", err)
				}
				if op == opPing {
					if !bytes.Equal(payload, row.ping) {
						t.Errorf("Ping payload %q, want %q", payload, row.ping)
					}
					break
				}
			}
		})
	}

	t.Run("without a window, a reattach is refused", func(t *testing.T) {
		ts := newTestServer(t, Config{}) // not reattachConfig: this row is about the window 0
		c := dial(t, ts.addr)
		c.connected()
		assertResumeRefused(t, ts.addr, "", newToken(""), "0", "reattach is not enabled")
		c.assertWorks()
	})
}

// assertPingCounts checks that every Ping the client answered counted the messages sent before
// it, all of which the client had read: PROTOCOL.md's acknowledgement.
func (c *rclient) assertPingCounts() {
	c.t.Helper()
	if len(c.pings) == 0 {
		c.t.Errorf("no Ping")
	}
	for _, p := range c.pings {
		if p.count != p.at {
			c.t.Errorf("a Ping counted %d messages sent before it, on connection %d after %d received", p.count, p.attachs, p.at)
			return
		}
	}
}

// runEcho runs echo ok on the session, which must still work.
func (c *rclient) runEcho() {
	c.t.Helper()
	start := len(c.msgs)
	c.call("execute", map[string]any{"command": "echo ok"})
	if err := c.readUntilCompleted(); err != nil {
		c.t.Fatal(err)
	}
	var out []string
	for _, m := range c.msgs[start:] {
		if m.Method == "process.output" {
			out = append(out, m.Params.Data)
		}
	}
	if last := c.msgs[len(c.msgs)-1]; len(out) != 1 || out[0] != "ok\n" || last.Params.Status != "completed" {
		c.t.Fatalf("echo ok: output %q, then %s", out, trim(last.raw))
	}
}

// awaitAck reads frames until it has answered a Ping that counts n messages or more: the Pong
// acknowledges them.
func (c *rclient) awaitAck(n int64) {
	c.t.Helper()
	for len(c.pings) == 0 || c.pings[len(c.pings)-1].count < n {
		op, p, err := c.readFrame()
		if err != nil {
			c.t.Fatalf("waiting for a Ping: %v", err)
		}
		if op != opPing {
			c.t.Fatalf("frame %#x %q while waiting for a Ping", op, p)
		}
		if err := c.answer(p); err != nil {
			c.t.Fatalf("answering a Ping: %v", err)
		}
	}
}

// runIntoHole starts `seq -f %0999g 1 lines`, lines of 1000 bytes, on a session of ts through a
// cutProxy that black-holes the connection after 3000 bytes from the server, and reads until
// the client notices. It returns the client, the proxy and the PID of the run, which logs saw
// start.
func runIntoHole(t *testing.T, ts *testServer, logs *logWatch, lines int) (*rclient, *cutProxy, int) {
	t.Helper()
	p := newCutProxy(t, ts.addr)
	c := rattach(t, p.addr())
	l := p.last()
	l.cutAfter(3000, cutHole)
	c.calls++
	c.send(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]any{"command": fmt.Sprintf("exec seq -f %%0999g 1 %d", lines)}, "id": "1"})
	c.readUntilLost(l)
	pids := logs.attrs("run started", "pid")
	if len(pids) != 1 {
		t.Fatalf("runs started: %q", pids)
	}
	pid, _ := strconv.Atoi(pids[0])
	return c, p, pid
}

// waitPipeFull waits until process pid sleeps writing to its stdout, and that pipe, which this
// process reads, has no room for another page: nobody takes the run's output, and the run waits
// on its pipe. It fails the test if pid ends first, since a run whose output nobody takes must
// wait, and returns how many bytes pid has written (wchar in /proc/pid/io). A server that lets
// the run wait too early or too late still fails the checks of what it held.
func waitPipeFull(t testing.TB, pid int) int64 {
	t.Helper()
	fd := readEnd(t, pid)
	tick := time.NewTicker(10 * time.Millisecond) // a poll interval of /proc
	defer tick.Stop()
	deadline := time.After(30 * time.Second)
	for {
		wchan, err1 := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", pid))
		io, err2 := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
		if st, ok := procStat(pid); !ok || st.state == 'Z' || err1 != nil || err2 != nil {
			t.Fatalf("process %d ended while nobody took its output: the run did not wait", pid)
		}
		var wrote int64 = -1
		for l := range strings.Lines(string(io)) {
			if v, ok := strings.CutPrefix(l, "wchar: "); ok {
				wrote, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			}
		}
		var held, size int32
		syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), syscall.TIOCINQ, uintptr(unsafe.Pointer(&held)))
		r, _, _ := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), 1032 /* F_GETPIPE_SZ */, 0)
		size = int32(r)
		if strings.Contains(string(wchan), "pipe_write") && size > 0 && held > size-4096 {
			return wrote
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("process %d did not come to wait on a full pipe within 30s (wchan %s, %d of %d bytes in its pipe)", pid, wchan, held, size)
		}
	}
}

// readEnd returns this process's descriptor of the pipe that is the stdout of process pid.
func readEnd(t testing.TB, pid int) int {
	t.Helper()
	pipe, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/1", pid))
	if err != nil || !strings.HasPrefix(pipe, "pipe:") {
		t.Fatalf("stdout of process %d: %q, %v; want a pipe", pid, pipe, err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range fds {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && l == pipe {
			fd, _ := strconv.Atoi(e.Name())
			return fd
		}
	}
	t.Fatalf("no descriptor of %s in this process", pipe)
	return -1
}

// frameBytes is the size of the text frames that carried msgs, as the server sent them.
func frameBytes(msgs []rmsg) int {
	n := 0
	for _, m := range msgs {
		switch l := len(m.raw); {
		case l <= 125:
			n += 2 + l
		case l <= 0xffff:
			n += 4 + l
		default:
			n += 10 + l
		}
	}
	return n
}

// BenchmarkReattachBuffer measures the memory of a detached session whose buffer is full and
// whose run waits on its pipe: the heap and goroutine stacks in use per session (heap-B/session,
// stack-B/session), with b.N such sessions at once. The pipe's buffer is the kernel's and is not
// counted.
//
//	go test -run '^$' -bench ReattachBuffer -benchtime 20x
func BenchmarkReattachBuffer(b *testing.B) {
	for _, buffer := range []int{64 << 10, ReattachBuffer} {
		b.Run(fmt.Sprintf("buffer=%d", buffer), func(b *testing.B) {
			logs := newLogWatch()
			addr := newTestServer(b, Config{ReattachWindow: time.Hour, ReattachBuffer: buffer, MaxSessions: b.N + 1, Logger: slog.New(logs)}).addr
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			for i := range b.N {
				detachRun(b, addr, "exec seq -f %0999g 1 100000")
				waitDetached(b, logs, i+1)
				pids := logs.attrs("run started", "pid")
				pid, _ := strconv.Atoi(pids[i])
				waitPipeFull(b, pid)
			}
			b.StopTimer()
			runtime.GC()
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(b.N), "heap-B/session")
			b.ReportMetric(float64(int64(after.StackInuse)-int64(before.StackInuse))/float64(b.N), "stack-B/session")
		})
	}
}

// detachRun opens a session on addr, starts command, and once its first line arrived closes
// the connection without a close frame: the session detaches with its run going on.
func detachRun(b *testing.B, addr, command string) {
	c := dialBench(b, addr)
	defer c.c.Close()
	c.execute(command)
	for !bytes.Contains(c.next(), []byte(`"method":"process.output"`)) {
	}
}
