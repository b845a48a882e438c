package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestIdleConnections guards against connections that hold a file descriptor without a
// session: idle HTTP keep-alive connections are closed after --idle-timeout, and when the
// descriptor limit is near, new connections are refused rather than the pipes of an admitted
// session's next run.
func TestIdleConnections(t *testing.T) {
	t.Run("idle keep-alive connections are closed", func(t *testing.T) {
		s := startServe(t, serveEnv(), "--addr", "127.0.0.1:0", "--idle-timeout", "200ms")
		conns := openHealthz(t, s.addr, 300)
		for i, nc := range conns {
			if nc == nil {
				t.Fatalf("connection %d was not served", i+1)
			}
		}
		// A generous bound: each should be closed 200 ms after its answer.
		deadline := time.Now().Add(10 * time.Second)
		for i, nc := range conns {
			nc.SetReadDeadline(deadline)
			if n, err := nc.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
				t.Fatalf("idle connection %d: read %d bytes, %v; want it closed by the server", i+1, n, err)
			}
		}
	})

	t.Run("out of descriptors, new connections are refused", func(t *testing.T) {
		// 128 descriptors, of which 64 are the reserve and 2 x 8 the runs': 48 connections.
		const nofile, maxConns = 128, 48
		s := startServeLimited(t, nofile, "--addr", "127.0.0.1:0", "--max-sessions", "2", "--idle-timeout", "1m")
		c := rawDial(t, s.addr)
		conns := openHealthz(t, s.addr, 300)
		served := 0
		for _, nc := range conns {
			if nc != nil {
				served++
			}
		}
		if served != maxConns-1 {
			t.Errorf("%d of 300 idle connections served next to a session, want %d", served, maxConns-1)
		}
		// The admitted session still runs commands: its pipes have descriptors.
		c.send(`{"jsonrpc":"2.0","method":"execute","params":{"command":"echo ok"},"id":1}`)
		for {
			m := c.next()
			if m.Error != nil || m.Method == "process.error" {
				t.Fatalf("execute next to %d idle connections: %s", served, m.raw)
			}
			if m.Method == "process.output" && m.Params.Data != "ok\n" {
				t.Fatalf("output %q, want ok", m.Params.Data)
			}
			if m.Method == "process.completed" {
				if m.Params.ExitCode == nil || *m.Params.ExitCode != 0 {
					t.Fatalf("completed %s", m.raw)
				}
				break
			}
		}
	})
}

// openHealthz opens n connections to addr at once and asks each for /healthz. It returns
// them, kept alive, with nil for each one the server closed instead of answering, and fails
// the test, going on, for each one neither answered nor closed.
func openHealthz(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range conns {
		wg.Go(func() { conns[i], errs[i] = healthz(addr) }) // returns once answered, closed, or after runWait
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, nc := range conns {
			if nc != nil {
				nc.Close()
			}
		}
	})
	failed := 0
	for i, err := range errs {
		if err != nil && failed < 3 {
			t.Errorf("connection %d: %v", i+1, err)
		}
		if err != nil {
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d connections were neither served nor closed", failed, n)
	}
	return conns
}

// healthz asks addr for /healthz on a new connection and returns it once answered 200, or nil
// if the server closed it first.
func healthz(addr string) (net.Conn, error) {
	nc, err := net.DialTimeout("tcp", addr, runWait)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(runWait))
	resp, err := func() (*http.Response, error) {
		if _, err := io.WriteString(nc, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
			return nil, err
		}
		return http.ReadResponse(bufio.NewReader(nc), nil)
	}()
	switch {
	case err == nil && resp.StatusCode == http.StatusOK:
		io.Copy(io.Discard, resp.Body)
		nc.SetDeadline(time.Time{})
		return nc, nil
	case err == nil:
		nc.Close()
		return nil, errors.New("status " + resp.Status)
	case errors.Is(err, os.ErrDeadlineExceeded):
		nc.Close()
		return nil, errors.New("neither answered nor closed within " + runWait.String())
	default: // closed or reset by the server
		nc.Close()
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !strings.Contains(err.Error(), "reset by peer") && !strings.Contains(err.Error(), "broken pipe") {
			return nil, err
		}
		return nil, nil
	}
}

// startServeLimited is startServe with the server's descriptor limit, soft and hard, at nofile:
// the binary runs under a shell that sets it.
func startServeLimited(t *testing.T, nofile int, args ...string) *serveProc {
	t.Helper()
	cmd := exec.Command("/bin/sh", append([]string{"-c", fmt.Sprintf(`ulimit -n %d && exec "$0" "$@"`, nofile), binPath}, args...)...)
	cmd.Env = serveEnv()
	return startServeCmd(t, cmd)
}
