package main

// Tests of ccexecutor run across lost connections: reattaching to the session when the server
// offers it (PROTOCOL.md, Reattach), and noticing a server that has gone silent.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/ccexecutor/ccexecutor"
)

// A cut is what a cutProxy does to a connection once it has forwarded a number of bytes from
// the server to the client.
type cut struct {
	after int64 // bytes forwarded from the server to the client before the cut
	hole  bool  // a black hole: nothing more is forwarded either way, and both sockets stay open; otherwise both are reset
}

// A cutProxy forwards TCP connections to a server, and cuts those its plan names: the first
// connection gets the first cut, and so on; the connections after the plan are forwarded whole.
type cutProxy struct {
	ln     net.Listener
	target string        // the server's host:port
	done   chan struct{} // closed by close: the sockets of black holes are closed then
	wg     sync.WaitGroup

	mu     sync.Mutex
	plan   []cut      // the cuts of the next connections
	made   int        // cuts made
	conns  []net.Conn // every socket, closed by close
	closed bool
}

// newCutProxy starts a proxy to the server at target (host:port), closed at the end of the test.
func newCutProxy(t *testing.T, target string, plan ...cut) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, done: make(chan struct{}), plan: plan}
	p.wg.Go(p.accept) // returns when close closes the listener
	t.Cleanup(p.close)
	return p
}

// url is the WebSocket URL of the protocol's primary path through the proxy.
func (p *cutProxy) url() string { return "ws://" + p.ln.Addr().String() + "/ws/mcp" }

// cutsMade is the number of cuts made so far.
func (p *cutProxy) cutsMade() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.made
}

func (p *cutProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Go(func() { p.serve(c) }) // returns when either side ends, or at close for a black hole
	}
}

// reset resets every connection forwarded now, both sides, and counts it as a cut.
func (p *cutProxy) reset() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.made++
	p.mu.Unlock()
	for _, c := range conns {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
}

// close stops the proxy, closing every socket, and waits for its goroutines.
func (p *cutProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	conns := p.conns
	p.mu.Unlock()
	close(p.done)
	for _, c := range conns {
		c.Close()
	}
	p.wg.Wait()
}

// serve forwards one connection, and cuts it as the plan says.
func (p *cutProxy) serve(client net.Conn) {
	server, err := net.Dial("tcp", p.target)
	if err != nil {
		client.Close()
		return
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		client.Close()
		server.Close()
		return
	}
	p.conns = append(p.conns, client, server)
	k, planned := cut{}, len(p.plan) > 0
	if planned {
		k, p.plan = p.plan[0], p.plan[1:]
	}
	p.mu.Unlock()

	var holed atomic.Bool
	p.wg.Go(func() { // returns when either side ends, or at close for a black hole
		buf := make([]byte, 32<<10)
		for {
			n, err := client.Read(buf)
			if holed.Load() {
				<-p.done
				return
			}
			if n > 0 {
				if _, werr := server.Write(buf[:n]); werr != nil {
					err = werr
				}
			}
			if err != nil {
				client.Close()
				server.Close()
				return
			}
		}
	})
	buf := make([]byte, 32<<10)
	var sent int64
	for {
		b := buf
		if planned && int64(len(b)) > k.after-sent {
			b = b[:k.after-sent]
		}
		if len(b) == 0 {
			break
		}
		n, err := server.Read(b)
		if n > 0 {
			if _, werr := client.Write(b[:n]); werr != nil {
				err = werr
			}
			sent += int64(n)
		}
		if err != nil {
			client.Close()
			server.Close()
			return
		}
	}
	p.mu.Lock()
	p.made++
	p.mu.Unlock()
	if k.hole {
		holed.Store(true)
		<-p.done
		return
	}
	client.(*net.TCPConn).SetLinger(0)
	server.(*net.TCPConn).SetLinger(0)
	client.Close()
	server.Close()
}

