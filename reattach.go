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

// replayChunk is the size of the buffers a replay packs messages into, end to end. A message
// larger than that has a buffer of its own, and so has a long line's batch larger than that.
const replayChunk = 64 << 10

// A replay holds the messages a session sent that the client has not acknowledged, for a
// client that reattaches. It belongs to the session's writer. Messages are counted from 1
// across the session's connections. What it holds it copies into chunks, each packed with the
// messages of one batch after another; a batch that overflows a chunk is held as a run of
// whole messages in each buffer it takes, and the room a chunk's last message leaves counts as
// held. Chunks are reused, so that a replay that keeps up allocates nothing, and the memory it
// keeps is what it held at its fullest: its size, twice the batch that filled it (once more
// for the room its messages left at the ends of chunks), and two chunks (the acknowledged
// front of the first chunk, the room at the end of the last) at most.
type replay struct {
	max     int           // bytes held at most, but for the last batch
	held    []replayBatch // in order
	bytes   int           // the size of held
	dropped uint64        // messages 1..dropped are acknowledged and no longer held
	sent    uint64        // messages counted so far

	bufs  [][]byte // the buffers of held, oldest first; messages are packed into the last
	base  int      // how many buffers were let go before bufs[0]
	spare [][]byte // chunks no longer used, for reuse
}

// A replayBatch is a run of whole messages: all of a batch, or a part of one cut between two
// messages.
type replayBatch struct {
	first uint64 // the count of its first message
	b     batch
	buf   int // the buffer it is in, counted from the replay's first
	size  int // its bytes, and the room it left at the end of its buffer
}

// full reports whether the replay holds as much as it may: the writer then takes no more.
func (r *replay) full() bool { return r.bytes >= r.max }

// add counts the messages of b and holds a copy of them. A batch of no message (a close frame)
// is not held.
func (r *replay) add(b *batch) {
	if b.n == 0 {
		return
	}
	if b.line != nil { // a long line's batch, which writeLoop escapes as it writes: in one buffer
		buf := r.room(len(b.frames) + len(b.line) + len(b.tail))
		frames, line, tail := r.put(buf, b.frames), r.put(buf, b.line), r.put(buf, b.tail)
		r.hold(batch{frames: frames, line: line, tail: tail, n: b.n})
		return
	}
	for frames := b.frames; len(frames) > 0; {
		buf := r.room(frameLen(frames))
		size, n := 0, 0 // the whole messages that fit
		for size < len(frames) && size+frameLen(frames[size:]) <= cap(*buf)-len(*buf) {
			size += frameLen(frames[size:])
			n++
		}
		r.hold(batch{frames: r.put(buf, frames[:size]), n: n})
		frames = frames[size:]
	}
}

// room returns the last buffer if it has room for need bytes, else grow's new one.
func (r *replay) room(need int) *[]byte {
	if k := len(r.bufs); k > 0 && need <= cap(r.bufs[k-1])-len(r.bufs[k-1]) {
		return &r.bufs[k-1]
	}
	return r.grow(need)
}

// grow adds a buffer with room for need bytes, to pack into from then on, and returns it: a
// spare chunk, a new one, or a buffer of need bytes if that is more than a chunk. The room the
// last buffer has left counts as held by the last message in it.
func (r *replay) grow(need int) *[]byte {
	if k := len(r.bufs); k > 0 {
		room := cap(r.bufs[k-1]) - len(r.bufs[k-1])
		r.held[len(r.held)-1].size += room // the last buffer holds the last message
		r.bytes += room
	}
	var buf []byte
	switch n := len(r.spare); {
	case need > replayChunk:
		// Let go of the spare chunks, which this buffer does not use: with them the replay
		// could hold more than at its fullest.
		clear(r.spare)
		r.spare = r.spare[:0]
		buf = make([]byte, 0, need)
	case n > 0:
		buf, r.spare = r.spare[n-1], r.spare[:n-1]
	default:
		buf = make([]byte, 0, replayChunk)
	}
	r.bufs = append(r.bufs, buf)
	return &r.bufs[len(r.bufs)-1]
}

// put appends p to *buf, which has room for it, and returns the copy, or nil for a nil p.
func (r *replay) put(buf *[]byte, p []byte) []byte {
	if p == nil {
		return nil
	}
	start := len(*buf)
	*buf = append(*buf, p...)
	return (*buf)[start:len(*buf):len(*buf)]
}

// hold holds b, whose messages come after those held and are in the last buffer, and counts
// them.
func (r *replay) hold(b batch) {
	size := len(b.frames) + len(b.line) + len(b.tail)
	r.held = append(r.held, replayBatch{first: r.sent + 1, b: b, buf: r.base + len(r.bufs) - 1, size: size})
	r.bytes += size
	r.sent += uint64(b.n)
}

// ack forgets the batches whose messages are all among the first n, and lets go of the buffers
// that no longer hold any; chunks are kept for reuse.
func (r *replay) ack(n uint64) {
	i := 0
	for ; i < len(r.held) && r.held[i].first+uint64(r.held[i].b.n)-1 <= n; i++ {
		h := &r.held[i]
		r.bytes -= h.size
		r.dropped = h.first + uint64(h.b.n) - 1
		*h = replayBatch{}
	}
	r.held = append(r.held[:0], r.held[i:]...)
	keep := r.base + len(r.bufs) // the first buffer in use: when nothing is held, none is
	if len(r.held) > 0 {
		keep = r.held[0].buf
	}
	k := keep - r.base
	for _, buf := range r.bufs[:k] {
		if cap(buf) == replayChunk {
			r.spare = append(r.spare, buf[:0])
		}
	}
	left := copy(r.bufs, r.bufs[k:])
	clear(r.bufs[left:])
	r.bufs, r.base = r.bufs[:left], keep
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
