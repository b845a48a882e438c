package ccexecutor

import (
	"bufio"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// TestLimitListener guards against connections that hold no session using up what admitted
// sessions need: beyond its limit, LimitListener closes what it accepts at once, while the
// connections it holds, a session among them, are served; a connection that closes, hijacked
// or not, frees its place, once.
func TestLimitListener(t *testing.T) {
	const limit = 20
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(Config{Logger: slog.New(slog.DiscardHandler)})
	hs := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(LimitListener(ln, limit)) }() // returns once hs is closed
	t.Cleanup(func() {
		s.Shutdown(t.Context())
		hs.Close()
		<-served
	})
	addr := ln.Addr().String()

	c := dial(t, addr) // one place
	c.connected()
	var held []net.Conn
	for i := range 300 {
		nc, ok := healthz(t, addr)
		if ok != (i < limit-1) {
			t.Fatalf("connection %d (with a session and %d held): served = %v, want %v", i+1, len(held), ok, !ok)
		}
		if ok {
			held = append(held, nc)
		}
	}
	c.assertWorks() // the session is unharmed

	// A closed connection frees its place once the server sees it closed: until then, new
	// connections are refused.
	held[0].Close()
	for deadline := time.Now().Add(10 * time.Second); ; {
		nc, ok := healthz(t, addr)
		if ok {
			held[0] = nc
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no connection accepted within 10s after one was closed")
		}
	}
	// A session that ends frees its place before the server closes its connection.
	c.close() // returns once the server has closed the connection
	nc, ok := healthz(t, addr)
	if !ok {
		t.Fatal("no connection accepted after a session ended")
	}
	held = append(held, nc)
	if _, ok := healthz(t, addr); ok {
		t.Fatal("a connection beyond the limit was served")
	}
	for _, nc := range held {
		nc.Close()
	}

	// Closing a connection twice frees one place.
	l := LimitListener(fakeListener{}, 2).(*limitListener)
	a, _ := l.Accept()
	l.Accept()
	a.Close()
	a.Close()
	if n := l.open.Load(); n != 1 {
		t.Errorf("open connections = %d after two accepted and one closed twice, want 1", n)
	}
}

// fakeListener accepts one end of a new net.Pipe every time.
type fakeListener struct{ net.Listener }

func (fakeListener) Accept() (net.Conn, error) {
	c, _ := net.Pipe()
	return c, nil
}

// healthz opens a connection to addr and asks for /healthz on it. It returns the connection,
// kept alive, and true when it was answered 200; false when the server closed it.
func healthz(t *testing.T, addr string) (net.Conn, bool) {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(nc, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
		return nil, false // reset already
	}
	resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
	switch {
	case err == nil && resp.StatusCode == http.StatusOK:
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return nc, true
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || err != nil && strings.Contains(err.Error(), "connection reset"):
		nc.Close()
		return nil, false
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Fatal("a connection was neither served nor closed within 10s")
	}
	t.Fatalf("healthz: %v, %v", resp, err)
	return nil, false
}