// runInProcess runs "ccexecutor run args..." in this process, its keep-alive waiting idle for
// the server and as long again for a Pong (the defaults when idle is 0), and returns what it
// printed and its exit status.
func runInProcess(t *testing.T, idle time.Duration, args ...string) runResult {
	t.Helper()
	o, err := parseRun(append([]string{"--token", ""}, args...))
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	o.stdout, o.stderr = &stdout, &stderr
	if idle > 0 {
		o.idle, o.pongWait = idle, idle
	}
	done := make(chan int, 1)
	go func() { done <- o.status() }() // returns when the run is over; left running if the test fails for want of it
	timer := time.NewTimer(4 * runWait)
	defer timer.Stop()
	select {
	case code := <-done:
		checkNoPanic(t, stderr.String())
		return runResult{stdout.String(), stderr.String(), code}
	case <-timer.C:
		t.Fatalf("ccexecutor run %q did not end within %v", args, 4*runWait)
		return runResult{}
	}
}

// seqOutput is the output of "seq 1 n".
func seqOutput(n int) string {
	var b strings.Builder
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&b, "%d\n", i)
	}
	return b.String()
}

// TestRunReattach checks that a run goes on through lost connections when the server offers a
// reattach: the output is exactly the command's, nothing missing or twice, and the exit status
// the command's, after connection resets and black holes cut in the middle of a frame. Every
// case runs again with the server's window at 0, where the same cuts end the client with 123:
// the reattach is what makes the difference.
func TestRunReattach(t *testing.T) {
	const lines = 200000
	for _, tt := range []struct {
		name    string
		command string
		cuts    []cut
		stdout  string
		code    int
		short   bool // runs in -short mode
		slow    bool // the server notices a lost connection only after the defaults' 10 s or more
	}{
		{"seq through a reset and a black hole", fmt.Sprintf("seq 1 %d", lines),
			[]cut{{after: 1 << 20}, {after: 1<<20 + 7, hole: true}}, seqOutput(lines), 0, false, false},
		{"exit status after a reset", "seq 1 20000; exit 3", []cut{{after: 100003}}, seqOutput(20000), 3, true, false},
		{"exit status after a black hole", "seq 1 20000; exit 3", []cut{{after: 100003, hole: true}}, seqOutput(20000), 3, true, false},
		// The client reattaches before the server notices: the reattach takes the session over.
		{"black hole the server has not noticed", "seq 1 20000; exit 3", []cut{{after: 100003, hole: true}}, seqOutput(20000), 3, true, true},
	} {
		for _, window := range []time.Duration{5 * time.Second, 0} {
			t.Run(fmt.Sprintf("%s/window %v", tt.name, window), func(t *testing.T) {
				if testing.Short() && !tt.short {
					t.Skip("streams 200000 lines")
				}
				// With a window, the server notices a black hole within two ping intervals,
				// before the client does within its keep-alive times (twice 500 ms), but in
				// the slow case; a server slow to answer only makes a reattach more. With
				// the window at 0, the client notices first, and the server's defaults cannot
				// end a session before the cut.
				cfg := ccexecutor.Config{ReattachWindow: window}
				if window > 0 && !tt.slow {
					cfg.PingInterval, cfg.WriteWait = 200*time.Millisecond, time.Second
				}
				u, err := url.Parse(serveForRun(t, cfg))
				if err != nil {
					t.Fatal(err)
				}
				p := newCutProxy(t, u.Host, tt.cuts...)
				res := runInProcess(t, 500*time.Millisecond, "--url", p.url(), "--", tt.command)
				if window == 0 {
					// The first cut ends the run.
					if made := p.cutsMade(); made != 1 {
						t.Errorf("the proxy made %d cuts, want 1", made)
					}
					checkRunFailure(t, res, exitLost, "connection lost before the command completed")
					return
				}
				if made := p.cutsMade(); made != len(tt.cuts) {
					t.Fatalf("the proxy made %d cuts, want %d (the run ended before them): exit status %d, stderr %q", made, len(tt.cuts), res.code, res.stderr)
				}
				if res.code != tt.code {
					t.Errorf("exit status %d, want %d; stderr %q", res.code, tt.code, res.stderr)
				}
				if res.stdout != tt.stdout {
					checkSeq(t, []byte(res.stdout), strings.Count(tt.stdout, "\n"), "")
				}
				if n := strings.Count(res.stderr, "; reattached\n"); n < len(tt.cuts) || n != strings.Count(res.stderr, "\n") {
					t.Errorf("stderr = %q, want a note of a reattach for each of the %d cuts, and nothing else", res.stderr, len(tt.cuts))
				}
			})
		}
	}
}

