package ccexecutor

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// An attachment is one connection of a session. A session has one at a time, or none while it
// is detached (see PROTOCOL.md, Reattach). Each has an owner goroutine (Server.own: the HTTP
// handler of a reattach, or for a session's first connection one that its handler starts),
// which runs its readLoop, then waits until the session releases it, and closes the
// connection: so a connection is closed only once the session writes to it no more.
type attachment struct {
	conn   *conn
	remote string // the client's address, for the log

	dead     chan struct{} // closed by fail: the connection is lost
	failOnce sync.Once
	read     chan struct{} // closed when its readLoop returns
	released chan struct{} // closed by release: the session no longer uses conn
	relOnce  sync.Once
	closed   chan struct{} // closed by the owner once conn is closed
	broken   atomic.Bool   // the session failed the connection: the owner lingers before closing it

	acked atomic.Uint64 // the most messages a Pong on this connection acknowledged
	ackc  chan struct{} // holds a token once acked has grown

	// A reattach's request, read by serve.
	token    string     // the resume token presented
	received uint64     // how many messages the client has
	reply    chan error // serve's verdict: nil once the session is attached to it
}

func newAttachment(c *conn, remote string) *attachment {
	return &attachment{
		conn:     c,
		remote:   remote,
		dead:     make(chan struct{}),
		read:     make(chan struct{}),
		released: make(chan struct{}),
		closed:   make(chan struct{}),
		ackc:     make(chan struct{}, 1),
		reply:    make(chan error, 1),
	}
}

// fail marks the connection lost.
func (a *attachment) fail() { a.failOnce.Do(func() { close(a.dead) }) }

// release tells the owner that the session is done with the connection, and stops its reader.
func (a *attachment) release() {
	a.relOnce.Do(func() {
		a.conn.SetReadDeadline(time.Unix(1, 0))
		close(a.released)
	})
}

// pong notes a Pong's payload: an acknowledgement when it is one of ours, 8 bytes. It reports
// whether it was.
func (a *attachment) pong(payload []byte) bool {
	if len(payload) != 8 {
		return false
	}
	n := binary.BigEndian.Uint64(payload)
	for {
		old := a.acked.Load()
		if n <= old {
			return true
		}
		if a.acked.CompareAndSwap(old, n) {
			break
		}
	}
	select {
	case a.ackc <- struct{}{}:
	default:
	}
	return true
}

// ackPing is a Ping whose payload is the count of messages sent: its Pong acknowledges them.
func ackPing(sent uint64) []byte {
	return appendFrame(nil, opPing, binary.BigEndian.AppendUint64(nil, sent))
}

// newToken returns a resume token: 128 random bits in hex, after instance and a dot when
// instance is not empty.
func newToken(instance string) string {
	var b [16]byte
	rand.Read(b[:])
	if instance != "" {
		instance += "."
	}
	return instance + hex.EncodeToString(b[:])
}

// errUnknownResume refuses a reattach whose session or token does not match: one reason for
// every case, so that a guess learns nothing.
var errUnknownResume = errors.New("unknown session or token")

// A positionError refuses a reattach from a count of messages received that the replay cannot
// serve.
type positionError struct{ msg string }

func (e *positionError) Error() string { return e.msg }

// A replay holds the messages a session sent that the client has not acknowledged, for a
// client that reattaches. It belongs to the session's writer. Messages are counted from 1
// across the session's connections; a batch of n messages is held as it was written, copied.
type replay struct {
	max     int           // bytes held at most, but for the last batch
	held    []replayBatch // in order
	bytes   int           // the size of held
	dropped uint64        // messages 1..dropped are acknowledged and no longer held
	sent    uint64        // messages counted so far
	spare   [][]byte      // buffers of dropped batches, for reuse
	spared  int           // their capacity: held and spare together stay within max and a batch
}

type replayBatch struct {
	first  uint64 // the count of its first message
	b      batch
	buffer []byte // holds b's frames, line and tail
}

// full reports whether the replay holds as much as it may: the writer then takes no more.
func (r *replay) full() bool { return r.bytes >= r.max }

// add counts the messages of b and holds a copy of them. A batch of no message (a close frame)
// is not held.
func (r *replay) add(b *batch) {
	if b.n == 0 {
		return
	}
	size := len(b.frames) + len(b.line) + len(b.tail)
	var buf []byte
	if n := len(r.spare); n > 0 && cap(r.spare[n-1]) >= size {
		buf, r.spare = r.spare[n-1][:0], r.spare[:n-1]
		r.spared -= cap(buf)
	} else {
		buf = make([]byte, 0, size)
	}
	buf = append(append(append(buf, b.frames...), b.line...), b.tail...)
	h := replayBatch{first: r.sent + 1, buffer: buf}
	h.b.n = b.n
	h.b.frames = buf[:len(b.frames):len(b.frames)]
	if b.line != nil {
		h.b.line = buf[len(b.frames) : len(b.frames)+len(b.line) : len(b.frames)+len(b.line)]
		h.b.tail = buf[len(b.frames)+len(b.line):]
	}
	r.held = append(r.held, h)
	r.bytes += size
	r.sent += uint64(b.n)
}

// ack forgets the batches whose messages are all among the first n.
func (r *replay) ack(n uint64) {
	i := 0
	for ; i < len(r.held) && r.held[i].first+uint64(r.held[i].b.n)-1 <= n; i++ {
		h := &r.held[i]
		r.bytes -= len(h.buffer)
		r.dropped = h.first + uint64(h.b.n) - 1
		if r.bytes+r.spared+cap(h.buffer) <= r.max {
			r.spare = append(r.spare, h.buffer)
			r.spared += cap(h.buffer)
		}
		*h = replayBatch{}
	}
	r.held = append(r.held[:0], r.held[i:]...)
}

// since returns the batches to write to a client that has the first n messages: every message
// after them, the first batch cut to begin at message n+1.
func (r *replay) since(n uint64) ([]*batch, error) {
	switch {
	case n > r.sent:
		return nil, &positionError{fmt.Sprintf("received %d but only %d messages were sent", n, r.sent)}
	case n < r.dropped:
		return nil, &positionError{fmt.Sprintf("messages up to %d were acknowledged and are no longer held", r.dropped)}
	}
	var out []*batch
	for i := range r.held {
		h := &r.held[i]
		last := h.first + uint64(h.b.n) - 1
		if last <= n {
			continue
		}
		b := h.b // a copy: cutting it leaves the held one whole
		if h.first <= n {
			b.frames = skipFrames(b.frames, int(n-h.first+1))
		}
		out = append(out, &b)
	}
	return out, nil
}
