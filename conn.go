package ccexecutor

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// hijacker lets x/net/websocket take over the connection through conn, so that every write to
// the socket passes the same lock and deadline.
type hijacker struct {
	http.ResponseWriter
	wait time.Duration
	conn *conn
}

func (h *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, rw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.conn = newConn(nc, h.wait)
	if lc, ok := nc.(*limitedConn); ok {
		h.conn.raw = lc.Conn // net.Buffers.WriteTo uses writev only on the net package's own types
	}
	// Read through conn too, so that it sees every frame the client sends, Pongs included;
	// what the server read ahead comes first.
	ahead, _ := rw.Reader.Peek(rw.Reader.Buffered())
	h.conn.in = bufio.NewReader(io.MultiReader(bytes.NewReader(bytes.Clone(ahead)), h.conn))
	return h.conn, bufio.NewReadWriter(h.conn.in, bufio.NewWriter(h.conn)), nil
}

// conn is a hijacked connection. Its writes are serialized and each gets a fresh deadline: the
// session's writer and x/net/websocket answering a client's Ping are its two writers. It notes
// when the client last sent anything, so that a Ping left unanswered can be noticed.
type conn struct {
	net.Conn
	wait atomic.Int64  // the write deadline, a time.Duration: WriteWait, or less during a takeover
	in   *bufio.Reader // reads from conn, read-ahead first: the handshake's reader, then readLoop's

	raw      net.Conn     // for writev: the connection under Conn when Conn is a limitedConn; nil means Conn
	mu       sync.Mutex   // serializes writes; held across a write, so that frames stay whole
	aborted  atomic.Bool  // set by abort: every write fails from then on
	lastRead atomic.Int64 // when a read last returned data, in Unix nanoseconds
}

// newConn returns nc as a conn whose writes have the deadline wait.
func newConn(nc net.Conn, wait time.Duration) *conn {
	c := &conn{Conn: nc}
	c.wait.Store(int64(wait))
	return c
}

func (c *conn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.lastRead.Store(time.Now().UnixNano())
	}
	return n, err
}

// readSince reports whether the client has sent anything since t.
func (c *conn) readSince(t time.Time) bool { return c.lastRead.Load() >= t.UnixNano() }

// Write writes b, which holds whole frames, as one write of its own.
func (c *conn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.writeLocked(b)
}

// writeLocked writes b with c.mu held. A write that has not ended when its deadline passes
// goes on with a fresh deadline if the client accepted at least minProgress bytes of it
// meanwhile: so what counts is the client's progress, not how much was queued.
func (c *conn) writeLocked(b []byte) (int, error) {
	n := 0
	for {
		if err := c.deadline(); err != nil {
			return n, err
		}
		m, err := c.Conn.Write(b[n:])
		n += m
		if !c.progressed(m, err) {
			return n, err
		}
	}
}

// writevLocked writes bufs with as few system calls as the connection allows (writev on TCP),
// with c.mu held, and deadlines as in writeLocked. It consumes bufs.
func (c *conn) writevLocked(bufs *net.Buffers) error {
	w := c.raw
	if w == nil {
		w = c.Conn
	}
	for {
		if err := c.deadline(); err != nil {
			return err
		}
		m, err := bufs.WriteTo(w)
		if !c.progressed(int(m), err) {
			return err
		}
	}
}

// progressed reports whether a write that wrote m bytes and returned err should go on: it
// stopped at its deadline, yet the client accepted at least minProgress bytes.
func (c *conn) progressed(m int, err error) bool {
	return err != nil && m >= minProgress && errors.Is(err, os.ErrDeadlineExceeded)
}

// writeBatches writes the frames of batches in order, holding c.mu throughout so that no other
// write lands inside a frame. The long line of a batch is escaped escapeChunk bytes at a time
// into scratch, each piece written before the next is made, so that its JSON, up to six times
// its size, is never held whole. bufs is a buffer for the writev slices; its array is kept.
func (c *conn) writeBatches(batches []*batch, bufs *net.Buffers, scratch *[]byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	flush := func() error {
		if len(*bufs) == 0 {
			return nil
		}
		w := *bufs // writevLocked consumes what it writes; bufs keeps its array
		*bufs = (*bufs)[:0]
		return c.writevLocked(&w)
	}
	*bufs = (*bufs)[:0]
	for _, b := range batches {
		*bufs = append(*bufs, b.frames)
		for rest := b.line; len(rest) > 0; {
			if err := flush(); err != nil { // before scratch is reused
				return err
			}
			n := escapeCut(rest, escapeChunk)
			*scratch = appendEscaped((*scratch)[:0], rest[:n])
			*bufs = append(*bufs, *scratch)
			rest = rest[n:]
		}
		if b.line != nil {
			*bufs = append(*bufs, b.tail)
		}
	}
	return flush()
}

// minProgress is how many bytes a client must accept per write wait while output waits for
// it. Not one byte: on Linux a client that reads nothing still takes a few tens of kilobytes
// per window of ten seconds for a while, as the kernel compacts its receive queue.
const minProgress = 128 << 10

// deadline sets the deadline of the write about to start, unless the connection was aborted.
// The check comes after the deadline is set, so that an abort either is seen here or moves
// the deadline of the write that follows into the past.
func (c *conn) deadline() error {
	w := c.wait.Load()
	c.Conn.SetWriteDeadline(time.Now().Add(time.Duration(w)))
	if w2 := c.wait.Load(); w2 != w { // changed meanwhile by setWait, whose deadline this one may have replaced
		c.Conn.SetWriteDeadline(time.Now().Add(time.Duration(w2)))
	}
	if c.aborted.Load() {
		return net.ErrClosed
	}
	return nil
}

// setWait makes d the write deadline, for the write in progress too.
func (c *conn) setWait(d time.Duration) {
	c.wait.Store(int64(d))
	c.Conn.SetWriteDeadline(time.Now().Add(d))
}

// linger half-closes the connection, then reads and drops what the client still sends until
// it closes its end, for at most d. Closing with bytes unread would send a reset, which may
// destroy the close frame before the client reads it.
func (c *conn) linger(d time.Duration) {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		c.Conn.SetReadDeadline(time.Now().Add(d))
		io.Copy(io.Discard, c.in)
	}
}

// abort makes the write in progress, if any, and every later write fail at once, without
// closing the connection and without waiting for the writer's lock.
func (c *conn) abort() {
	c.aborted.Store(true)
	c.Conn.SetWriteDeadline(time.Now())
}

// dropReason is the drop constant of a client whose write failed with err: dropWriteDeadline
// if err is the deadline's and not that of an abort, which comes after the client is gone;
// else -1.
func dropReason(c *conn, err error) int {
	if errors.Is(err, os.ErrDeadlineExceeded) && !c.aborted.Load() {
		return dropWriteDeadline
	}
	return -1
}