// A fakeConn is a connection to a fakeServer, after the client's handshake request was read.
type fakeConn struct {
	net.Conn
	t   *testing.T // for errors of the client's
	br  *bufio.Reader
	req *http.Request
}

// upgrade answers the handshake with 101 Switching Protocols.
func (c *fakeConn) upgrade() {
	fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acceptKey(c.req.Header.Get("Sec-WebSocket-Key")))
}

// send sends text frames.
func (c *fakeConn) send(texts ...string) {
	for _, text := range texts {
		c.Write(serverFrameBytes(text))
	}
}

// recv reads masked frames of the client's up to a text frame, and returns its payload; ""
// when the connection ends first.
func (c *fakeConn) recv() string {
	for {
		op, p := c.frame()
		if op == opText || op == 0 {
			return p
		}
	}
}

// frame reads a masked frame of the client's, and returns its opcode and payload; 0 and ""
// when the connection ends first.
func (c *fakeConn) frame() (byte, string) {
	h := make([]byte, 2)
	if _, err := io.ReadFull(c.br, h); err != nil {
		return 0, ""
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		b := make([]byte, 2)
		io.ReadFull(c.br, b)
		n = uint64(binary.BigEndian.Uint16(b))
	case 127:
		b := make([]byte, 8)
		io.ReadFull(c.br, b)
		n = binary.BigEndian.Uint64(b)
	}
	p := make([]byte, 4+n)
	if _, err := io.ReadFull(c.br, p); err != nil {
		return 0, ""
	}
	for i := range p[4:] {
		p[4+i] ^= p[i%4]
	}
	return h[0] & 0x0f, string(p[4:])
}

// fakeServer serves WebSocket handshakes on a listener of its own until the test ends, each
// connection with a script: the first with the first script, and so on; the connections after
// them with the last. A connection is closed without a close frame once its script returns.
type fakeServer struct {
	ln      net.Listener
	scripts []func(*fakeConn)
	wg      sync.WaitGroup

	mu   sync.Mutex
	reqs []*url.URL // the URL of each handshake, in order
}

func newFakeServer(t *testing.T, scripts ...func(*fakeConn)) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeServer{ln: ln, scripts: scripts}
	s.wg.Go(func() { // returns when the listener is closed, at the end of the test
		for n := 0; ; n++ {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			script := s.scripts[min(n, len(s.scripts)-1)]
			s.wg.Go(func() { // returns when its script does; the deadline bounds it
				defer nc.Close()
				nc.SetDeadline(time.Now().Add(runWait))
				c := &fakeConn{Conn: nc, t: t, br: bufio.NewReader(nc)}
				if c.req, err = http.ReadRequest(c.br); err != nil {
					return
				}
				s.mu.Lock()
				s.reqs = append(s.reqs, c.req.URL)
				s.mu.Unlock()
				script(c)
			})
		}
	})
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *fakeServer) url() string { return "ws://" + s.ln.Addr().String() + "/ws/mcp?x=1" }

// queries returns the query of each handshake so far, as "session_id resume received", or
// as "-" for one without session_id.
func (s *fakeServer) queries() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var q []string
	for _, u := range s.reqs {
		v := u.Query()
		if !v.Has("session_id") {
			q = append(q, "-")
			continue
		}
		q = append(q, v.Get("session_id")+" "+v.Get("resume")+" "+v.Get("received"))
	}
	return q
}

// Frames of a fake server's scripts.
const (
	fakeStarted = `{"jsonrpc":"2.0","result":{"status":"started","pid":7,"pgid":7},"id":1}`
	fakeRefusal = `{"jsonrpc":"2.0","error":{"code":-32004,"message":"Resume refused: unknown session or token","data":null}}`
)

// fakeConnected is a connected notification of session s1 offering token, with a window of
// secs seconds.
func fakeConnected(token string, secs float64) string {
	return fmt.Sprintf(`{"jsonrpc":"2.0","method":"connected","params":{"session_id":"s1","version":"1.0.0","capabilities":["execute","control","stream"],"resume_token":%q,"reattach_window":%g}}`, token, secs)
}

// fakeOutput is a process.output notification of line on stdout.
func fakeOutput(line string) string {
	return fmt.Sprintf(`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":%q,"truncated":false,"seq":1}}`, line)
}

