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
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestKeepAlive guards against losing a long silent run to an idle timeout in a proxy or NAT
// table, and against holding the slot and the run of a client that vanished without closing.
func TestKeepAlive(t *testing.T) {
	t.Run("silent run through an idle-dropping proxy", func(t *testing.T) {
		rows := []struct {
			name    string
			ping    time.Duration
			dropped bool // the proxy must drop the connection before the run ends
		}{
			{"pings keep it open", 100 * time.Millisecond, false},
			{"without pings it is dropped", time.Minute, true}, // shows that the proxy drops
		}
		for _, row := range rows {
			t.Run(row.name, func(t *testing.T) {
				ts := newTestServer(t, Config{PingInterval: row.ping, KillGrace: 200 * time.Millisecond})
				p := newProxy(t, ts.addr, 400*time.Millisecond)
				c := &pongClient{client: dial(t, p.addr())}
				c.connected()
				if r := c.call("execute", map[string]any{"command": "sleep 1; echo done"}); r.Error != nil {
					t.Fatalf("execute: %s", r.raw)
				}
				var out []string
				for {
					m, err := c.read()
					if err != nil {
						if !row.dropped {
							t.Fatalf("after output %q and %d pings: %v", out, c.pings, err)
						}
						select {
						case <-p.dropped:
						default:
							t.Errorf("connection ended (%v), but not by the proxy", err)
						}
						return
					}
					if m.Method == "process.output" {
						out = append(out, m.Params.Data)
					}
					if m.Method == "process.completed" {
						break
					}
				}
				if row.dropped {
					t.Fatalf("the proxy did not drop the connection: the test shows nothing")
				}
				if len(out) != 1 || out[0] != "done\n" || c.pings == 0 {
					t.Errorf("output %q after %d pings, want done after at least one ping", out, c.pings)
				}
				c.assertWorks()
				c.close()
			})
		}
	})

	t.Run("vanished peer", func(t *testing.T) {
		rows := []struct {
			name    string
			command string // "" for a session with no run
		}{
			{"idle session", ""},
			{"silent run", "echo ready; sleep 300"},
			// A run that writes a line more often than the ping interval never leaves the
			// connection silent: the vanished peer must still be noticed.
			{"trickling run", "echo ready; while :; do echo tick; sleep 0.05; done"},
		}
		for _, row := range rows {
			t.Run(row.name, func(t *testing.T) {
				t.Parallel()
				logs := newLogWatch()
				ts := newTestServer(t, Config{PingInterval: 100 * time.Millisecond, KillGrace: 200 * time.Millisecond, Logger: slog.New(logs)})
				p := newProxy(t, ts.addr, 0)
				c := dial(t, p.addr())
				c.connected()
				pgid := 0
				if row.command != "" {
					pgid, _ = c.start(row.command, nil)
				}
				p.blackhole()
				// 20 ping intervals, plus the kill grace: generous, and bounded.
				logs.wait(t, "session closed", 1, 2*time.Second+200*time.Millisecond)
				if pgid != 0 {
					assertGroupGone(t, pgid)
				}
				if n := ts.sessions.len(); n != 0 {
					t.Errorf("sessions = %d, want 0", n)
				}
			})
		}
	})

	t.Run("ReadHeaderTimeout", func(t *testing.T) {
		s := NewServer(Config{Logger: slog.New(slog.DiscardHandler)})
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		hs := &http.Server{Handler: s, ReadHeaderTimeout: 200 * time.Millisecond}
		served := make(chan error, 1)
		go func() { served <- hs.Serve(ln) }() // returns once hs is closed
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := s.Shutdown(ctx); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
			hs.Close()
			<-served
		})
		addr := ln.Addr().String()

		t.Run("half a request line is dropped", func(t *testing.T) {
			nc, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			if _, err := nc.Write([]byte("GET /ws/mcp HT")); err != nil {
				t.Fatal(err)
			}
			nc.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(nc) // net/http may answer 400 before it hangs up
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("a client that sent half a request line was not dropped within 5s (read %q)", got)
			}
			if err != nil && !errors.Is(err, syscall.ECONNRESET) || len(got) > 0 && !bytes.HasPrefix(got, []byte("HTTP/1.1 400 ")) {
				t.Errorf("read %q, %v; want at most a 400, then the connection closed", got, err)
			}
		})
		t.Run("a session outlives it", func(t *testing.T) {
			c := dial(t, addr)
			c.connected()
			out, done := c.run("sleep 0.5; echo done", nil)
			if len(out) != 1 || out[0].Data != "done\n" || done.Status != "completed" {
				t.Errorf("output %+v, completed %+v", out, done)
			}
			c.close()
		})
	})
}

