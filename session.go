package ccexecutor

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// registry holds the server's sessions and enforces the session limit.
type registry struct {
	max int

	mu       sync.Mutex            // guards the fields below; held for map and counter work only
	sessions map[*session]struct{} // the sessions admitted and not yet ended
	closing  bool                  // Shutdown has begun: admit no more
	drained  chan struct{}         // closed once closing and no session is left
}

var (
	errLimit   = errors.New("ccexecutor: session limit exceeded")
	errClosing = errors.New("ccexecutor: server shutting down")
)

// add admits s unless the server is shutting down or holds max sessions already. The check and
// the insert happen under one lock, so that concurrent connects can never exceed the limit.
func (r *registry) add(s *session) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.closing:
		return errClosing
	case len(r.sessions) >= r.max:
		return errLimit
	}
	r.sessions[s] = struct{}{}
	return nil
}

// lookup returns the session with the given id, or nil. It looks at each: there are at most
// max, and a reattach is rare.
func (r *registry) lookup(id string) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	for s := range r.sessions {
		if s.id == id {
			return s
		}
	}
	return nil
}

// remove frees the slot of s.
func (r *registry) remove(s *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.sessions, s)
	r.closeDrainedLocked()
}

// closeDrainedLocked closes drained if shutdown has begun and no session is left.
func (r *registry) closeDrainedLocked() {
	if r.closing && len(r.sessions) == 0 {
		select {
		case <-r.drained:
		default:
			close(r.drained)
		}
	}
}

// close stops admitting sessions and returns a channel closed once the last one has ended.
func (r *registry) close() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closing = true
	r.closeDrainedLocked()
	return r.drained
}

// len is the number of sessions admitted and not yet ended.
func (r *registry) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sessions)
}

// queueLen is how many batches may wait for a session's writer.
const queueLen = 8

// A session is one client's: a WebSocket connection, or, with a reattach window, the
// connections it reattaches through one after another. Its goroutines are the one running
// serve, which owns all of its state and answers requests in order; writeLoop, its only
// writer; and, while a command runs, runToEnd with the goroutines it starts. serve returns only
// after all of them have returned. Each connection's reader, readLoop, belongs to the
// connection's attachment (reattach.go).
type session struct {
	id     string
	srv    *Server
	remote string // the first client's address, for the log

	ctx    context.Context         // done when the server shuts down or the session ends
	cancel context.CancelCauseFunc // ends ctx with the reason the session ends

	in      chan inFrame                  // frames received, for serve
	out     chan *batch                   // encoded frames, for writeLoop; closed by serve when it is done
	attachc chan attachOrder              // attachments, from serve to writeLoop
	resume  chan *attachment              // reattaches, from their handlers to serve
	failed  chan struct{}                 // closed by writeLoop when no client can get what is sent
	flushed chan struct{}                 // closed when writeLoop returns
	ended   chan runResult                // a finished run's result, from runToEnd to serve
	run     *run                          // the run in progress, or nil; serve alone uses it
	att     *attachment                   // the connection, or nil while detached; serve's
	token   string                        // the resume token, when the server has a reattach window; serve's
	bye     *batch                        // the close frame that answers the client's, or fails the connection; serve's
	wg      sync.WaitGroup                // the session's goroutines
	log     func(msg string, args ...any) // logs with the session's id

	firstOut atomic.Int64 // the start of the run, in Unix nanoseconds, until its first output line; then 0
}

// reattaching reports whether the session survives a lost connection.
func (s *session) reattaching() bool { return s.srv.cfg.ReattachWindow > 0 }

// connected is the notification that starts the session on a connection.
func (s *session) connected() *batch {
	var window float64
	if s.reattaching() {
		window = s.srv.cfg.ReattachWindow.Seconds()
	}
	return notification("connected", struct {
		SessionID      string   `json:"session_id"`
		Version        string   `json:"version"`
		Capabilities   []string `json:"capabilities"`
		ResumeToken    string   `json:"resume_token,omitempty"`
		ReattachWindow float64  `json:"reattach_window,omitempty"`
	}{s.id, Version, []string{"execute", "control", "stream"}, s.token, window})
}