// fakeCompleted is process.completed with exit code code.
func fakeCompleted(code int) string {
	return fmt.Sprintf(`{"jsonrpc":"2.0","method":"process.completed","params":{"exit_code":%d,"status":"failed","error":null}}`, code)
}

// fakeClose sends a close frame with code and reason.
func (c *fakeConn) close(code int, reason string) {
	p := binary.BigEndian.AppendUint16(nil, uint16(code))
	c.Write(append([]byte{0x88, byte(len(p) + len(reason))}, append(p, reason...)...))
}

// TestRunReattachHandshake checks the client's side of a reattach against a server that
// plays the protocol by the letter: the handshake names the session, the last token offered
// (each works once) and exactly the number of messages received, connected notifications and
// Pings not counted; the output is printed once, and the exit status is the command's. And
// it checks when the client does not reattach, or gives up: a refusal (-32004 and 1008, or
// HTTP 403), a window that passes while the server cannot be reached, a server that offers no
// reattach, and a close frame, which ends a session rather than losing it.
func TestRunReattachHandshake(t *testing.T) {
	first := func(c *fakeConn) { // two messages, then the connection ends without a close frame
		c.upgrade()
		c.send(fakeConnected("t1", 5))
		c.recv() // execute
		c.send(fakeStarted, fakeOutput("a\n"))
		ping := "\x00\x00\x00\x00\x00\x00\x00\x02" // the count of messages sent before it
		c.Write(append([]byte{0x89, 8}, ping...))  // not a message
		c.send(fakeOutput("b\n"))
		// Once the Pong is read, the connection ends with nothing unread: an end of file, not
		// a reset, which would lose what the client has not read yet.
		if op, p := c.frame(); op != opPong || p != ping {
			c.t.Errorf("the client answered a Ping with opcode %d and %q, want a Pong and %q", op, p, ping)
		}
	}
	for _, tt := range []struct {
		name    string
		json    bool
		scripts []func(*fakeConn)
		queries []string // of the handshakes
		stdout  string
		code    int
		stderr  []string // held by stderr in order; for a failure, its one line holds the last
	}{
		{
			name: "two reattaches",
			scripts: []func(*fakeConn){
				first,
				func(c *fakeConn) { // a message, then the connection ends inside a frame
					c.upgrade()
					c.send(fakeConnected("t2", 5), fakeOutput("c\n"))
					cut := serverFrameBytes(fakeOutput("lost\n"))
					c.Write(cut[:len(cut)-3])
				},
				func(c *fakeConn) { // the rest, then a reset once the client closes
					c.upgrade()
					c.send(fakeConnected("t3", 5), fakeOutput("lost\n"), fakeOutput("d\n"), fakeCompleted(3))
					c.recv()
				},
			},
			queries: []string{"-", "s1 t1 3", "s1 t2 4"},
			stdout:  "a\nb\nc\nlost\nd\n",
			code:    3,
			stderr: []string{
				"ccexecutor run: connection lost (it ended without a close frame); reattached\n",
				"ccexecutor run: connection lost (it ended inside a frame); reattached\n",
			},
		},
		{
			name: "json",
			json: true,
			scripts: []func(*fakeConn){
				first,
				func(c *fakeConn) {
					c.upgrade()
					c.send(fakeConnected("t2", 5), fakeCompleted(0))
					c.recv()
				},
			},
			queries: []string{"-", "s1 t1 3"},
			stdout: fakeConnected("t1", 5) + "\n" + fakeStarted + "\n" + fakeOutput("a\n") + "\n" + fakeOutput("b\n") + "\n" +
				fakeConnected("t2", 5) + "\n" + fakeCompleted(0) + "\n",
			stderr: []string{"ccexecutor run: connection lost (it ended without a close frame); reattached\n"},
		},
		{
			name: "refused",
			scripts: []func(*fakeConn){first, func(c *fakeConn) {
				c.upgrade()
				c.send(fakeRefusal)
				c.close(1008, "Resume refused")
			}},
			queries: []string{"-", "s1 t1 3"},
			stdout:  "a\nb\n",
			code:    exitLost,
			stderr:  []string{"connection lost before the command completed (it ended without a close frame); the server refused to reattach: Resume refused: unknown session or token (code -32004)"},
		},
		{
			name: "refused with HTTP 403",
			scripts: []func(*fakeConn){first, func(c *fakeConn) {
				fmt.Fprint(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
			}},
			queries: []string{"-", "s1 t1 3"},
			stdout:  "a\nb\n",
			code:    exitLost,
			stderr:  []string{"the server refused to reattach: HTTP 403 Forbidden"},
		},
		{
			name: "window passes",
			scripts: []func(*fakeConn){
				func(c *fakeConn) {
					c.upgrade()
					c.send(fakeConnected("t1", 1))
					c.recv()
					c.send(fakeStarted)
				},
				func(c *fakeConn) {}, // no answer to the handshake: the connection ends
			},
			queries: []string{"-", "s1 t1 1", "s1 t1 1", "s1 t1 1"}, // at least: tried at 0, 50, 150, 350 and 750 ms
			code:    exitLost,
			stderr:  []string{"(it ended without a close frame); gave up reattaching at the end of the server's window of 1s: no HTTP answer to the WebSocket handshake: unexpected EOF"},
		},
		{
			name: "no offer",
			scripts: []func(*fakeConn){func(c *fakeConn) {
				c.upgrade()
				c.send(`{"jsonrpc":"2.0","method":"connected","params":{"session_id":"s1"}}`)
				c.recv()
				c.send(fakeStarted, fakeOutput("a\n"))
			}},
			queries: []string{"-"},
			stdout:  "a\n",
			code:    exitLost,
			stderr:  []string{"connection lost before the command completed: it ended without a close frame"},
		},
		{
			name: "close frame",
			scripts: []func(*fakeConn){func(c *fakeConn) {
				c.upgrade()
				c.send(fakeConnected("t1", 5))
				c.recv()
				c.send(fakeStarted, fakeOutput("a\n"))
				c.close(1001, "Server shutting down")
			}},
			queries: []string{"-"},
			stdout:  "a\n",
			code:    exitLost,
			stderr:  []string{"connection lost before the command completed: closed by the server: Server shutting down (code 1001)"},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newFakeServer(t, tt.scripts...)
			args := []string{"--url", s.url()}
			if tt.json {
				args = append(args, "--json")
			}
			res := runInProcess(t, 0, append(args, "--", "true")...)
			if res.stdout != tt.stdout {
				t.Errorf("stdout = %q, want %q", res.stdout, tt.stdout)
			}
			if tt.code == exitLost {
				checkRunFailure(t, res, exitLost, tt.stderr[0])
			} else {
				if res.code != tt.code {
					t.Errorf("exit status %d, want %d", res.code, tt.code)
				}
				if res.stderr != strings.Join(tt.stderr, "") {
					t.Errorf("stderr = %q, want %q", res.stderr, strings.Join(tt.stderr, ""))
				}
			}
			q := s.queries()
			if tt.name == "window passes" && len(q) > len(tt.queries) {
				q = q[:len(tt.queries)] // the retries go on to the window's end
			}
			if strings.Join(q, "|") != strings.Join(tt.queries, "|") {
				t.Errorf("handshakes %q, want %q", q, tt.queries)
			}
		})
	}
}

