package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// offer keeps what connected m offers for a reattach: a token, and the window to use it in.
func (c *runner) offer(m *serverFrame) {
	c.token = m.Params.ResumeToken
	c.window = time.Duration(m.Params.ReattachWindow * float64(time.Second))
}

// lost reports whether err, which ended the reading of a connection, says that the connection
// was lost (ended without a close frame, cut inside a frame, reset, silent, or failed to
// write), rather than closed by the server or broken by a frame it sent.
func lost(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, errSilent) || errors.As(err, &ne)
}

// lostReason says how err, which ended the reading of a connection, ended it.
func lostReason(err error) string {
	switch {
	case errors.Is(err, io.EOF):
		return "it ended without a close frame"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "it ended inside a frame"
	}
	return err.Error()
}

// hold adds the control request that sig asks for to those that sendPending sends, or
// returns an *exitError for a second SIGINT, which disconnects at once.
func (c *runner) hold(sig os.Signal) error {
	switch {
	case sig == syscall.SIGTSTP:
		c.pending = append(c.pending, "PAUSE")
	case sig == syscall.SIGCONT:
		c.pending = append(c.pending, "RESUME")
	case c.canceled:
		return exitf(exitInterrupted, "interrupted: disconnected before the command completed")
	default:
		c.canceled = true
		c.pending = append(c.pending, "CANCEL")
	}
	return nil
}

// holdLost is hold while the connection is lost: it says that a cancel waits for the reattach.
func (c *runner) holdLost(sig os.Signal) error {
	canceled := c.canceled
	if err := c.hold(sig); err != nil {
		return err
	}
	if c.canceled && !canceled {
		c.notef("reconnecting: the command will be canceled once reattached; Ctrl-C again disconnects")
	}
	return nil
}

// sendPending sends the control requests held, in order. When a write fails while the
// server offers a reattach, it closes the connection, whose reader then reports it lost, and
// keeps the request that failed and those after it for the next connection: the server may
// then get one of them twice, which changes nothing (PAUSE, RESUME and CANCEL are each the
// same done twice). Without the offer, the run is over.
func (c *runner) sendPending() error {
	for len(c.pending) > 0 {
		if err := c.control(c.pending[0]); err != nil {
			if c.token == "" {
				return exitf(exitLost, "connection lost before the command completed: %v", err)
			}
			c.ws.nc.Close()
			return nil
		}
		c.pending = c.pending[1:]
	}
	return nil
}

// reattach replaces the connection, lost to cause, with a new one to the same session, within
// the window the server offered, counted from now: it tries at once, then again after a wait
// that doubles from backoffMin up to backoffMax. Then it starts reading the new connection and
// sends the control requests held. A refusal ends the run, and so does the end of the window.
// Signals that come meanwhile are held for the new connection, but a second SIGINT, which
// ends the run at once.
func (c *runner) reattach(cause error, sigs <-chan os.Signal) error {
	c.ws.nc.Close() // without a close frame, which would end the session
	failed := func(format string, a ...any) error {
		return exitf(exitLost, "connection lost before the command completed (%s); "+format,
			append([]any{lostReason(cause)}, a...)...)
	}
	deadline := time.Now().Add(c.window)
	backoff := backoffMin
	for {
		ws, first, err := c.tryOpen(c.resumeURL(), deadline, sigs)
		var x *exitError
		var r *refusedError
		var closed *closeError
		switch {
		case errors.As(err, &x):
			return err
		case errors.As(err, &r) && (r.status == http.StatusUnauthorized || r.status == http.StatusForbidden):
			return failed("the server refused to reattach: %s", r.text)
		case errors.As(err, &closed):
			return failed("the server refused to reattach: %v", closed)
		case err == nil:
			var m serverFrame
			json.Unmarshal(first, &m)
			if c.json {
				c.print(first)
			}
			if m.Method != "connected" || m.Params.SessionID != c.session {
				ws.nc.Close()
				if m.Error != nil {
					return failed("the server refused to reattach: %s (code %d)", m.Error.Message, m.Error.Code)
				}
				return failed("the server did not reattach the session: first frame %.100q", first)
			}
			c.ws = ws
			c.offer(&m)
			c.notef("connection lost (%s); reattached", lostReason(cause))
			c.startReading()
			return c.sendPending()
		}
		timer := time.NewTimer(min(time.Until(deadline), backoff))
		for waiting := true; waiting; {
			select {
			case <-timer.C:
				waiting = false
			case sig := <-sigs:
				if err := c.holdLost(sig); err != nil {
					timer.Stop()
					return err
				}
			}
		}
		if !time.Now().Before(deadline) {
			return failed("gave up reattaching at the end of the server's window of %v: %v", c.window, err)
		}
		backoff = min(2*backoff, backoffMax)
	}
}

// tryOpen opens a connection to u as open does, giving up at deadline or after connectTimeout.
// Signals that come meanwhile are held, but a second SIGINT, which gives up at once: tryOpen
// then returns its *exitError.
func (c *runner) tryOpen(u *url.URL, deadline time.Time, sigs <-chan os.Signal) (*wsConn, []byte, error) {
	if limit := time.Now().Add(connectTimeout); limit.Before(deadline) {
		deadline = limit
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	type result struct {
		ws    *wsConn
		first []byte
		err   error
	}
	done := make(chan result, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { // returns when open does, once ctx is done at the latest
		ws, first, err := c.open(ctx, u)
		done <- result{ws, first, err}
	})
	for {
		select {
		case r := <-done:
			return r.ws, r.first, r.err
		case sig := <-sigs:
			if err := c.holdLost(sig); err != nil {
				cancel()
				if r := <-done; r.ws != nil {
					r.ws.nc.Close()
				}
				return nil, nil, err
			}
		}
	}
}

// resumeURL is the URL of a reattach: that of the session, with the session's id, the token
// and the count of messages received added to its query.
func (c *runner) resumeURL() *url.URL {
	u, _ := url.Parse(c.o.url) // parsed by connect before
	q := u.Query()
	q.Set("session_id", c.session)
	q.Set("resume", c.token)
	q.Set("received", strconv.FormatInt(c.received, 10))
	u.RawQuery = q.Encode()
	return u
}
