package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

const runUsage = `Usage: ccexecutor run [flags] -- COMMAND...

Run COMMAND on a ccexecutor server as if it ran here: its stdout goes to stdout, its stderr to
stderr, line by line as it is written, and its exit status becomes this one's. The words of
COMMAND are joined with spaces and run by the server's /bin/sh -c, so quote for that shell, as
with ssh:

  ccexecutor run -- 'ls -la | head'

Ctrl-C cancels the command (the server sends SIGTERM to its process group, SIGKILL after its kill
grace) and waits for it to end; a second Ctrl-C disconnects at once.

A lost connection (reset, ended without a close frame, or silent: nothing from the server for
30 s and then 15 s after a Ping) ends the command on the server, and this client with 123,
unless the server offers a reattach (its --reattach-window). Then the client reconnects, trying
again with a growing wait up to 1 s for at most that window, and the run goes on: the output
is exactly what it would have been, a note on stderr tells of each reattach, and Ctrl-C pressed
meanwhile cancels the command once reattached.

What is not like running locally:
  - stdin is empty: the command reads /dev/null on the server.
  - Output is text: invalid UTF-8 becomes U+FFFD, so binary output is not preserved.
  - A line longer than the server's limit (--max-line-bytes, 512 KiB by default) is cut, and
    "..." marks the cut.
  - stdout and stderr each keep their order, but not their order with each other.
  - When stdout is slow (a pager, a slow pipe), up to 32 MiB of output is read ahead and held;
    past that the server waits, and drops a client that stays blocked for its write wait
    (10 s by default). Ctrl-C is seen once stdout takes output again.

Exit status:
  0-255  the command's own; 128+N when signal N ended it (143 after a cancel)
  2      invalid flags, or no command
  120    the server could not be reached (TLS included), or is not a ccexecutor server
         (an HTTP answer other than 101, 401 or 403)
  121    the server refused the session (HTTP 401 or 403, session limit)
  122    the server refused the command (invalid params, command not allowed, request
         too large)
  123    the connection was lost before the command completed (and, if the server offered a
         reattach, it was refused or the window passed)
  130    a second Ctrl-C disconnected before the command completed

Flags:
`

// Exit statuses of run's own failures. A command's status is passed through as it is, so these
// sit where commands seldom go; 124 (timeout(1)) and 126 and 127 (the shell's) are avoided.
const (
	exitUsage       = 2   // invalid flags, or no command
	exitUnreachable = 120 // no ccexecutor server answered at the URL
	exitRefused     = 121 // the server refused the session: HTTP 401 or 403, session limit
	exitRequest     = 122 // the server answered execute with an error
	exitLost        = 123 // the connection ended before process.completed
	exitInterrupted = 130 // a second SIGINT disconnected before process.completed
)

// Tunables of the client.
const (
	connectTimeout = 10 * time.Second      // time to connect, upgrade and receive the connected notification
	requestWait    = 10 * time.Second      // time a request, or the closing frame, may take to be written
	refusalBytes   = 1 << 10               // how much of a refusal's body is read to explain it
	idleWait       = 30 * time.Second      // silence of the server after which the client sends it a Ping
	pongWait       = 15 * time.Second      // silence after that Ping after which the connection counts as lost
	backoffMin     = 50 * time.Millisecond // wait after a first failed attempt to reattach; it doubles after each
	backoffMax     = time.Second           // longest wait between two attempts to reattach
	readAhead      = 32 << 20              // bytes of frames read ahead of a blocked stdout; past them the server waits
	maxMessage     = 64 << 20              // largest frame received; a larger one is skipped with a note
	outBufSize     = 64 << 10              // size of the buffers of stdout and stderr
	readChunk      = 64 << 10              // memory the frames that have arrived are read into; once full, they are handed over
)

// executeID is the id of the execute request, the first request of a session; control
// requests take the ids after it.
const executeID = "1"