// TestRunKeepAliveSilentServer checks that the client notices a server that has gone silent,
// as when the network between drops every packet without a reset: with nothing at all from
// the server for the idle time, it sends a Ping, and without anything for the Pong wait after
// it, the read fails. Anything from the server, a Pong or a message, starts the count again;
// without this the client waited for ever on a dead connection. In a synctest bubble, over
// net.Pipe, with the default times.
func TestRunKeepAliveSilentServer(t *testing.T) {
	for _, tt := range []struct {
		name     string
		pongs    int           // Pings the server answers
		every    time.Duration // the server sends a message at this interval, when not 0
		messages int           // that many
		pings    int           // Pings the client sends
		at       time.Duration // when the read fails
	}{
		{"silent", 0, 0, 0, 1, idleWait + pongWait},
		{"answers two Pings", 2, 0, 0, 3, 3*idleWait + pongWait},
		{"messages within the idle time", 0, idleWait - time.Second, 4, 1, 4*(idleWait-time.Second) + idleWait + pongWait},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a, b := net.Pipe()
				c := &wsConn{nc: a, wait: time.Second}
				c.br = bufio.NewReader(c)
				c.keepAlive(idleWait, pongWait)
				pings := 0
				var wg sync.WaitGroup
				wg.Go(func() { // the server's reader: returns when the client's end is closed
					s := &fakeConn{Conn: b, t: t, br: bufio.NewReader(b)}
					for {
						op, p := s.frame()
						if op == 0 {
							return
						}
						if op == opPing {
							if pings++; pings <= tt.pongs {
								b.Write(append([]byte{0x8a, byte(len(p))}, p...))
							}
						}
					}
				})
				wg.Go(func() { // the server's messages: returns once sent
					for range tt.messages {
						<-time.After(tt.every)
						b.Write(serverFrameBytes("m"))
					}
				})
				start := time.Now()
				got := 0
				var err error
				for err == nil {
					if _, err = c.next(nil, 100); err == nil {
						got++
					}
				}
				at := time.Since(start)
				a.Close()
				wg.Wait()
				if !errors.Is(err, errSilent) || got != tt.messages || pings != tt.pings || at != tt.at {
					t.Errorf("read failed at %v with %v, after %d messages and %d Pings; want at %v with %v, after %d and %d",
						at, err, got, pings, tt.at, errSilent, tt.messages, tt.pings)
				}
			})
		})
	}
}

