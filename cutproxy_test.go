package ccexecutor

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// cutProxy forwards every TCP connection it accepts on 127.0.0.1 to target, and cuts a
// connection the two ways networks lose them: a reset, sent to both ends at once, or a black
// hole, in which nothing more is forwarded either way while both sockets stay open until the
// test ends, as a peer that vanished without a FIN or a reset looks. A cut happens on demand,
// once exactly a given number of bytes from the server has been forwarded to the client, so
// that a test places it in the middle of a frame without a clock, or once no byte has passed
// either way for a while, as a NAT table or a proxy with an idle timeout drops a connection.
type cutProxy struct {
	ln     net.Listener
	target string
	done   chan struct{} // closed when the test ends
	wg     sync.WaitGroup

	mu    sync.Mutex
	links []*link // the connections accepted, in order
}

// cutMode is how a link is cut.
type cutMode int

const (
	cutReset cutMode = iota + 1 // both ends get a TCP reset
	cutHole                     // nothing more passes; both ends stay open
)

func (m cutMode) String() string {
	return map[cutMode]string{cutReset: "reset", cutHole: "black hole"}[m]
}

// link is one forwarded connection.
type link struct {
	client, server *net.TCPConn
	done           <-chan struct{} // the proxy's
	cut            chan struct{}   // closed once the link is cut
	hole           chan struct{}   // closed when the cut is a black hole
	once           sync.Once
	down           atomic.Int64 // bytes forwarded from the server to the client
	last           atomic.Int64 // when a byte last passed either way, in Unix nanoseconds

	mu    sync.Mutex
	after int64   // with mode, cut once down reaches after
	mode  cutMode // 0: no cut planned
}

func newCutProxy(t testing.TB, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, done: make(chan struct{})}
	p.wg.Go(p.accept) // returns once the listener is closed
	t.Cleanup(func() {
		close(p.done)
		ln.Close()
		p.mu.Lock()
		for _, l := range p.links {
			l.client.Close()
			l.server.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

// last returns the link accepted last; a client's handshake through the proxy has completed
// only once its link exists, so after a dial it is that client's.
func (p *cutProxy) last() *link {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.links) == 0 {
		return nil
	}
	return p.links[len(p.links)-1]
}

func (p *cutProxy) accept() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		l := &link{client: in.(*net.TCPConn), server: out.(*net.TCPConn), done: p.done,
			cut: make(chan struct{}), hole: make(chan struct{})}
		l.last.Store(time.Now().UnixNano())
		p.mu.Lock()
		p.links = append(p.links, l)
		p.mu.Unlock()
		p.wg.Go(func() { l.forward(l.client, l.server, true) })  // returns at the end of either side or a cut, or with the test once blackholed
		p.wg.Go(func() { l.forward(l.server, l.client, false) }) // likewise
	}
}

// cutAfter plans a cut of mode once n more bytes have been forwarded from the server to the
// client.
func (l *link) cutAfter(n int64, mode cutMode) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.after, l.mode = l.down.Load()+n, mode
}

// cutIdle resets the link once no byte has passed either way for idle, checked every idle/8,
// and returns a channel closed when it did.
func (p *cutProxy) cutIdle(l *link, idle time.Duration) <-chan struct{} {
	dropped := make(chan struct{})
	p.wg.Go(func() { // returns once it cut the link, or at the end of the test
		tick := time.NewTicker(idle / 8)
		defer tick.Stop()
		for {
			select {
			case <-p.done:
				return
			case now := <-tick.C:
				if now.Sub(time.Unix(0, l.last.Load())) >= idle {
					close(dropped)
					l.cutWith(cutReset)
					return
				}
			}
		}
	})
	return dropped
}

// cutNow cuts the link at once.
func (l *link) cutNow(mode cutMode) { l.cutWith(mode) }

func (l *link) cutWith(mode cutMode) {
	l.once.Do(func() {
		if mode == cutHole {
			close(l.hole)
			close(l.cut)
			return
		}
		close(l.cut)          // first, so that an end seen at either side is seen after it
		l.client.SetLinger(0) // Close sends a reset
		l.server.SetLinger(0)
		l.client.Close()
		l.server.Close()
	})
}

// allow returns how many of the n bytes just read from the server may be forwarded before a
// planned cut, and the cut due after them, if any.
func (l *link) allow(n int) (int, cutMode) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mode == 0 {
		return n, 0
	}
	left := l.after - l.down.Load()
	if int64(n) < left {
		return n, 0
	}
	return int(max(left, 0)), l.mode
}

// forward copies src to dst until src ends, either fails or the link is cut. At the end of
// src it half-closes dst, so that what is in flight the other way still arrives, as through
// a real network; once blackholed it drops what it read and waits for the end of the test.
func (l *link) forward(dst, src *net.TCPConn, down bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-l.hole:
			<-l.done
			return
		default:
		}
		mode := cutMode(0)
		if down && n > 0 {
			n, mode = l.allow(n)
		}
		if n > 0 {
			l.last.Store(time.Now().UnixNano())
			if _, werr := dst.Write(buf[:n]); werr != nil && err == nil {
				err = werr
			}
			if down {
				l.down.Add(int64(n))
			}
		}
		if mode != 0 {
			l.cutWith(mode)
			continue // the next read returns at once: an error after a reset, the hole otherwise
		}
		switch {
		case errors.Is(err, io.EOF):
			dst.CloseWrite()
			return
		case err != nil:
			select {
			case <-l.cut:
			default:
				src.Close()
				dst.Close()
			}
			return
		}
	}
}

// TestCutProxy checks the proxy that the reattach tests rely on: a cut after n bytes lets
// exactly n bytes through, a reset reaches both ends, and a black hole leaves both ends open
// with nothing passing.
func TestCutProxy(t *testing.T) {
	for _, mode := range []cutMode{cutReset, cutHole} {
		t.Run(mode.String(), func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			p := newCutProxy(t, ln.Addr().String())
			nc, err := net.Dial("tcp", p.addr())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			sc, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer sc.Close()
			// The link exists once a byte has passed through it.
			if _, err := nc.Write([]byte("h")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(sc, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			const n = 50_001
			p.last().cutAfter(n, mode)
			if _, err := sc.Write(bytes.Repeat([]byte("x"), 3*n)); err != nil {
				t.Fatal(err)
			}
			nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(io.LimitReader(nc, n))
			if mode == cutReset {
				// The reset may overtake bytes that were forwarded but not yet read.
				if len(got) > n || !errors.Is(err, syscall.ECONNRESET) && err != nil {
					t.Fatalf("read %d bytes, %v", len(got), err)
				}
				if err == nil {
					_, err = nc.Read(make([]byte, 1))
				}
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("client after the cut: %v, want a reset", err)
				}
				sc.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := sc.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("server after the cut: %v, want a reset", err)
				}
				return
			}
			if len(got) != n || err != nil {
				t.Fatalf("read %d bytes, %v; want %d", len(got), err, n)
			}
			<-p.last().cut
			if _, err := nc.Write([]byte("lost")); err != nil {
				t.Errorf("client write after the cut: %v", err)
			}
			// Nothing more arrives, and neither end learns of an end.
			nc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			sc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if k, err := nc.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("client read after the cut: %d bytes, %v; want nothing", k, err)
			}
			if k, err := sc.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("server read after the cut: %d bytes, %v; want nothing", k, err)
			}
		})
	}
}