// serve runs the session on its first connection, a, until the client leaves, a write fails or
// the server shuts down; with a reattach window, until the client closes, or stays away for the
// whole window.
func (s *session) serve(a *attachment) {
	s.wg.Go(s.writeLoop) // returns once out is closed and drained, or once no client can get what is sent
	if s.reattaching() {
		s.token = newToken(s.srv.cfg.Instance)
	}
	// This cannot fail: writeLoop takes the first connection before anything else.
	s.attach(a, 0, false)
	var expire <-chan time.Time // while detached, the end of the window
	for s.ctx.Err() == nil {
		var dead <-chan struct{}
		if s.att != nil {
			dead = s.att.dead
		}
		select {
		case f := <-s.in:
			switch {
			case f.from != s.att:
				// From a connection the session left: a takeover replaced it.
			case f.bye != nil:
				s.bye = f.bye // the client closed, or broke the protocol: the session ends
				s.att.broken.Store(f.failed)
				s.cancel(errClientGone)
			default:
				s.handle(f)
			}
		case <-dead:
			if !s.reattaching() {
				s.cancel(errClientGone)
				break
			}
			s.att.conn.abort() // fail the write in progress at once
			s.att = nil
			s.srv.metrics.detach(1)
			expire = time.After(s.srv.cfg.ReattachWindow)
			s.log("session detached", "window", s.srv.cfg.ReattachWindow)
		case a := <-s.resume:
			if s.ctx.Err() != nil { // ended meanwhile: writeLoop no longer holds what it sends
				a.reply <- errUnknownResume
				break
			}
			if s.reattach(a) {
				expire = nil // writeLoop counted it before it wrote connected
			}
		case <-expire:
			s.log("reattach window passed")
			s.cancel(errClientGone)
		case res := <-s.ended:
			s.finish(res)
		case <-s.failed:
			s.cancel(errClientGone)
		case <-s.ctx.Done():
		}
	}
	if expire != nil {
		s.srv.metrics.detach(-1)
	}
	cause := context.Cause(s.ctx)
	if cause == errClientGone && s.bye == nil && s.att != nil {
		s.att.conn.abort() // nobody to say goodbye to: fail any write at once
	}
	if s.run != nil {
		s.run.cancel(cause) // the run of a session that ends, ends now
		s.finish(<-s.ended)
	}
	if cause == errShutdown {
		s.send(closeFrame(1001, "Server shutting down"))
	}
	if s.bye != nil {
		s.send(s.bye) // the last frame; serveConn closes the connection once it is written
	}
	close(s.out)
	<-s.flushed // every queued frame is written, or no client can get them
	if s.att != nil {
		s.att.conn.SetReadDeadline(time.Unix(1, 0)) // stops its readLoop without closing: see serveConn
		<-s.att.read
	}
	s.wg.Wait()
}

// attachOrder hands writeLoop a connection: it writes connected on it, then the messages after
// the first from, then goes on there; done gets nil, or why it cannot replay from there.
type attachOrder struct {
	a         *attachment
	from      uint64
	connected *batch
	done      chan error
	resume    bool // a reattach, which writeLoop refuses once the session has ended
	detached  bool // a reattach of a detached session, not a takeover
}

// attach makes a the session's connection: writeLoop takes it over from the one before, if
// any, and replays what was sent after the first from messages. resume is false for the
// session's first connection. It returns nil once a is attached, or why it is not.
func (s *session) attach(a *attachment, from uint64, resume bool) error {
	o := attachOrder{a, from, s.connected(), make(chan error, 1), resume, resume && s.att == nil}
	select {
	case s.attachc <- o: // writeLoop takes it between two writes
	case <-s.flushed: // the session ended with no connection
		return errUnknownResume
	}
	if err := <-o.done; err != nil {
		return err
	}
	s.att = a
	return nil
}