// TestRunReattachInterrupt checks Ctrl-C while the client reconnects: a first one says that
// the command will be canceled once reattached, and cancels it then, sending CANCEL on the new
// connection rather than failing to write it on the lost one; a second one disconnects at
// once, with 130, without waiting for a handshake that does not end.
func TestRunReattachInterrupt(t *testing.T) {
	for _, twice := range []bool{false, true} {
		t.Run(fmt.Sprintf("twice=%v", twice), func(t *testing.T) {
			drop, reconnecting, release := make(chan struct{}), make(chan struct{}), make(chan struct{})
			s := newFakeServer(t,
				func(c *fakeConn) {
					c.upgrade()
					c.send(fakeConnected("t1", 60))
					c.recv()
					c.send(fakeStarted)
					<-drop // then the connection ends without a close frame
				},
				func(c *fakeConn) {
					close(reconnecting)
					select {
					case <-release:
					case <-t.Context().Done():
						return
					}
					c.upgrade()
					c.send(fakeConnected("t2", 60))
					if got := c.recv(); !strings.Contains(got, `"method":"control","params":{"type":"CANCEL"}`) {
						t.Errorf("the first request on the new connection is %q, want CANCEL", got)
					}
					c.send(`{"jsonrpc":"2.0","method":"process.completed","params":{"exit_code":-15,"status":"failed","error":"canceled"}}`)
					c.recv()
				})
			cmd := exec.Command(binPath, "run", "--url", s.url(), "--", "true")
			cmd.Env = runEnv()
			stderr, err := cmd.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			lines := make(chan string, 16)
			go func() { // returns at the end of the client's stderr
				defer close(lines)
				br := bufio.NewReader(stderr)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					lines <- line
				}
			}()
			waitLine := func(want string) {
				t.Helper()
				select {
				case line := <-lines:
					if line != want {
						t.Fatalf("stderr line %q, want %q", line, want)
					}
				case <-time.After(runWait):
					t.Fatalf("no line %q on stderr within %v", want, runWait)
				}
			}
			close(drop)
			select {
			case <-reconnecting:
			case <-time.After(runWait):
				t.Fatalf("the client did not reconnect within %v", runWait)
			}
			cmd.Process.Signal(os.Interrupt)
			waitLine("ccexecutor run: reconnecting: the command will be canceled once reattached; Ctrl-C again disconnects\n")
			want := 128 + 15
			if twice {
				cmd.Process.Signal(os.Interrupt)
				waitLine("ccexecutor run: interrupted: disconnected before the command completed\n")
				want = exitInterrupted
			} else {
				close(release)
				waitLine("ccexecutor run: connection lost (it ended without a close frame); reattached\n")
			}
			timer := time.NewTimer(runWait)
			defer timer.Stop()
			for open := true; open; {
				select {
				case line, ok := <-lines:
					if ok {
						t.Errorf("stderr line %q, want no more", line)
					}
					open = ok
				case <-timer.C:
					t.Fatalf("the client did not end within %v", runWait)
				}
			}
			cmd.Wait()
			if code := cmd.ProcessState.ExitCode(); code != want {
				t.Errorf("exit status %d, want %d", code, want)
			}
		})
	}
}

