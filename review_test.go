package ccexecutor

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// readToClose reads c's frames, answering no Ping, until a close frame, whose code it returns
// with the methods of the text messages before it; it fails the test if the connection ends
// first, or after 20 s without a frame.
func readToClose(t *testing.T, c *client) (methods []string, code int) {
	t.Helper()
	for {
		op, p, err := c.readFrame()
		if err != nil {
			t.Fatalf("after %d messages (last %q): %v; want a close frame", len(methods), methods[max(len(methods)-1, 0):], err)
		}
		switch op {
		case opClose:
			if len(p) >= 2 {
				code = int(binary.BigEndian.Uint16(p))
			}
			return methods, code
		case opText:
			var m struct{ Method string }
			json.Unmarshal(p, &m)
			methods = append(methods, m.Method)
		}
	}
}

// TestReviewEndWithReplayFull guards against a session with a reattach window that cannot end
// while its replay is full: once the session ends no reattach can come, so the writer must go
// on writing, not wait for a Pong that will never be read. A client that closes while more
// than the buffer is unacknowledged must get the run's process.completed and the answer to its
// close at once, not after the ping timeout (or never).
func TestReviewEndWithReplayFull(t *testing.T) {
	ts := newTestServer(t, Config{ReattachWindow: time.Minute, ReattachBuffer: 4096, PingInterval: time.Hour})
	c := dial(t, ts.addr)
	c.connected()
	c.send(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]any{"command": "seq 1 30000; sleep 300"}, "id": "1"})
	// The client answers no Ping, so nothing is acknowledged: the replay fills at 4 KiB.
	for {
		op, p, err := c.readFrame()
		if err != nil {
			t.Fatal(err)
		}
		var m struct{ Method string }
		if op == opText && json.Unmarshal(p, &m) == nil && m.Method == "process.output" {
			break
		}
	}
	c.writeFrame(opClose, closePayload(1000, ""))
	methods, code := readToClose(t, c)
	if len(methods) == 0 || methods[len(methods)-1] != "process.completed" || code != 1000 {
		t.Errorf("after the close: messages ending %q, close %d; want process.completed, then close 1000", methods[max(len(methods)-1, 0):], code)
	}
}

// TestReviewShutdownClientSpeaks guards against a session with a reattach window that takes
// its reader's end for a lost connection while the session ends: a client that sends a
// request during a Shutdown, after the session stopped reading requests, must still get its
// run's process.completed and the close frame 1001, as without a window.
func TestReviewShutdownClientSpeaks(t *testing.T) {
	// The kill grace only ends a sleep that started as the SIGTERM came, and so missed it.
	ts := newTestServer(t, Config{ReattachWindow: time.Minute, KillGrace: 2 * time.Second})
	gate := mkfifo(t)
	c := dial(t, ts.addr)
	c.connected()
	// On SIGTERM the run says so, then waits for the test before it exits.
	c.call("execute", map[string]any{"command": "trap 'echo term; cat " + gate + " >/dev/null; exit 0' TERM; echo ready; sleep 300 & wait"})
	for c.next().Params.Data != "ready\n" {
	}
	shut := make(chan error, 1)
	go func() { shut <- ts.Shutdown(context.Background()) }() // returns once the session has ended
	for c.next().Params.Data != "term\n" {
	}
	// The session is ending: it reads no request now.
	c.send(map[string]any{"jsonrpc": "2.0", "method": "status", "id": "late"})
	openGate(t, gate)
	methods, code := readToClose(t, c)
	if len(methods) == 0 || methods[len(methods)-1] != "process.completed" || code != 1001 {
		t.Errorf("after Shutdown: messages ending %q, close %d; want process.completed, then close 1001", methods[max(len(methods)-1, 0):], code)
	}
	if err := <-shut; err != nil {
		t.Error(err)
	}
}

// TestReviewRequestsWhileReplayFull guards against a deadlock of a session with a reattach
// window: the client's requests arrive while the replay is full, serve blocks sending their
// responses, readLoop blocks handing serve the next request, and the client's Pong, which
// would free the replay, waits unread behind it.
func TestReviewRequestsWhileReplayFull(t *testing.T) {
	ts := newTestServer(t, Config{ReattachWindow: time.Minute, ReattachBuffer: 4096, PingInterval: time.Hour})
	c := dial(t, ts.addr)
	c.connected()
	c.send(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]any{"command": "yes"}, "id": "x"})
	// The client answers no Ping until it has read more than the buffer, which is then full,
	// and the Ping after that, which follows the last batch written; it sends its requests,
	// then the Pong for that Ping, which frees the buffer.
	var last []byte
	for n := 0; last == nil; {
		op, p, err := c.readFrame()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case op == opText:
			n += len(p)
		case op == opPing && n > 4096:
			last = p
		}
	}
	const requests = 12
	for i := range requests {
		c.send(map[string]any{"jsonrpc": "2.0", "method": "nothing", "id": i})
	}
	c.writeFrame(opPong, last)
	for got := 0; got < requests; {
		op, p, err := c.readFrame()
		if err != nil {
			t.Fatalf("after %d of %d responses: %v", got, requests, err)
		}
		switch op {
		case opPing:
			c.writeFrame(opPong, p)
		case opText:
			var m struct{ Error *struct{ Code int } }
			if json.Unmarshal(p, &m) == nil && m.Error != nil {
				got++
			}
		}
	}
}

