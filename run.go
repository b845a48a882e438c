package ccexecutor

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// run is a command in progress.
type run struct {
	p       *process
	cancel  context.CancelCauseFunc
	command string // as logged: cut when long
	started time.Time
	lines   atomic.Uint64 // output lines read, of both streams: the seq of the last, with a reattach window
}

// runResult is how a run ended.
type runResult struct {
	r     *run
	exit  int
	cause error // why the run was ended, or nil for a natural exit
	err   error // an internal failure, reported as process.error
}

// execute starts the command of an execute request and the goroutine that sees it to its end.
func (s *session) execute(id json.RawMessage, params json.RawMessage) {
	req, rerr := s.srv.exec.parseExecute(params)
	if rerr != nil {
		if rerr.Code == codeNotAllowed {
			s.srv.refused.warn("command refused", "command not allowed", "session", s.id,
				"remote", s.remote, "error", loggedText(rerr.Message), "command", loggedText(req.line))
		}
		s.send(errorResponse(id, rerr))
		return
	}
	if s.run != nil {
		s.send(errorResponse(id, &rpcError{codeInvalidParams, "A process is already running"}))
		return
	}
	req.cmd.cgroups = s.srv.cgroups
	p, err := start(req.cmd)
	if err != nil {
		s.srv.metrics.startFails.Add(1)
		s.send(errorResponse(id, &rpcError{codeInternal, "Internal error: " + err.Error()}))
		return
	}
	ctx, cancel := context.WithCancelCause(s.ctx)
	r := &run{p: p, cancel: cancel, command: loggedText(req.line), started: time.Now()}
	s.run = r
	s.srv.metrics.started.Add(1)
	s.firstOut.Store(r.started.UnixNano())
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
	stdout, stderr := &pipeReader{f: r.p.stdout}, &pipeReader{f: r.p.stderr}
	wg.Go(r.p.wait)        // returns once the group is reaped, which supervise ensures
	var seq *atomic.Uint64 // numbers the lines for a client that may reattach
	if s.reattaching() {
		seq = &r.lines
	}
	wg.Go(func() { outErr = s.pump("stdout", stdout, seq) }) // returns at EOF, or at its deadline once the group is gone
	wg.Go(func() { errErr = s.pump("stderr", stderr, seq) }) // likewise
	cause := supervise(ctx, r.p, s.srv.cfg.KillGrace, s.srv.metrics.killed)
	// The group is gone, so the pipes reach EOF once drained, unless a process that left the
	// group still holds them: read what the group wrote, whatever the pace of the client, then
	// what comes after for at most the kill grace (see pipeReader). With containment no
	// deadline: once the run's cgroup is empty, nothing can hold the pipes.
	grace, idle := s.srv.cfg.KillGrace, s.srv.cfg.KillGrace
	if r.p.contained() {
		idle = 0
	}
	stdout.drain(idle)
	stderr.drain(idle)
	// A session that ends (Shutdown) does not read the backlog at a slow client's pace: the
	// pipes get one kill grace. What is already queued (two batches a stream) is still written
	// while the client keeps accepting minProgress bytes a WriteWait.
	cut := make(chan struct{})
	stopCut := context.AfterFunc(s.ctx, func() { stdout.stop(grace); stderr.stop(grace); close(cut) })
	wg.Wait()
	if !stopCut() {
		<-cut // the AfterFunc's goroutine has started: it returns at once
	}
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
// line reader reuses the line. Each line takes the next number of seq, when it is not nil.
func (s *session) pump(stream string, pipe io.Reader, seq *atomic.Uint64) error {
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
	count := s.srv.metrics.stream(stream, &s.firstOut)
	defer count.flush()
	err := readLines(pipe, s.srv.cfg.MaxLineBytes, func(line []byte, dropped int, more bool) error {
		count.line(line, dropped, more)
		var n uint64
		if seq != nil {
			n = seq.Add(1)
		}
		long := b.addOutput(stream, line, dropped, n)
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
		return errors.New("ccexecutor: " + stream + " was still held open by a process outside the group a kill grace after the group's output was read; stopped reading")
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
	s.srv.metrics.runEnded(endCause(res.cause), res.exit, time.Since(res.r.started))
	s.send(processEvent("process.completed", status, res.r.p.pid, &exit, cause))
	s.log("run ended", "pid", res.r.p.pid, "command", res.r.command, "exit_code", res.exit,
		"cause", res.cause, "duration", time.Since(res.r.started))
}

// endCause is the metrics' end constant for the cause of a run's end, nil for its own exit.
func endCause(cause error) int {
	var timeout streamTimeoutError
	switch {
	case cause == nil:
		return endExit
	case cause == errCanceled:
		return endCanceled
	case errors.As(cause, &timeout):
		return endTimeout
	case cause == errShutdown:
		return endShutdown
	default:
		return endDisconnect // errClientGone
	}
}