// runCommand is the run subcommand. It returns the exit status.
func runCommand(args []string) int {
	o, err := parseRun(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ccexecutor run: %v (see 'ccexecutor run -h')\n", err)
		return exitUsage
	}
	return o.status()
}

// status runs the command of o and returns the exit status: the command's, or that of the
// client's own failure, which it reports on o.stderr.
func (o *runOptions) status() int {
	status, err := o.run()
	var f *exitError
	if errors.As(err, &f) {
		fmt.Fprintf(o.stderr, "ccexecutor run: %v\n", err)
		return f.code
	}
	return status
}

// An exitError is an error of the client's own, which ends it with the exit status code.
type exitError struct {
	code int
	err  error
}

func (f *exitError) Error() string { return f.err.Error() }
func (f *exitError) Unwrap() error { return f.err }

// exitf returns an exitError with exit status code and a message formatted as by fmt.Errorf.
func exitf(code int, format string, a ...any) error {
	return &exitError{code, fmt.Errorf(format, a...)}
}

// runOptions are the settings of one run.
type runOptions struct {
	url         string
	token       string
	json        bool        // print frames rather than output
	pauseOnTSTP bool        // SIGTSTP pauses the command, SIGCONT resumes it
	tls         *tls.Config // for a wss:// URL
	params      execParams

	stdout, stderr io.Writer     // os.Stdout and os.Stderr, but in tests
	idle, pongWait time.Duration // the keep-alive: idleWait and pongWait, but in tests
}