// takeoverWait is the write deadline of a connection that a reattach takes over: time for the
// write in progress and the close frame that says why.
const takeoverWait = time.Second

// reattach attaches the connection of a reattach when its token is the session's, and gives it a
// fresh token: each works once. It answers on a.reply once the session is as it will stay, and
// reports whether a is attached.
func (s *session) reattach(a *attachment) bool {
	if subtle.ConstantTimeCompare([]byte(a.token), []byte(s.token)) != 1 {
		a.reply <- errUnknownResume
		return false
	}
	if s.att != nil {
		// A takeover: the writer may be stuck on the old connection, which may be the one a
		// network blip cut without a word. Give it a moment, not a whole write wait.
		s.att.conn.setWait(min(takeoverWait, s.srv.cfg.WriteWait))
	}
	token := s.token
	s.token = newToken(s.srv.cfg.Instance)
	err := s.attach(a, a.received, true)
	if err != nil {
		s.token = token // a refused reattach spends nothing
		if s.att != nil {
			s.att.conn.setWait(s.srv.cfg.WriteWait) // nor keeps the connection it did not take over in a hurry
		}
	} else {
		s.log("session reattached", "remote", a.remote, "received", a.received)
	}
	a.reply <- err
	return err == nil
}

// readLoop hands every message the client sends on a's connection to serve, and answers its
// Pings, until a read fails, the client sends a close frame or breaks the protocol. The last
// two are handed to serve as the close frame to answer with; a failed read marks a lost.
func (s *session) readLoop(a *attachment) {
	defer close(a.read)
	bye := false // the client closed or broke the protocol, or the session ends: the connection is not lost
	odd := false // a Pong without an acknowledgement was logged
	defer func() {
		if !bye {
			a.fail()
		}
	}()
	fr := frameReader{r: a.conn.in, max: s.srv.cfg.MaxMessageBytes}
	for {
		in := inFrame{from: a}
		f, err := fr.next()
		var perr *protocolError
		switch {
		case errors.As(err, &perr):
			s.log("protocol error", "error", perr.reason)
			in.bye, in.failed = closeFrame(perr.code, perr.reason), true
		case err != nil:
			return
		case f.op == opPing:
			if _, err := a.conn.Write(appendFrame(nil, opPong, f.data)); err != nil {
				return
			}
			continue
		case f.op == opPong: // conn.Read noted it for the keep-alive
			if !a.pong(f.data) && s.reattaching() && !odd {
				odd = true
				s.srv.log.Warn("a Pong that does not echo the server's Ping: nothing is acknowledged, and the run will wait once the reattach buffer is full",
					"session", s.id, "remote", a.remote, "payload_bytes", len(f.data))
			}
			continue
		case f.op == opClose:
			in.bye = closeFrame(f.code, "")
		default:
			in.data, in.binary, in.tooLarge = f.data, f.op == opBinary, f.tooLarge
		}
		select {
		case s.in <- in:
		case <-s.ctx.Done():
			bye = true
			return
		case <-a.released:
			return
		}
		if bye = in.bye != nil; bye {
			return
		}
	}
}

// send queues b for the writer. It drops b when no client can get it, since then the session
// is ending, and reports whether b was queued.
func (s *session) send(b *batch) bool {
	select {
	case s.out <- b:
		return true
	case <-s.failed:
		return false
	}
}

