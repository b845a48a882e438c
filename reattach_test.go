package ccexecutor

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"
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
	pings    int      // Pings answered
	acked    int64    // the count of the last Ping answered
	calls    int      // requests sent
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
	case p.ResumeToken == nil || len(*p.ResumeToken) != 32:
		c.t.Fatalf("connected %s: want a resume_token of 32 hex digits", trim(m.raw))
	case p.ReattachWindow == nil || *p.ReattachWindow <= 0:
		c.t.Fatalf("connected %s: want a positive reattach_window", trim(m.raw))
	case c.id != "" && p.SessionID != c.id:
		c.t.Fatalf("connected after reattaching to %s names session %s", c.id, p.SessionID)
	}
	for _, old := range c.tokens {
		if *p.ResumeToken == old {
			c.t.Fatalf("connected %s repeats an earlier token", trim(m.raw))
		}
	}
	c.id, c.token = p.SessionID, *p.ResumeToken
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
			if len(p) == 8 {
				c.acked = int64(binary.BigEndian.Uint64(p))
			}
			c.pings++
			if err := c.tryWriteFrame(opPong, p); err != nil {
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
	c.client.c.Close()
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

// waitDetached waits until /health counts n detached sessions. Nothing in the server's log or
// on the wire says when the server has noticed a lost connection, so this polls, up to 20 s.
func waitDetached(t testing.TB, ts *testServer, n int) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond) // a poll interval, not a wait for things to settle
	defer tick.Stop()
	deadline := time.After(20 * time.Second)
	for {
		h := health(t, ts)
		if h.Detached != nil && *h.Detached == n {
			return
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("/health %+v: want %d detached sessions", h, n)
		}
	}
}

// transcript is what a client received of one run, checked for a run that prints want: the
// execute's response once, process.started once, output whose data makes want and whose seq
// counts from 1 without a gap or a repeat, then one process.completed, last.
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

// TestReattach guards against the loss of a long run to a network blip when the server offers
// reattaching, and against a reattach that loses, repeats or misorders a message, or attaches
// to a session it has no right to.
func TestReattach(t *testing.T) {
	t.Run("seq 1 200000 through a reset and a black hole", func(t *testing.T) {
		if testing.Short() {
			t.Skip("200000 lines; skipped with -short")
		}
		ts := newTestServer(t, reattachConfig(t, Config{PingInterval: 200 * time.Millisecond, WriteWait: 500 * time.Millisecond}, time.Minute))
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
		for _, cut := range cuts {
			l := p.last()
			c.readUntilLost(l)
			t.Logf("%v after %d messages", cut.mode, c.received)
			if cut.mode == cutHole {
				waitDetached(t, ts, 1) // the server noticed the black hole by itself
			}
			c.reattach(p.addr())
			if cut == cuts[0] {
				p.last().cutAfter(cuts[1].after, cuts[1].mode)
			}
		}
		if err := c.readUntilCompleted(); err != nil {
			t.Fatalf("after the cuts: %v", err)
		}
		c.assertRun(string(seqOutput(200000)), "1")
		if h := health(t, ts); h.Active != 1 || h.Detached == nil || *h.Detached != 0 {
			t.Errorf("/health %+v; want 1 active session, none detached", h)
		}
	})
}