// TestRunReattachPaused checks a cut while the command is paused: the client reattaches, and
// SIGCONT then resumes the command through the new connection, which goes on printing. With
// the server's window at 0, the cut ends the client with 123.
func TestRunReattachPaused(t *testing.T) {
	for _, window := range []time.Duration{5 * time.Second, 0} {
		t.Run(fmt.Sprintf("window %v", window), func(t *testing.T) {
			u, err := url.Parse(serveForRun(t, ccexecutor.Config{ReattachWindow: window}))
			if err != nil {
				t.Fatal(err)
			}
			p := newCutProxy(t, u.Host)
			r := startRun(t, "--url", p.url(), "--json", "--pause-on-tstp", "--", "echo ready; while :; do echo tick; sleep 0.05; done")
			r.waitLine(t, `"data":"ready\n"`)
			r.signal(t, syscall.SIGTSTP)
			r.waitLine(t, `"method":"process.paused"`)
			p.reset()
			if window == 0 {
				if code := r.finish(t); code != exitLost {
					t.Errorf("exit status %d, want %d; stderr %q", code, exitLost, r.stderr.String())
				}
				return
			}
			r.waitLine(t, `"method":"connected"`) // the second
			r.signal(t, syscall.SIGCONT)
			r.waitLine(t, `"method":"process.resumed"`)
			r.waitLine(t, `"data":"tick\n"`)
			r.signal(t, os.Interrupt)
			if code := r.finish(t); code != 128+15 {
				t.Errorf("exit status %d, want %d; stderr %q", code, 128+15, r.stderr.String())
			}
			if !strings.Contains(r.stderr.String(), "; reattached\n") {
				t.Errorf("stderr = %q, want a note of the reattach", r.stderr.String())
			}
		})
	}
}

// TestRunReattachExpired checks a reattach that comes after the server's window: the server
// notices a black hole within two ping intervals and ends the session a window later, long
// before the client notices it (twice its 1 s keep-alive time); the server then refuses the
// reattach, and the client ends with 123 and the server's reason.
func TestRunReattachExpired(t *testing.T) {
	u, err := url.Parse(serveForRun(t, ccexecutor.Config{ReattachWindow: 300 * time.Millisecond, PingInterval: 200 * time.Millisecond, WriteWait: time.Second}))
	if err != nil {
		t.Fatal(err)
	}
	p := newCutProxy(t, u.Host, cut{after: 100003, hole: true})
	res := runInProcess(t, time.Second, "--url", p.url(), "--", "seq 1 20000")
	checkRunFailure(t, res, exitLost, "the server refused to reattach: Resume refused: unknown session or token (code -32004)")
}

// failConn is a connection whose writes fail, and which records that it was closed.
type failConn struct {
	net.Conn // nil: only the methods below are used
	closed   bool
}

func (c *failConn) Write([]byte) (int, error)        { return 0, errors.New("write: broken pipe") }
func (c *failConn) SetWriteDeadline(time.Time) error { return nil }
func (c *failConn) Close() error                     { c.closed = true; return nil }

// TestRunSendPending checks a control request whose write fails: while the server offers a
// reattach, the connection is closed, so that its reader reports it lost, and the request is
// kept for the next connection, with those after it; otherwise the run is over with 123.
func TestRunSendPending(t *testing.T) {
	for _, token := range []string{"t1", ""} {
		t.Run(fmt.Sprintf("token %q", token), func(t *testing.T) {
			nc := new(failConn)
			c := &runner{ws: &wsConn{nc: nc}, token: token}
			c.hold(syscall.SIGTSTP)
			c.hold(os.Interrupt)
			err := c.sendPending()
			var x *exitError
			switch {
			case token == "" && (!errors.As(err, &x) || x.code != exitLost):
				t.Errorf("sendPending = %v, want an exit with %d", err, exitLost)
			case token != "" && (err != nil || !nc.closed || strings.Join(c.pending, " ") != "PAUSE CANCEL"):
				t.Errorf("sendPending = %v, connection closed %v, pending %q; want nil, true and [PAUSE CANCEL]", err, nc.closed, c.pending)
			}
		})
	}
}