// pongClient is a client that answers every Ping with a Pong, as WebSocket libraries do on
// their own; client.read skips Pings without answering them.
type pongClient struct {
	*client
	pings int // Pings answered
}

// read is client.read, answering Pings.
func (c *pongClient) read() (msg, error) {
	for {
		op, p, err := c.readFrame()
		switch {
		case err != nil:
			return msg{}, err
		case op == 0x8:
			if len(p) >= 2 {
				c.closed.code, c.closed.reason = int(binary.BigEndian.Uint16(p)), string(p[2:])
			}
			return msg{}, io.EOF
		case op == 0x9:
			c.pings++
			c.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.c.Write(maskedFrame(0xa, p)); err != nil {
				return msg{}, err
			}
			continue
		case op == 0xa:
			continue
		}
		m := msg{raw: string(p)}
		if err := json.Unmarshal(p, &m); err != nil {
			return msg{}, fmt.Errorf("frame %q: %v", p, err)
		}
		return m, nil
	}
}

// proxy forwards one TCP connection between a client and target, on 127.0.0.1. With idle > 0
// it drops the connection once no byte has passed in either direction for idle, as a NAT table
// or a proxy with an idle timeout does; blackhole makes it stop forwarding in both directions
// while keeping both sockets open, as a peer that vanished without a FIN or a reset looks.
type proxy struct {
	ln      net.Listener
	target  string
	idle    time.Duration
	last    atomic.Int64  // when a byte last passed, in Unix nanoseconds
	hole    chan struct{} // closed by blackhole
	dropped chan struct{} // closed when the idle timeout dropped the connection
	done    chan struct{} // closed when the test ends
	wg      sync.WaitGroup

	mu    sync.Mutex
	conns []net.Conn
}

func newProxy(t *testing.T, target string, idle time.Duration) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, idle: idle, hole: make(chan struct{}), dropped: make(chan struct{}), done: make(chan struct{})}
	p.wg.Go(p.accept) // returns once the listener is closed
	t.Cleanup(func() {
		close(p.done)
		ln.Close()
		p.closeAll()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) blackhole() { close(p.hole) }

func (p *proxy) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

// accept forwards the first connection and closes the listener.
func (p *proxy) accept() {
	in, err := p.ln.Accept()
	p.ln.Close()
	if err != nil {
		return
	}
	out, err := net.Dial("tcp", p.target)
	if err != nil {
		in.Close()
		return
	}
	p.mu.Lock()
	p.conns = append(p.conns, in, out)
	p.mu.Unlock()
	p.last.Store(time.Now().UnixNano())
	p.wg.Go(func() { p.forward(out, in) }) // returns when either side is closed, or at the end of the test once blackholed
	p.wg.Go(func() { p.forward(in, out) }) // likewise
	if p.idle > 0 {
		p.wg.Go(p.watchIdle) // returns once it dropped the connection, or at the end of the test
	}
}

// forward copies src to dst until either fails; once blackholed it drops what it read and
// stops reading until the test ends.
func (p *proxy) forward(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-p.hole:
			<-p.done
			return
		default:
		}
		if n > 0 {
			p.last.Store(time.Now().UnixNano())
			if _, werr := dst.Write(buf[:n]); werr != nil {
				err = werr
			}
		}
		if err != nil {
			src.Close()
			dst.Close()
			return
		}
	}
}

func (p *proxy) watchIdle() {
	tick := time.NewTicker(p.idle / 8)
	defer tick.Stop()
	for {
		select {
		case <-p.done:
			return
		case now := <-tick.C:
			if now.Sub(time.Unix(0, p.last.Load())) >= p.idle {
				close(p.dropped)
				p.closeAll()
				return
			}
		}
	}
}
