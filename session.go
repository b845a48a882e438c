package ccexecutor

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"sync"
	"time"

	"golang.org/x/net/websocket"
)

// Causes that end a run other than its own exit. Their text is the error of process.completed.
var (
	errCanceled   = errors.New("canceled")
	errShutdown   = errors.New("server shutting down")
	errClientGone = errors.New("client disconnected")
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

// A session is one WebSocket connection. Its goroutines are the one running serve, which owns
// all of its state and answers requests in order; readLoop, which receives frames; writeLoop,
// the connection's only writer; and, while a command runs, runToEnd with the goroutines it
// starts. serve returns only after all of them have returned.
type session struct {
	id   string
	srv  *Server
	ws   *websocket.Conn
	conn *conn

	ctx    context.Context         // done when the server shuts down or the session ends
	cancel context.CancelCauseFunc // ends ctx with the reason the session ends

	in      chan inFrame                  // frames received, for serve; closed when readLoop returns
	out     chan *batch                   // encoded frames, for writeLoop; closed by serve when it is done
	failed  chan struct{}                 // closed by writeLoop when a write fails: the client is gone
	flushed chan struct{}                 // closed when writeLoop returns
	ended   chan runResult                // a finished run's result, from runToEnd to serve
	run     *run                          // the run in progress, or nil; serve alone uses it
	wg      sync.WaitGroup                // the session's goroutines
	log     func(msg string, args ...any) // logs with the session's id
}

// run is a command in progress.
type run struct {
	p       *process
	cancel  context.CancelCauseFunc
	command string
	started time.Time
}

// runResult is how a run ended.
type runResult struct {
	r     *run
	exit  int
	cause error // why the run was ended, or nil for a natural exit
	err   error // an internal failure, reported as process.error
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
			if ok {
				s.handle(f)
			} else {
				s.cancel(errClientGone)
			}
		case res := <-s.ended:
			s.finish(res)
		case <-s.failed:
			s.cancel(errClientGone)
		case <-s.ctx.Done():
		}
	}
	cause := context.Cause(s.ctx)
	if cause == errClientGone {
		s.conn.abort() // nobody to say goodbye to: fail any write at once
	}
	if s.run != nil {
		s.run.cancel(cause) // the run of a session that ends, ends now
		s.finish(<-s.ended)
	}
	if cause == errShutdown {
		s.send(closeFrame(1001, "Server shutting down"))
	}
	close(s.out)
	<-s.flushed                             // every queued frame is written, or a write failed
	s.conn.SetReadDeadline(time.Unix(1, 0)) // stops readLoop without closing: see serveConn
	s.wg.Wait()
}