// execParams are the params of an execute request.
type execParams struct {
	Command string            `json:"command"`
	Timeout float64           `json:"timeout,omitempty"` // seconds; 0 leaves the server's default
	Cwd     string            `json:"cwd,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
}

// parseRun parses the arguments of the run subcommand. It prints the usage and returns
// flag.ErrHelp when asked for help.
func parseRun(args []string) (*runOptions, error) {
	fs := flag.NewFlagSet("ccexecutor run", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // runCommand reports errors in one line
	o := &runOptions{stdout: os.Stdout, stderr: os.Stderr, idle: idleWait, pongWait: pongWait}
	fs.StringVar(&o.url, "url", "ws://127.0.0.1:8003/ws/mcp", "server `URL`, ws:// or wss://")
	fs.StringVar(&o.token, "token", "", "`token` to present to the server (env CC_EXECUTOR_TOKEN)")
	fs.Func("timeout", "stream timeout of the run, in `seconds` or as a Go duration (default: the server's)", func(v string) error {
		var d time.Duration
		if err := (seconds{&d}).Set(v); err != nil {
			return err
		}
		o.params.Timeout = d.Seconds()
		return nil
	})
	fs.StringVar(&o.params.Cwd, "cwd", "", "working `directory` of the command on the server (default: the server's)")
	fs.Func("env", "set `KEY=VALUE` in the command's environment; repeatable", func(v string) error {
		k, val, ok := strings.Cut(v, "=")
		if !ok || k == "" {
			return errors.New("want KEY=VALUE")
		}
		if o.params.Env == nil {
			o.params.Env = make(map[string]string)
		}
		o.params.Env[k] = val
		return nil
	})
	fs.BoolVar(&o.json, "json", false, "print every frame from the server on stdout, one JSON object a line, instead of the output")
	cacert := fs.String("cacert", "", "trust the CA certificates in PEM `file` for a wss:// URL, besides the system's")
	insecure := fs.Bool("insecure-skip-tls-verify", false, "do not check the server's certificate of a wss:// URL (for tests only: anyone between could read and run commands)")
	fs.BoolVar(&o.pauseOnTSTP, "pause-on-tstp", false, "SIGTSTP (Ctrl-Z) pauses the command and SIGCONT resumes it; the client itself keeps running")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stderr)
			fmt.Fprint(os.Stderr, runUsage)
			fs.PrintDefaults()
		}
		return nil, err
	}
	if fs.NArg() == 0 {
		return nil, errors.New("no command given")
	}
	o.params.Command = strings.Join(fs.Args(), " ")
	if o.token == "" {
		o.token = os.Getenv("CC_EXECUTOR_TOKEN")
	}
	u, err := url.Parse(o.url)
	if err != nil || u.Scheme != "ws" && u.Scheme != "wss" || u.Host == "" {
		return nil, fmt.Errorf("invalid --url %q: want ws://HOST:PORT/PATH or wss://HOST:PORT/PATH", o.url)
	}
	if u.Scheme != "wss" && (*cacert != "" || *insecure) {
		return nil, fmt.Errorf("--cacert and --insecure-skip-tls-verify are for a wss:// URL, not %q", o.url)
	}
	o.tls = &tls.Config{InsecureSkipVerify: *insecure}
	if *cacert != "" {
		pem, err := os.ReadFile(*cacert)
		if err != nil {
			return nil, fmt.Errorf("--cacert: %v", err)
		}
		if o.tls.RootCAs, err = x509.SystemCertPool(); err != nil {
			o.tls.RootCAs = x509.NewCertPool()
		}
		if !o.tls.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--cacert: no PEM certificate in %s", *cacert)
		}
	}
	return o, nil
}

// run runs the command of o on the server and returns its exit status, or an *exitError.
func (o *runOptions) run() (int, error) {
	c := &runner{
		o:      o,
		json:   o.json,
		stdout: bufio.NewWriterSize(o.stdout, outBufSize),
		stderr: bufio.NewWriterSize(o.stderr, outBufSize),
		in:     newInbox(),
		quit:   make(chan struct{}),
	}
	defer c.flush() // what connect printed with --json, even when it fails
	if err := c.connect(); err != nil {
		return 0, err
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt)
	if o.pauseOnTSTP {
		// Caught, SIGTSTP no longer stops the client, which must keep reading.
		signal.Notify(sigs, syscall.SIGTSTP, syscall.SIGCONT)
	}
	defer signal.Stop(sigs)

	c.startReading()
	defer func() {
		c.flush()
		close(c.quit)
		c.ws.close()
		c.readers.Wait()
	}()
	if err := c.call("execute", o.params); err != nil {
		return 0, exitf(exitLost, "connection lost before the command was sent: %v", err)
	}
	return c.wait(sigs)
}

// A runner is one session with the server, for one command, over one connection after
// another when the server lets it reattach. A reader goroutine per connection receives the
// frames into an inbox; everything else, writing requests and reattaching included, is done by
// the goroutine that calls wait.
type runner struct {
	o       *runOptions
	ws      *wsConn       // the connection; replaced by reattach
	json    bool          // print frames rather than output
	lastID  int           // id of the last request sent
	started bool          // the server accepted the execute request
	stdout  *bufio.Writer // flushed whenever no frame is waiting, and before stderr is written
	stderr  *bufio.Writer // flushed whenever no frame is waiting, and before stdout is written
	line    []byte        // the output line being decoded
	buf     bytes.Buffer  // a frame being printed

	in      *inbox         // the frames of the connections, in order
	quit    chan struct{}  // closed when the run is over, to end a reader waiting on in
	readers sync.WaitGroup // the reader of each connection

	session  string        // session_id of the first connected
	token    string        // resume_token of the last connected; empty when the server offers no reattach
	window   time.Duration // reattach_window of the last connected
	received int64         // messages handled since the first connected, connected notifications not counted
	canceled bool          // the user asked for a cancel (a first SIGINT)
	pending  []string      // control types not yet sent, in order
}

// connect opens the session: it dials the server at o.url, upgrades the connection presenting
// o.token, and reads the server's first frame, which must be the connected notification. It
// gives up after connectTimeout.
func (c *runner) connect() error {
	o := c.o
	u, err := url.Parse(o.url)
	if err != nil {
		return exitf(exitUsage, "invalid --url %q: %v", o.url, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
	defer cancel()
	ws, first, err := c.open(ctx, u)
	var d *dialError
	var h *handshakeError
	var r *refusedError
	switch {
	case errors.As(err, &d):
		return exitf(exitUnreachable, "cannot reach the server at %s: %v%s", o.url, d.err, tlsHint(d.err))
	case errors.As(err, &r) && (r.status == http.StatusUnauthorized || r.status == http.StatusForbidden):
		return exitf(exitRefused, "server refused the session: %s", r.text)
	case errors.As(err, &r):
		return exitf(exitUnreachable, "no ccexecutor server at %s: %s", o.url, r.text)
	case errors.As(err, &h):
		return exitf(exitUnreachable, "no WebSocket server at %s: %v", o.url, h.err)
	case err != nil:
		return exitf(exitRefused, "the server did not start a session: %v", err)
	}
	c.ws = ws
	var m serverFrame
	json.Unmarshal(first, &m)
	if c.json {
		c.print(first)
	}
	if m.Method != "connected" {
		ws.close()
		if m.Error != nil {
			return exitf(exitRefused, "server refused the session: %s (code %d)", m.Error.Message, m.Error.Code)
		}
		return exitf(exitRefused, "the server did not start a session: first frame %.100q", first)
	}
	c.session = m.Params.SessionID
	c.offer(&m)
	return nil
}

// A dialError is a failure to open a connection to the server, TLS included.
type dialError struct{ err error }

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// A handshakeError is an answer to the opening handshake that is not a WebSocket upgrade, nor
// an HTTP refusal (those are *refusedError).
type handshakeError struct{ err error }

func (e *handshakeError) Error() string { return e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

// open dials the server at u, upgrades the connection presenting the token of c.o, and reads
// the server's first frame, giving up when ctx is done. It returns the connection, with
// keep-alive on, and the frame; or a *dialError, a *refusedError, a *handshakeError, or the
// error of reading the first frame.
func (c *runner) open(ctx context.Context, u *url.URL) (*wsConn, []byte, error) {
	port := u.Port()
	if port == "" {
		port = map[string]string{"ws": "80", "wss": "443"}[u.Scheme]
	}
	d := new(net.Dialer)
	addr := net.JoinHostPort(u.Hostname(), port)
	var nc net.Conn
	var err error
	if u.Scheme == "wss" {
		nc, err = (&tls.Dialer{NetDialer: d, Config: c.o.tls}).DialContext(ctx, "tcp", addr)
	} else {
		nc, err = d.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, nil, &dialError{err}
	}
	if deadline, ok := ctx.Deadline(); ok {
		nc.SetDeadline(deadline)
	}
	// Ends the handshake at once when ctx is canceled.
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	header := make(http.Header)
	if c.o.token != "" {
		header.Set("Authorization", "Bearer "+c.o.token)
	}
	ws, err := wsHandshake(nc, u, header, requestWait)
	if err != nil {
		nc.Close()
		if _, ok := err.(*refusedError); !ok {
			err = &handshakeError{err}
		}
		return nil, nil, err
	}
	first, err := ws.next(nil, maxMessage)
	if err == nil && !stop() {
		err = ctx.Err() // the deadline may have been set after the frame was read
	}
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	nc.SetDeadline(time.Time{})
	ws.keepAlive(c.o.idle, c.o.pongWait)
	return ws, first, nil
}

// startReading starts the reader of c.ws.
func (c *runner) startReading() {
	ws := c.ws
	c.readers.Go(func() { c.read(ws) }) // returns when a read of ws fails (closing ws ends it) or quit is closed
}

// tlsHint tells which flag helps with err, when it is a failure to verify the server's
// certificate.
func tlsHint(err error) string {
	var h x509.HostnameError
	var v *tls.CertificateVerificationError
	switch {
	case errors.As(err, &h):
		return " (use the host name the certificate names in --url, or --insecure-skip-tls-verify to skip the check)"
	case errors.As(err, &v):
		return " (give the certificate of the CA that signed it with --cacert FILE, or skip the check with --insecure-skip-tls-verify)"
	}
	return ""
}

// serverFrame is any frame the server sends: a response or a notification. Params holds the
// members of the notifications the client acts on.
type serverFrame struct {
	ID     json.RawMessage `json:"id"`
	Method string          `json:"method"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Params struct {
		Type     string  `json:"type"`      // process.output: "stdout" or "stderr"
		Data     string  `json:"data"`      // process.output: the line, newline kept
		ExitCode *int    `json:"exit_code"` // process.completed
		Error    *string `json:"error"`     // process.completed: why it was ended; process.error

		SessionID      string  `json:"session_id"`      // connected
		ResumeToken    string  `json:"resume_token"`    // connected, when the server offers a reattach
		ReattachWindow float64 `json:"reattach_window"` // connected: the time to reattach in, in seconds
	} `json:"params"`
}

