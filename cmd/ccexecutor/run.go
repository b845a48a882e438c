package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
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

	"golang.org/x/net/websocket"
)

const runUsage = `Usage: ccexecutor run [flags] -- COMMAND...

Run COMMAND on a ccexecutor server as if it ran here: its stdout goes to stdout, its stderr to
stderr, line by line as it is written, and its exit status becomes this one's. The words of
COMMAND are joined with spaces and run by the server's /bin/sh -c, so quote for that shell, as
with ssh:

  ccexecutor run -- 'ls -la | head'

Ctrl-C cancels the command (the server sends SIGTERM to its process group, SIGKILL after its kill
grace) and waits for it to end; a second Ctrl-C disconnects at once.

Exit status:
  0-255  the command's own; 128+N when signal N ended it (143 after a cancel)
  2      invalid flags, or no command
  120    the server could not be reached, or is not a WebSocket server
  121    the server refused the session (HTTP 401 or 403, session limit)
  122    the server refused the command (invalid params, command not allowed)
  123    the connection was lost before the command completed
  130    a second Ctrl-C disconnected before the command completed

Flags:
`

// Exit statuses of run's own failures. A command's status is passed through as it is, so these
// sit where commands seldom go; 124 (timeout(1)) and 126 and 127 (the shell's) are avoided.
const (
	exitUsage       = 2   // invalid flags, or no command
	exitUnreachable = 120 // no WebSocket server answered at the URL
	exitRefused     = 121 // the server refused the session: HTTP 401 or 403, session limit
	exitRequest     = 122 // the server answered execute with an error
	exitLost        = 123 // the connection ended before process.completed
	exitInterrupted = 130 // a second SIGINT disconnected before process.completed
)

// Tunables of the client.
const (
	connectTimeout = 10 * time.Second // time to connect, upgrade and receive the connected notification
	requestWait    = 10 * time.Second // time a request, or the closing frame, may take to be written
	refusalBytes   = 1 << 10          // how much of the handshake answer is kept to explain a refusal
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
	status, err := o.run()
	var f *exitError
	if errors.As(err, &f) {
		fmt.Fprintf(os.Stderr, "ccexecutor run: %v\n", err)
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

// notef prints a note of the client's own on stderr.
func notef(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "ccexecutor run: "+format+"\n", a...)
}

// runOptions are the settings of one run.
type runOptions struct {
	url         string
	token       string
	json        bool // print frames rather than output
	pauseOnTSTP bool // SIGTSTP pauses the command, SIGCONT resumes it
	params      execParams
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
	o := new(runOptions)
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
	if u, err := url.Parse(o.url); err != nil || u.Scheme != "ws" && u.Scheme != "wss" || u.Host == "" {
		return nil, fmt.Errorf("invalid --url %q: want ws://HOST:PORT/PATH or wss://HOST:PORT/PATH", o.url)
	}
	return o, nil
}

// run runs the command of o on the server and returns its exit status, or an *exitError.
func (o *runOptions) run() (int, error) {
	c := &runner{json: o.json}
	if err := c.connect(o.url, o.token); err != nil {
		return 0, err
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt)
	if o.pauseOnTSTP {
		// Caught, SIGTSTP no longer stops the client, which must keep reading.
		signal.Notify(sigs, syscall.SIGTSTP, syscall.SIGCONT)
	}
	defer signal.Stop(sigs)

	frames := make(chan readResult)
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { c.read(frames, quit) }) // returns when a read fails (Close below ends it) or quit is closed
	defer func() {
		close(quit)
		c.ws.SetWriteDeadline(time.Now().Add(requestWait))
		c.ws.Close()
		wg.Wait()
	}()
	if err := c.call("execute", o.params); err != nil {
		return 0, exitf(exitLost, "connection lost before the command was sent: %v", err)
	}
	return c.wait(frames, sigs)
}

