package ccexecutor

import (
	"context"
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

// A session is one WebSocket connection. Its goroutines are the one running serve, which owns
// all of its state and answers requests in order; readLoop, which receives frames; writeLoop,
// the connection's only writer; and, while a command runs, runToEnd with the goroutines it
// starts. serve returns only after all of them have returned.
type session struct {
	id     string
	srv    *Server
	conn   *conn
	remote string // the client's address, for the log

	ctx    context.Context         // done when the server shuts down or the session ends
	cancel context.CancelCauseFunc // ends ctx with the reason the session ends

	in      chan inFrame                  // frames received, for serve; closed when readLoop returns
	out     chan *batch                   // encoded frames, for writeLoop; closed by serve when it is done
	failed  chan struct{}                 // closed by writeLoop when a write fails: the client is gone
	flushed chan struct{}                 // closed when writeLoop returns
	ended   chan runResult                // a finished run's result, from runToEnd to serve
	run     *run                          // the run in progress, or nil; serve alone uses it
	bye     *batch                        // the close frame that answers the client's, or fails the connection; serve's
	broken  bool                          // bye fails the connection: serveConn lingers before closing it; serve's
	wg      sync.WaitGroup                // the session's goroutines
	log     func(msg string, args ...any) // logs with the session's id

	firstOut atomic.Int64 // the start of the run, in Unix nanoseconds, until its first output line; then 0
}

// serve runs the session until the client leaves, a write fails or the server shuts down.
func (s *session) serve() {
	s.wg.Go(s.writeLoop) // returns once out is closed and drained, or at the first failed write
	s.wg.Go(s.readLoop)  // returns when a read fails: the client left or the conn was closed
	s.send(notification("connected", struct {
		SessionID    string   `json:"session_id"`
		Version      string   `json:"version"`
		Capabilities []string `json:"capabilities"`
	}{s.id, Version, []string{"execute", "control", "stream"}}))
	for s.ctx.Err() == nil {
		select {
		case f, ok := <-s.in:
			switch {
			case !ok:
				s.cancel(errClientGone)
			case f.bye != nil:
				s.bye, s.broken = f.bye, f.failed // the client closed, or broke the protocol: the session ends
				s.cancel(errClientGone)
			default:
				s.handle(f)
			}
		case res := <-s.ended:
			s.finish(res)
		case <-s.failed:
			s.cancel(errClientGone)
		case <-s.ctx.Done():
		}
	}
	cause := context.Cause(s.ctx)
	if cause == errClientGone && s.bye == nil {
		s.conn.abort() // nobody to say goodbye to: fail any write at once
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
	<-s.flushed                             // every queued frame is written, or a write failed
	s.conn.SetReadDeadline(time.Unix(1, 0)) // stops readLoop without closing: see serveConn
	s.wg.Wait()
}

// readLoop hands every message the client sends to serve, and answers its Pings, until a read
// fails, the client sends a close frame or breaks the protocol. The last two are handed to
// serve as the close frame to answer with.
func (s *session) readLoop() {
	defer close(s.in)
	fr := frameReader{r: s.conn.in, max: s.srv.cfg.MaxMessageBytes}
	for {
		var in inFrame
		f, err := fr.next()
		var perr *protocolError
		switch {
		case errors.As(err, &perr):
			s.log("protocol error", "error", perr.reason)
			in = inFrame{bye: closeFrame(perr.code, perr.reason), failed: true}
		case err != nil:
			return
		case f.op == opPing:
			if _, err := s.conn.Write(appendFrame(nil, opPong, f.data)); err != nil {
				return
			}
			continue
		case f.op == opPong:
			continue // conn.Read noted it for the keep-alive
		case f.op == opClose:
			in = inFrame{bye: closeFrame(f.code, "")}
		default:
			in = inFrame{data: f.data, binary: f.op == opBinary, tooLarge: f.tooLarge}
		}
		select {
		case s.in <- in:
		case <-s.ctx.Done():
			return
		}
		if in.bye != nil {
			return
		}
	}
}

// send queues b for the writer. It drops b when the writer has failed, since then the session
// is ending, and reports whether b was queued.
func (s *session) send(b *batch) bool {
	select {
	case s.out <- b:
		return true
	case <-s.failed:
		return false
	}
}

// writeLoop writes the frames queued on out, several at a time when several are queued. Every
// PingInterval it sends a Ping, unless frames passed both ways meanwhile: so a silent connection
// stays open through proxies, and a client that vanished is noticed even while output flows.
// It returns once out is closed and drained, or when the client is gone: a write failed, or
// the client sent nothing, not even a Pong, in the PingInterval after a Ping.
func (s *session) writeLoop() {
	defer close(s.flushed)
	tick := time.NewTicker(s.srv.cfg.PingInterval)
	defer tick.Stop()
	var (
		queued  []*batch
		bufs    net.Buffers
		scratch []byte       // a piece of a long line, escaped
		wrote   bool         // a frame was written since the last tick
		last    = time.Now() // the last tick
		pinged  time.Time    // when the Ping that awaits an answer was sent, or zero
	)
	for {
		select {
		case b, ok := <-s.out:
			if !ok {
				return
			}
			queued = append(queued[:0], b)
		drain:
			for len(queued) < queueLen {
				select {
				case b, ok := <-s.out:
					if !ok {
						break drain
					}
					queued = append(queued, b)
				default:
					break drain
				}
			}
			err := s.conn.writeBatches(queued, &bufs, &scratch)
			for i, b := range queued {
				if b.free != nil {
					b.free <- b // never blocks: it has room for every batch of its pump
				}
				queued[i] = nil
			}
			if err != nil {
				s.conn.countDrop(err, &s.srv.metrics)
				close(s.failed)
				return
			}
			wrote = true
		case now := <-tick.C:
			if !pinged.IsZero() && !s.conn.readSince(pinged) {
				s.srv.metrics.drop(dropPing)
				close(s.failed)
				return
			}
			busy := wrote && s.conn.readSince(last)
			wrote, last, pinged = false, now, time.Time{}
			if busy {
				continue
			}
			pinged = now
			if _, err := s.conn.Write(appendFrame(nil, opPing, nil)); err != nil {
				s.conn.countDrop(err, &s.srv.metrics)
				close(s.failed)
				return
			}
		}
	}
}

// inFrame is a message received from the client, or the end of its session.
type inFrame struct {
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