// readLoop hands every frame the client sends to serve, until a read fails.
func (s *session) readLoop() {
	defer close(s.in)
	for {
		var f inFrame
		err := frameCodec.Receive(s.ws, &f)
		if errors.Is(err, websocket.ErrFrameTooLarge) {
			f = inFrame{tooLarge: true}
		} else if err != nil {
			return
		}
		select {
		case s.in <- f:
		case <-s.ctx.Done():
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

// execute starts the command of an execute request and the goroutine that sees it to its end.
func (s *session) execute(id json.RawMessage, params json.RawMessage) {
	req, rerr := s.srv.parseExecute(params)
	if rerr != nil {
		s.send(errorResponse(id, rerr))
		return
	}
	if s.run != nil {
		s.send(errorResponse(id, &rpcError{codeInvalidParams, "A process is already running"}))
		return
	}
	p, err := start(req.cmd)
	if err != nil {
		s.send(errorResponse(id, &rpcError{codeInternal, "Internal error: " + err.Error()}))
		return
	}
	ctx, cancel := context.WithCancelCause(s.ctx)
	r := &run{p: p, cancel: cancel, command: req.line, started: time.Now()}
	s.run = r
	s.log("run started", "pid", p.pid, "command", r.command)
	s.send(response(id, struct {
		Status string `json:"status"`
		PID    int    `json:"pid"`
		PGID   int    `json:"pgid"`
	}{"started", p.pid, p.pid}))
	s.send(processEvent("process.started", "started", p.pid, nil, nil))
	s.wg.Go(func() { s.ended <- s.runToEnd(ctx, r, req.timeout) }) // returns once the group is reaped and its output drained
}

// runToEnd streams the output of r until the run ends, then returns how it ended. It returns
// only after the group is reaped and the goroutines it started have returned.
func (s *session) runToEnd(ctx context.Context, r *run, timeout time.Duration) runResult {
	ctx, stop := withStreamTimeout(ctx, timeout)
	defer stop()
	var wg sync.WaitGroup
	var outErr, errErr error
	wg.Go(r.p.wait)                                         // returns once the group is reaped, which supervise ensures
	wg.Go(func() { outErr = s.pump("stdout", r.p.stdout) }) // returns at EOF, or at the read deadline below
	wg.Go(func() { errErr = s.pump("stderr", r.p.stderr) }) // likewise
	cause := supervise(ctx, r.p, s.srv.cfg.KillGrace)
	// The group is gone, so the pipes reach EOF once drained, unless a process that left the
	// group still holds them: give the readers the kill grace, then stop them.
	deadline := time.Now().Add(s.srv.cfg.KillGrace)
	r.p.stdout.SetReadDeadline(deadline)
	r.p.stderr.SetReadDeadline(deadline)
	wg.Wait()
	r.p.stdout.Close()
	r.p.stderr.Close()
	return runResult{r: r, exit: r.p.exitCode(), cause: cause, err: errors.Join(r.p.err, outErr, errErr)}
}

// pump sends the lines of one of the run's output streams as process.output notifications,
// batching the frames of lines that are read together into one write. It owns two batches: it
// fills one while the writer writes the other, which the writer then hands back. So a stream
// never holds more than two batches, however slow the client, and the process waits on its
// pipe meanwhile: that is the backpressure. A batch is bounded in encoded bytes: it is sent
// once it holds maxBatch bytes, and a line whose JSON is longer than maxInline is left for the
// writer to escape as it writes it, while pump waits for both batches to come back before the
// line reader reuses the line.
func (s *session) pump(stream string, f *os.File) error {
	free := make(chan *batch, 2)
	free <- &batch{free: free}
	b := &batch{free: free}
	written := func() (*batch, error) {
		select {
		case b := <-free:
			b.reset()
			return b, nil
		case <-s.failed:
			return nil, errClientGone
		}
	}
	err := readLines(f, s.srv.cfg.MaxLineBytes, func(line []byte, dropped int, more bool) error {
		long := b.addOutput(stream, line, dropped)
		if !long && more && len(b.frames) < maxBatch {
			return nil
		}
		if !s.send(b) {
			return errClientGone
		}
		next, err := written() // the other batch
		if err == nil && long {
			var sent *batch
			if sent, err = written(); err == nil { // b, and with it line
				free <- sent // never blocks: free is empty
			}
		}
		b = next
		return err
	})
	switch {
	case err == nil || err == errClientGone:
		return nil
	case errors.Is(err, os.ErrDeadlineExceeded):
		return errors.New("ccexecutor: " + stream + " was still open after the process group ended; stopped reading")
	default:
		return err
	}
}

// finish reports the end of a run: process.error if something failed on our side, then
// process.completed. The session then accepts the next execute.
func (s *session) finish(res runResult) {
	res.r.cancel(nil) // releases the run's context; a no-op if it was canceled with a cause
	s.run = nil
	if res.err != nil {
		s.send(notification("process.error", map[string]any{"error": res.err.Error()}))
	}
	status := "completed"
	if res.exit != 0 || res.cause != nil {
		status = "failed"
	}
	var cause *string
	if res.cause != nil {
		c := res.cause.Error()
		cause = &c
	}
	exit := res.exit
	s.send(processEvent("process.completed", status, res.r.p.pid, &exit, cause))
	s.log("run ended", "pid", res.r.p.pid, "command", res.r.command, "exit_code", res.exit,
		"cause", res.cause, "duration", time.Since(res.r.started))
}