// read puts the frames it receives from ws into c.in until a read fails, the failure included,
// or until c.quit is closed. The frames that have already arrived are read into one chunk of
// memory and put together, so that fast output costs a few hand-overs, not one per line. A
// frame too large to receive is put as an empty frame, and skipped.
func (c *runner) read(ws *wsConn) {
	in := c.in
	var frames [][]byte
	for {
		chunk := in.chunk()
		frames = frames[:0]
		var err error
		for {
			var b []byte
			b, err = ws.next(chunk, maxMessage)
			if errors.Is(err, errFrameTooLarge) {
				b, err = chunk, nil // an empty frame, which handle notes
			}
			if err != nil {
				break
			}
			frames = append(frames, b[len(chunk):len(b):len(b)])
			// Stop at the frames that have arrived, or when the next may not fit.
			if chunk = b; ws.br.Buffered() == 0 || cap(chunk)-len(chunk) < readChunk/16 {
				break
			}
		}
		if !in.put(frames, chunk, err, c.quit) || err != nil {
			return
		}
	}
}

// call sends a request with the next id.
func (c *runner) call(method string, params any) error {
	c.lastID++
	b, err := json.Marshal(struct {
		JSONRPC string `json:"jsonrpc"`
		Method  string `json:"method"`
		Params  any    `json:"params"`
		ID      int    `json:"id"`
	}{"2.0", method, params, c.lastID})
	if err != nil {
		return err
	}
	return c.ws.write(opText, b)
}

