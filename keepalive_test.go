package ccexecutor

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
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
				p := newCutProxy(t, ts.addr)
				c := dial(t, p.addr())
				c.pong = true
				dropped := p.cutIdle(p.last(), 400*time.Millisecond)
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
						case <-dropped:
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
				p := newCutProxy(t, ts.addr)
				c := dial(t, p.addr())
				c.connected()
				pgid := 0
				if row.command != "" {
					pgid, _ = c.start(row.command, nil)
				}
				p.last().cutNow(cutHole)
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