// A runner is one session with the server, for one command. Its reader goroutine receives the
// frames; everything else, writing requests included, is done by the goroutine that calls wait.
type runner struct {
	ws     *websocket.Conn
	json   bool         // print frames rather than output
	lastID int          // id of the last request sent
	buf    bytes.Buffer // a frame being printed
}

// connect opens the session: it dials the server at rawURL, upgrades the connection presenting
// token, and reads the server's first frame, which must be the connected notification. It
// gives up after connectTimeout.
func (c *runner) connect(rawURL, token string) error {
	u, err := url.Parse(rawURL)
	if err != nil {
		return exitf(exitUsage, "invalid --url %q: %v", rawURL, err)
	}
	// x/net/websocket always sends an Origin; the server accepts the one of its own host.
	scheme, port := "http", "80"
	if u.Scheme == "wss" {
		scheme, port = "https", "443"
	}
	if u.Port() != "" {
		port = u.Port()
	}
	cfg, err := websocket.NewConfig(rawURL, scheme+"://"+u.Host)
	if err != nil {
		return exitf(exitUsage, "invalid --url %q: %v", rawURL, err)
	}
	if token != "" {
		cfg.Header.Set("Authorization", "Bearer "+token)
	}

	deadline := time.Now().Add(connectTimeout)
	d := &net.Dialer{Deadline: deadline}
	addr := net.JoinHostPort(u.Hostname(), port)
	var nc net.Conn
	if u.Scheme == "wss" {
		nc, err = (&tls.Dialer{NetDialer: d}).Dial("tcp", addr)
	} else {
		nc, err = d.Dial("tcp", addr)
	}
	if err != nil {
		return exitf(exitUnreachable, "cannot reach the server at %s: %v", rawURL, err)
	}
	nc.SetDeadline(deadline)
	rc := &recordingConn{Conn: nc}
	ws, err := websocket.NewClient(cfg, rc)
	if err != nil {
		nc.Close()
		if errors.Is(err, websocket.ErrBadStatus) {
			return exitf(exitRefused, "server refused the session: %s", refusal(rc.head))
		}
		return exitf(exitUnreachable, "no WebSocket server at %s: %v", rawURL, err)
	}
	c.ws = ws

	var first []byte
	if err := websocket.Message.Receive(ws, &first); err != nil {
		ws.Close()
		return exitf(exitRefused, "the server did not start a session: %v", err)
	}
	var m serverFrame
	json.Unmarshal(first, &m)
	if c.json {
		c.print(first)
	}
	if m.Method != "connected" {
		ws.Close()
		if m.Error != nil {
			return exitf(exitRefused, "server refused the session: %s (code %d)", m.Error.Message, m.Error.Code)
		}
		return exitf(exitRefused, "the server did not start a session: first frame %.100q", first)
	}
	ws.SetDeadline(time.Time{})
	return nil
}

// recordingConn is a connection that keeps the first refusalBytes bytes read from it, so that the
// answer to a refused handshake can be reported.
type recordingConn struct {
	net.Conn
	head []byte
}

func (c *recordingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if room := refusalBytes - len(c.head); room > 0 {
		c.head = append(c.head, b[:min(n, room)]...)
	}
	return n, err
}

// refusal describes the HTTP answer, of which head is the start, that refused a handshake.
func refusal(head []byte) string {
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(head)), nil)
	if err != nil {
		return "HTTP status not 101"
	}
	defer resp.Body.Close()
	msg := "HTTP " + resp.Status
	body, _ := io.ReadAll(resp.Body) // what the head holds of it is enough
	if line, _, _ := strings.Cut(strings.TrimSpace(string(body)), "\n"); line != "" && len(line) <= 200 {
		msg += ": " + line
	}
	if resp.StatusCode == http.StatusUnauthorized {
		msg += " (check --token or CC_EXECUTOR_TOKEN)"
	}
	return msg
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
	} `json:"params"`
}

// readResult is a frame from the server, or the error that ended reading.
type readResult struct {
	data []byte
	err  error
}