// control sends a control request of type typ.
func (c *runner) control(typ string) error {
	return c.call("control", map[string]string{"type": typ})
}

// wait writes the run's output as it arrives and acts on signals until process.completed
// reports the end of the command, and returns the command's exit status. The first SIGINT
// cancels the command and the second gives up on it. Output is flushed whenever no frame is
// waiting, so that it appears at once, yet goes out in large writes when it comes fast. A
// signal is acted on between frames: while stdout is blocked, it waits. A connection that is
// lost while the server offers a reattach is replaced by reattach, and the run goes on: every
// frame of the lost connection is handled before its error is taken, so that the count of
// messages received is exact then.
func (c *runner) wait(sigs <-chan os.Signal) (int, error) {
	in := c.in
	for {
		frames, chunks, err := in.take()
		if len(frames) == 0 && err == nil {
			c.flush()
			select {
			case <-in.ready:
				continue
			case sig := <-sigs:
				if err := c.signal(sig); err != nil {
					return 0, err
				}
				continue
			}
		}
		for _, f := range frames {
			c.received++
			if done, status, err := c.handle(f, c.canceled); done {
				return status, err
			}
		}
		in.done(chunks)
		switch {
		case err == nil:
		case c.token != "" && lost(err):
			if err := c.reattach(err, sigs); err != nil {
				return 0, err
			}
		default:
			return 0, exitf(exitLost, "connection lost before the command completed: %s", lostReason(err))
		}
		select {
		case sig := <-sigs:
			if err := c.signal(sig); err != nil {
				return 0, err
			}
		default:
		}
	}
}