// TestRequestsPastTheReplay crosses the limit of the answers held back while the replay is full:
// a client that sends requests and acknowledges nothing, once a buffer of answers waits for it,
// is gone, and its session ends as on a disconnect, instead of serve waiting on it for ever.
func TestRequestsPastTheReplay(t *testing.T) {
	logs := newLogWatch()
	ts := newTestServer(t, Config{ReattachWindow: time.Minute, ReattachBuffer: 4096, PingInterval: time.Hour, Logger: slog.New(logs)})
	c := dial(t, ts.addr)
	c.connected()
	c.send(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]any{"command": "yes"}, "id": "x"})
	for n := 0; n <= 4096; { // the replay is full: the client answers no Ping
		op, p, err := c.readFrame()
		if err != nil {
			t.Fatal(err)
		}
		if op == opText {
			n += len(p)
		}
	}
	// Each answer is about 90 bytes: 100 of them are more than the buffer.
	for i := range 100 {
		if err := c.tryWriteFrame(opText, fmt.Appendf(nil, `{"jsonrpc":"2.0","method":"nothing","id":%d}`, i)); err != nil {
			break // the server has closed: the session ended
		}
	}
	for {
		if _, _, err := c.readFrame(); err != nil {
			break
		}
	}
	timeout := time.After(20 * time.Second)
	for closed, changed := logs.count("session closed"); closed == 0; closed, changed = logs.count("session closed") {
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("the session did not end within 20s; log: %q", logs.messages())
		}
	}
	if causes := logs.attrs("run ended", "cause"); len(causes) != 1 || causes[0] != "client disconnected" {
		t.Errorf("run ended with causes %q, want client disconnected", causes)
	}
}

// pipeSession admits a session of ts whose first connection is a pipe, not a socket, and
// returns it with the pipe's server end, a client on the other end, and serve, which serves
// the session in a goroutine and returns a channel closed once it has ended.
func pipeSession(t *testing.T, ts *testServer) (ss *session, c *conn, cl *client, serve func() <-chan struct{}) {
	t.Helper()
	ss = ts.newSession("pipe")
	if err := ts.sessions.add(ss); err != nil {
		t.Fatal(err)
	}
	near, far := net.Pipe()
	t.Cleanup(func() { near.Close() }) // before ts's Shutdown: a pipe's write waits for its reader
	c = newConn(far, ts.cfg.WriteWait)
	c.in = bufio.NewReader(c)
	serve = func() <-chan struct{} {
		served := make(chan struct{})
		go func() { // returns once the session has ended; the test waits for served
			ts.serveSession(ss, newAttachment(c, "pipe"))
			close(served)
		}()
		return served
	}
	return ss, c, &client{t: t, c: near, br: bufio.NewReader(near)}, serve
}

// TestShutdownAtAdmission starts a session whose Shutdown began between its admission and its
// first write: the client gets connected, then close 1001, with a reattach window as without.
// With a window, writeLoop waited for the first connection and for the session's end at once,
// and took the end about half the time: the client got neither. A pipe stands in for the
// socket, since no handshake can land in that moment on purpose; each row tries 20 times.
func TestShutdownAtAdmission(t *testing.T) {
	for _, window := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprintf("window=%v", window), func(t *testing.T) {
			for try := range 20 {
				ts := newTestServer(t, Config{ReattachWindow: window})
				ss, _, cl, serve := pipeSession(t, ts)
				shut := make(chan error, 1)
				go func() { shut <- ts.Shutdown(t.Context()) }() // returns once ss has ended
				<-ss.ctx.Done()
				served := serve()

				m, err := cl.read()
				if err != nil || m.Method != "connected" {
					t.Fatalf("try %d: first frame %q, %v (close %d); want connected", try, m.raw, err, cl.closed.code)
				}
				if _, err := cl.read(); err != io.EOF || cl.closed.code != 1001 {
					t.Fatalf("try %d: after connected: %v, close %d; want close 1001", try, err, cl.closed.code)
				}
				if err := <-shut; err != nil {
					t.Fatalf("Shutdown: %v", err)
				}
				<-served
			}
		})
	}
}

// TestRefusedTakeoverKeepsWriteWait refuses a takeover of a live connection for its position:
// a takeover shortens the live connection's write deadline to takeoverWait, and one refused
// gives the connection its WriteWait back, which the pipe's conn shows. The session goes on.
func TestRefusedTakeoverKeepsWriteWait(t *testing.T) {
	const wait = 7 * time.Second
	ts := newTestServer(t, reattachConfig(t, Config{WriteWait: wait}, time.Minute))
	_, c, cl, serve := pipeSession(t, ts)
	served := serve()
	rc := &rclient{t: t, client: cl}
	rc.expectConnected()
	assertResumeRefused(t, ts.addr, rc.id, rc.token, "5", "received 5 but only 0 messages were sent")
	if got := time.Duration(c.wait.Load()); got != wait {
		t.Errorf("the live connection's write wait after a refused takeover: %v, want %v", got, wait)
	}
	rc.runEcho()
	cl.close() // which ends the session
	<-served
}