// writeLoop writes the frames queued on out to the session's connection, several at a time
// when several are queued. Every PingInterval it sends a Ping, unless frames passed both ways
// meanwhile: so a silent connection stays open through proxies, and a client that vanished is
// noticed even while output flows. The client is gone when a write fails or it sent nothing,
// not even a Pong, in the PingInterval after a Ping. Without a reattach window writeLoop then
// returns; otherwise the connection is lost and the session detached, and writeLoop holds
// what is sent in its replay (reattach.go), up to its size, for the next connection. It
// returns once out is closed and drained, or once the session ends with no connection.
func (s *session) writeLoop() {
	defer close(s.flushed)
	tick := time.NewTicker(s.srv.cfg.PingInterval)
	defer tick.Stop()
	var (
		att     *attachment // the connection written to, or nil
		rb      *replay     // the messages not acknowledged, with a reattach window
		queued  []*batch
		bufs    net.Buffers
		scratch []byte       // a piece of a long line, escaped
		wrote   bool         // a frame was written since the last tick
		last    = time.Now() // the last tick
		pinged  time.Time    // when the Ping that awaits an answer was sent, or zero
		unacked int          // bytes written since the last Ping that acknowledges them
		// The batches taken while the replay is full, in order, until it has room. A pump's
		// wait for their return, as for any batch; the others are serve's, which must not
		// wait on the replay: it may be about to read the Pong that frees it.
		parked      []*batch
		parkedBytes int // the size of the parked batches that are serve's
	)
	if s.reattaching() {
		rb = &replay{max: s.srv.cfg.ReattachBuffer}
	}
	ping := func() []byte {
		if rb == nil {
			return appendFrame(nil, opPing, nil)
		}
		unacked = 0
		return ackPing(rb.sent)
	}
	// lose ends the use of att, whose client is gone, and reports whether writeLoop goes on.
	lose := func(why int) bool {
		if why >= 0 {
			s.srv.metrics.drop(why)
		}
		if rb == nil {
			close(s.failed)
			return false
		}
		att.fail()
		att.conn.abort()
		att.release()
		att = nil
		return true
	}
	// write writes the batches queued, if there is a connection, and gives the pumps' back;
	// it reports whether writeLoop goes on.
	write := func() bool {
		var err error
		if att != nil {
			err = att.conn.writeBatches(queued, &bufs, &scratch)
		}
		for i, b := range queued {
			unacked += len(b.frames) + len(b.line)
			if b.free != nil {
				b.free <- b // never blocks: it has room for every batch of its pump
			}
			queued[i] = nil
		}
		if att != nil && err == nil {
			wrote = true
			if rb != nil && unacked >= rb.max/4 {
				_, err = att.conn.Write(ping())
			}
		}
		return err == nil || lose(dropReason(att.conn, err))
	}
	// take makes o's the connection written to, unless it is refused, and reports whether
	// writeLoop goes on.
	take := func(o attachOrder) bool {
		if o.resume && s.ctx.Err() != nil {
			o.done <- errUnknownResume // what was sent since the session ended is not held
			return true
		}
		var replayed []*batch
		if rb != nil {
			var err error
			if replayed, err = rb.since(o.from); err != nil {
				o.done <- err
				return true
			}
		}
		if att != nil { // taken over
			att.conn.Write(closeFrame(4001, "Session taken over by another connection").frames)
			att.release()
		}
		if o.resume { // counted before connected goes out: whoever has read it sees the count
			s.srv.metrics.reattach(o.detached)
		}
		o.done <- nil
		att, wrote, last, pinged = o.a, true, time.Now(), time.Time{}
		err := att.conn.writeBatches(append([]*batch{o.connected}, replayed...), &bufs, &scratch)
		if err == nil && rb != nil && rb.bytes > 0 {
			_, err = att.conn.Write(ping()) // the replay may have filled the buffer: free it at once
		}
		return err == nil || lose(dropReason(att.conn, err))
	}
	// The session's first connection comes first, even if the session has ended meanwhile
	// (a Shutdown): its client gets connected, then why the session ends.
	if !take(<-s.attachc) {
		return
	}
	for {
		// Once the session ends no reattach can come: what is sent is no longer held, and no
		// longer waits for a Pong to free room, which a client that closed will not send.
		holding := rb != nil && s.ctx.Err() == nil
		for len(parked) > 0 && (!holding || !rb.full()) {
			queued = queued[:0]
			for len(parked) > 0 && len(queued) < queueLen && (!holding || !rb.full()) {
				b := parked[0]
				parked[0], parked = nil, parked[1:]
				if b.free == nil {
					parkedBytes -= len(b.frames)
				}
				queued = append(queued, b)
				if holding {
					rb.add(b)
				}
			}
			if !write() {
				return
			}
		}
		var (
			in     = s.out
			dead   <-chan struct{}
			acked  <-chan struct{}
			done   <-chan struct{}
			ending <-chan struct{}
		)
		if holding && rb.full() {
			ending = s.ctx.Done() // which frees the parked batches, as a Pong that frees room does
		}
		switch {
		case rb == nil:
			// Without a reattach window a lost client ends the session: serve aborts the
			// connection, and the next write fails.
		case att != nil:
			dead, acked = att.dead, att.ackc
		default:
			done = s.ctx.Done() // nobody can attach any more once the session ends
		}
		select {
		case b, ok := <-in:
			if !ok && len(parked) > 0 {
				continue // the session has ended: the loop's top writes them first
			}
			if !ok {
				return
			}
			if holding && (rb.full() || len(parked) > 0) {
				parked = append(parked, b)
				if b.free == nil {
					parkedBytes += len(b.frames)
				}
				if parkedBytes >= rb.max {
					// A client that has a buffer of answers waiting and acknowledges nothing
					// is gone, as one that reads nothing is: serve would wait on it for ever.
					s.log("client gone: a reattach buffer of answers waits for its acknowledgement", "bytes", parkedBytes)
					s.cancel(errClientGone)
				}
				continue
			}
			queued = append(queued[:0], b)
			if holding {
				rb.add(b)
			}
		drain:
			for len(queued) < queueLen && (!holding || !rb.full()) {
				select {
				case b, ok := <-s.out:
					if !ok {
						break drain
					}
					queued = append(queued, b)
					if holding {
						rb.add(b)
					}
				default:
					break drain
				}
			}
			if !write() {
				return
			}
		case o := <-s.attachc:
			if !take(o) {
				return
			}
		case <-dead:
			lose(-1)
		case <-ending:
		case <-acked:
			rb.ack(att.acked.Load())
		case <-done:
			close(s.failed)
			return
		case now := <-tick.C:
			if att == nil {
				continue
			}
			if !pinged.IsZero() && !att.conn.readSince(pinged) {
				if !lose(dropPing) {
					return
				}
				continue
			}
			busy := wrote && att.conn.readSince(last)
			wrote, last, pinged = false, now, time.Time{}
			if busy {
				continue
			}
			pinged = now
			if _, err := att.conn.Write(ping()); err != nil && !lose(dropReason(att.conn, err)) {
				return
			}
		}
	}
}

// inFrame is a message received from the client, or the end of its session.
type inFrame struct {
	from     *attachment // the connection it came on
	data     []byte
	binary   bool
	tooLarge bool
	bye      *batch // if not nil, the session ends with this close frame as its last frame
	failed   bool   // bye fails the connection: the client broke RFC 6455
}

// handle answers one frame from the client.
func (s *session) handle(f inFrame) {
	switch {
	case f.tooLarge:
		s.send(errorResponse(nil, &rpcError{codeInvalidRequest, fmt.Sprintf("Invalid Request: message exceeds %d bytes", s.srv.cfg.MaxMessageBytes)}))
		return
	case f.binary:
		s.send(errorResponse(nil, &rpcError{codeInvalidRequest, "Invalid Request: binary frames are not supported"}))
		return
	}
	id, method, params, rerr := parseRequest(f.data)
	if rerr != nil {
		s.send(errorResponse(id, rerr))
		return
	}
	switch method {
	case "execute":
		s.execute(id, params)
	case "control":
		s.control(id, params)
	default:
		s.send(errorResponse(id, &rpcError{codeUnknownMethod, "Unknown method: " + method}))
	}
}