// signal acts on sig: it sends the control request that sig asks for, or returns an
// *exitError when the run is over (a second SIGINT).
func (c *runner) signal(sig os.Signal) error {
	if err := c.hold(sig); err != nil {
		return err
	}
	return c.sendPending()
}

// handle acts on one frame: it prints it (with --json) or the output it carries, and reports
// done once the run is over, with the command's exit status or an *exitError. canceled says that
// the client asked for the cancel, which then needs no note. An empty frame stands for one that
// was too large to receive.
func (c *runner) handle(data []byte, canceled bool) (done bool, status int, err error) {
	if len(data) == 0 {
		c.notef("skipped a frame from the server larger than %d bytes", maxMessage)
		return false, 0, nil
	}
	if !c.json && kind(data) == msgOutput {
		line, stderr, err := decodeOutput(data, c.line[:0])
		if err != nil {
			return true, 0, exitf(exitLost, "invalid frame from the server: %v", err)
		}
		c.line = line
		c.output(stderr, line)
		return false, 0, nil
	}
	var m serverFrame
	if err := json.Unmarshal(data, &m); err != nil {
		return true, 0, exitf(exitLost, "invalid frame from the server: %v", err)
	}
	if c.json {
		c.print(data)
	}
	switch {
	case string(m.ID) == executeID:
		if m.Error != nil {
			return true, 0, exitf(exitRequest, "server refused the command: %s (code %d)", m.Error.Message, m.Error.Code)
		}
		c.started = true
	case len(m.ID) > 0 && string(m.ID) != "null":
		// The answer to a control request. An error can only mean that the run has just
		// ended, and its process.completed is on its way.
	case m.Error != nil && !c.started:
		// An error without an id answers a request the server could not read: while execute
		// is unanswered, that is execute.
		return true, 0, exitf(exitRequest, "server refused the command: %s (code %d)", m.Error.Message, m.Error.Code)
	case m.Error != nil:
		c.notef("server: %s (code %d)", m.Error.Message, m.Error.Code)
	case m.Method == "process.paused":
		c.notef("paused; resume with kill -CONT %d", os.Getpid())
	case m.Method == "process.error" && m.Params.Error != nil:
		c.notef("server: %s", *m.Params.Error)
	case m.Method == "process.completed":
		if m.Params.ExitCode == nil {
			return true, 0, exitf(exitLost, "process.completed without exit_code")
		}
		if e := m.Params.Error; e != nil && !(canceled && *e == "canceled") {
			c.notef("%s", *e)
		}
		return true, exitStatus(*m.Params.ExitCode), nil
	}
	return false, 0, nil
}

// output writes a line of the command's output to the client's stdout or stderr. What was
// buffered for the other one is flushed first, so that a terminal shows the two in order.
func (c *runner) output(stderr bool, line []byte) {
	w, other := c.stdout, c.stderr
	if stderr {
		w, other = c.stderr, c.stdout
	}
	if other.Buffered() > 0 {
		other.Flush()
	}
	w.Write(line)
}

// flush writes what is buffered for stdout and stderr.
func (c *runner) flush() {
	c.stdout.Flush()
	c.stderr.Flush()
}

// notef prints a note of the client's own on stderr, after the output buffered before it.
func (c *runner) notef(format string, a ...any) {
	c.flush()
	fmt.Fprintf(c.o.stderr, "ccexecutor run: "+format+"\n", a...)
}

// print writes frame data on stdout as one line of compact JSON.
func (c *runner) print(data []byte) {
	c.buf.Reset()
	if json.Compact(&c.buf, data) != nil {
		return // handle reports it
	}
	c.buf.WriteByte('\n')
	c.stdout.Write(c.buf.Bytes())
}

// exitStatus is the status a shell gives a command that process.completed reports with code:
// code itself, or 128+N when signal N ended the command (code -N).
func exitStatus(code int) int {
	if code < 0 {
		return 128 - code
	}
	return code
}