// read hands the frames it receives to frames until a read fails, the failure included, or
// until quit is closed. A frame too large to receive is handed on as its error, and skipped.
func (c *runner) read(frames chan<- readResult, quit <-chan struct{}) {
	for {
		var r readResult
		r.err = websocket.Message.Receive(c.ws, &r.data)
		select {
		case frames <- r:
		case <-quit:
			return
		}
		if r.err != nil && !errors.Is(r.err, websocket.ErrFrameTooLarge) {
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
	c.ws.SetWriteDeadline(time.Now().Add(requestWait))
	return websocket.Message.Send(c.ws, string(b)) // a string goes as a text frame
}

// control sends a control request of type typ.
func (c *runner) control(typ string) error {
	return c.call("control", map[string]string{"type": typ})
}

// wait writes the run's output as it arrives and acts on signals until process.completed
// reports the end of the command, and returns the command's exit status. The first SIGINT
// cancels the command and the second gives up on it.
func (c *runner) wait(frames <-chan readResult, sigs <-chan os.Signal) (int, error) {
	canceled := false
	for {
		select {
		case r := <-frames:
			switch {
			case errors.Is(r.err, websocket.ErrFrameTooLarge):
				notef("skipped a frame from the server larger than %d bytes", websocket.DefaultMaxPayloadBytes)
				continue
			case r.err == io.EOF:
				return 0, exitf(exitLost, "connection lost before the command completed: closed by the server")
			case r.err != nil:
				return 0, exitf(exitLost, "connection lost before the command completed: %v", r.err)
			}
			if done, status, err := c.handle(r.data, canceled); done {
				return status, err
			}
		case sig := <-sigs:
			var err error
			switch {
			case sig == syscall.SIGTSTP:
				err = c.control("PAUSE")
			case sig == syscall.SIGCONT:
				err = c.control("RESUME")
			case canceled:
				return 0, exitf(exitInterrupted, "interrupted: disconnected before the command completed")
			default:
				canceled = true
				err = c.control("CANCEL")
			}
			if err != nil {
				return 0, exitf(exitLost, "connection lost before the command completed: %v", err)
			}
		}
	}
}

// handle acts on one frame: it prints it (with --json) or the output it carries, and reports
// done once the run is over, with the command's exit status or an *exitError. canceled says that
// the client asked for the cancel, which then needs no note.
func (c *runner) handle(data []byte, canceled bool) (done bool, status int, err error) {
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
	case len(m.ID) > 0:
		// The answer to a control request. An error can only mean that the run has just
		// ended, and its process.completed is on its way.
	case m.Error != nil:
		notef("server: %s (code %d)", m.Error.Message, m.Error.Code)
	case m.Method == "process.output" && !c.json:
		if m.Params.Type == "stderr" {
			os.Stderr.WriteString(m.Params.Data)
		} else {
			os.Stdout.WriteString(m.Params.Data)
		}
	case m.Method == "process.paused":
		notef("paused; resume with kill -CONT %d", os.Getpid())
	case m.Method == "process.error" && m.Params.Error != nil:
		notef("server: %s", *m.Params.Error)
	case m.Method == "process.completed":
		if m.Params.ExitCode == nil {
			return true, 0, exitf(exitLost, "process.completed without exit_code")
		}
		if e := m.Params.Error; e != nil && !(canceled && *e == "canceled") {
			notef("%s", *e)
		}
		return true, exitStatus(*m.Params.ExitCode), nil
	}
	return false, 0, nil
}

// print writes frame data on stdout as one line of compact JSON.
func (c *runner) print(data []byte) {
	c.buf.Reset()
	if json.Compact(&c.buf, data) != nil {
		return // handle reports it
	}
	c.buf.WriteByte('\n')
	os.Stdout.Write(c.buf.Bytes())
}

// exitStatus is the status a shell gives a command that process.completed reports with code:
// code itself, or 128+N when signal N ended the command (code -N).
func exitStatus(code int) int {
	if code < 0 {
		return 128 - code
	}
	return code
}
