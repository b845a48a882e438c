package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ccexecutor/ccexecutor"
	"golang.org/x/net/websocket"
)

// runWait bounds every wait of these tests for the client or the server.
const runWait = 10 * time.Second

// serveForRun starts a ccexecutor server in process and returns its WebSocket URL. The server
// is shut down, its sessions and runs ended, when the test ends.
func serveForRun(t *testing.T, cfg ccexecutor.Config) string {
	t.Helper()
	cfg.Logger = slog.New(slog.DiscardHandler)
	srv := ccexecutor.NewServer(cfg)
	hs := httptest.NewServer(srv)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), runWait)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("server shutdown: %v", err)
		}
		hs.Close()
	})
	return runURL(hs)
}

// runURL is the WebSocket URL of the protocol's primary path on hs.
func runURL(hs *httptest.Server) string {
	return "ws" + strings.TrimPrefix(hs.URL, "http") + "/ws/mcp"
}

// runEnv is the environment of a client: the test's, without a token, plus extra.
func runEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CC_EXECUTOR_TOKEN=") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// runResult is what a finished ccexecutor run printed, and its exit status.
type runResult struct {
	stdout, stderr string
	code           int
}

// execRun runs "ccexecutor run args..." with the environment env to its end.
func execRun(t *testing.T, env []string, args ...string) runResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), runWait)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, append([]string{"run"}, args...)...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("ccexecutor run %q did not end within %v", args, runWait)
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("ccexecutor run %q: %v", args, err)
	}
	res := runResult{stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()}
	checkNoPanic(t, res.stderr)
	return res
}

// checkNoPanic fails the test if the client's stderr holds a Go panic or stack trace.
func checkNoPanic(t *testing.T, stderr string) {
	t.Helper()
	if strings.Contains(stderr, "panic:") || strings.Contains(stderr, "goroutine ") {
		t.Errorf("stderr holds a stack trace:\n%s", stderr)
	}
}

// checkRunFailure checks that a client ended with exit status code and printed one error line
// holding want.
func checkRunFailure(t *testing.T, res runResult, code int, want string) {
	t.Helper()
	if res.code != code {
		t.Errorf("exit status = %d, want %d (stderr %q)", res.code, code, res.stderr)
	}
	if !strings.HasPrefix(res.stderr, "ccexecutor run: ") || strings.Count(res.stderr, "\n") != 1 {
		t.Errorf("stderr = %q, want one line starting with %q", res.stderr, "ccexecutor run: ")
	}
	if !strings.Contains(res.stderr, want) {
		t.Errorf("stderr = %q, want it to hold %q", res.stderr, want)
	}
}

// liveRun is a ccexecutor run in progress whose stdout the test reads a line at a time.
type liveRun struct {
	cmd    *exec.Cmd
	lines  chan string  // stdout, a line at a time; closed at its end
	seen   []string     // the lines taken from lines so far
	stderr bytes.Buffer // read once the client has been waited for
	waited bool
}

// startRun starts "ccexecutor run args...". It is killed at the end of the test if it is still
// running then.
func startRun(t *testing.T, args ...string) *liveRun {
	t.Helper()
	r := &liveRun{lines: make(chan string, 1024)}
	r.cmd = exec.Command(binPath, append([]string{"run"}, args...)...)
	r.cmd.Env = runEnv()
	r.cmd.Stderr = &r.stderr
	out, err := r.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Returns at the end of the client's stdout, which comes when it exits or is killed. The
	// tests read fewer lines than lines holds, so a send never blocks for good.
	go func() {
		defer close(r.lines)
		br := bufio.NewReader(out)
		for {
			line, err := br.ReadString('\n')
			if line != "" {
				r.lines <- line
			}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		if !r.waited {
			r.cmd.Process.Kill()
			for range r.lines {
			}
			r.cmd.Wait()
		}
	})
	return r
}

// waitLine waits for a line of stdout holding substr, and returns it.
func (r *liveRun) waitLine(t *testing.T, substr string) string {
	t.Helper()
	timer := time.NewTimer(runWait)
	defer timer.Stop()
	for {
		select {
		case line, ok := <-r.lines:
			if !ok {
				t.Fatalf("stdout ended before a line holding %q; it was:\n%s", substr, strings.Join(r.seen, ""))
			}
			r.seen = append(r.seen, line)
			if strings.Contains(line, substr) {
				return line
			}
		case <-timer.C:
			t.Fatalf("no line holding %q on stdout within %v; it was:\n%s", substr, runWait, strings.Join(r.seen, ""))
		}
	}
}

// signal sends sig to the client.
func (r *liveRun) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := r.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// finish waits for the client to end and returns its exit status. The lines of its stdout
// are in r.seen then.
func (r *liveRun) finish(t *testing.T) int {
	t.Helper()
	timer := time.NewTimer(runWait)
	defer timer.Stop()
	for open := true; open; {
		select {
		case line, ok := <-r.lines:
			if ok {
				r.seen = append(r.seen, line)
			}
			open = ok
		case <-timer.C:
			t.Fatalf("the client did not end within %v; stdout so far:\n%s", runWait, strings.Join(r.seen, ""))
		}
	}
	r.waited = true
	waited := make(chan struct{})
	go func() { r.cmd.Wait(); close(waited) }() // returns once the client has exited
	select {
	case <-waited:
	case <-timer.C:
		r.cmd.Process.Kill()
		<-waited
		t.Fatalf("the client closed its stdout but did not exit within %v", runWait)
	}
	checkNoPanic(t, r.stderr.String())
	return r.cmd.ProcessState.ExitCode()
}

// TestRunExitStatus checks that the client exits with the command's exit status, and with 128+N
// when signal N ended the command, as a shell does; a client that got either wrong would break
// every script that runs commands through it.
func TestRunExitStatus(t *testing.T) {
	url := serveForRun(t, ccexecutor.Config{})
	for _, tt := range []struct {
		name    string
		command string
		want    int
	}{
		{"success", "exit 0", 0},
		{"failure", "exit 3", 3},
		{"high status", "exit 255", 255},
		{"SIGTERM", "kill -TERM $$", 128 + 15},
		{"SIGKILL", "kill -KILL $$", 128 + 9},
		{"not found", "ccexecutor-no-such-command", 127},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := execRun(t, runEnv(), "--url", url, "--", tt.command)
			if res.code != tt.want {
				t.Errorf("exit status = %d, want %d (stderr %q)", res.code, tt.want, res.stderr)
			}
		})
	}
}

// TestRunOutput checks that the command's stdout and stderr come out on the client's stdout
// and stderr as the command wrote them, and that --env, --cwd and --timeout reach the server.
func TestRunOutput(t *testing.T) {
	url := serveForRun(t, ccexecutor.Config{})
	short := serveForRun(t, ccexecutor.Config{MaxLineBytes: 16}) // cuts lines longer than 16 bytes
	dir := t.TempDir()
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name           string
		url            string
		args           []string
		stdout, stderr string
		code           int
	}{
		{
			name:   "streams apart",
			args:   []string{"--", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"},
			stdout: "out1\nout2\n",
			stderr: "err1\nerr2\n",
		},
		{
			name:   "last line without newline",
			args:   []string{"--", "printf 'a\\nb'; printf 'c' >&2"},
			stdout: "a\nb",
			stderr: "c",
		},
		{
			name:   "UTF-8 and tabs",
			args:   []string{"--", "printf 'h\\303\\251\\tx\\r\\n'"},
			stdout: "hé\tx\r\n",
		},
		{
			name:   "words joined",
			args:   []string{"--", "echo", "a", "b;", "echo", "c"},
			stdout: "a b\nc\n",
		},
		{
			name:   "truncated line as received",
			url:    short,
			args:   []string{"--", "printf '%040d\\n' 0; echo next"},
			stdout: strings.Repeat("0", 16) + "...\nnext\n",
		},
		{
			name:   "env",
			args:   []string{"--env", "A=1", "--env", "B=x=y", "--env", "C=", "--env", "A=2", "--", `echo "$A|$B|$C|${C+set}"`},
			stdout: "2|x=y||set\n",
		},
		{
			name:   "cwd",
			args:   []string{"--cwd", dir, "--", "pwd -P"},
			stdout: real + "\n",
		},
		{
			name:   "timeout as a duration",
			args:   []string{"--timeout", "300ms", "--", "sleep 60"},
			stderr: "ccexecutor run: stream timeout after 0.3s\n",
			code:   128 + 15,
		},
		{
			name:   "timeout in seconds",
			args:   []string{"--timeout", "0.3", "--", "echo started; sleep 60"},
			stdout: "started\n",
			stderr: "ccexecutor run: stream timeout after 0.3s\n",
			code:   128 + 15,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			u := url
			if tt.url != "" {
				u = tt.url
			}
			res := execRun(t, runEnv(), append([]string{"--url", u}, tt.args...)...)
			if res.stdout != tt.stdout || res.stderr != tt.stderr || res.code != tt.code {
				t.Errorf("got stdout %q, stderr %q, exit status %d; want %q, %q, %d",
					res.stdout, res.stderr, res.code, tt.stdout, tt.stderr, tt.code)
			}
		})
	}
}

// frameLine is what TestRunJSON reads of one line printed by --json.
type frameLine struct {
	ID     json.RawMessage `json:"id"`
	Method string          `json:"method"`
	Result struct {
		Status string `json:"status"`
	} `json:"result"`
	Params struct {
		Type     string  `json:"type"`
		Data     string  `json:"data"`
		ExitCode *int    `json:"exit_code"`
		Error    *string `json:"error"`
	} `json:"params"`
}

// TestRunJSON checks that --json prints every frame as one line of JSON, in the order
// received, instead of the output, and still exits with the command's status.
func TestRunJSON(t *testing.T) {
	url := serveForRun(t, ccexecutor.Config{})
	res := execRun(t, runEnv(), "--url", url, "--json", "--", "echo hi; echo oops >&2; exit 4")
	if res.code != 4 || res.stderr != "" {
		t.Fatalf("exit status %d, stderr %q; want 4 and nothing", res.code, res.stderr)
	}
	var got []string
	for line := range strings.Lines(res.stdout) {
		var f frameLine
		if err := json.Unmarshal([]byte(line), &f); err != nil {
			t.Fatalf("line %q is not JSON: %v", line, err)
		}
		switch {
		case string(f.ID) == "1":
			got = append(got, "result "+f.Result.Status)
		case f.Method == "process.output":
			got = append(got, f.Params.Type+" "+f.Params.Data)
		case f.Method == "process.completed" && f.Params.ExitCode != nil:
			got = append(got, "completed "+strings.Repeat("x", *f.Params.ExitCode))
		default:
			got = append(got, f.Method)
		}
	}
	// stdout and stderr lines are not ordered with each other.
	if len(got) == 6 && got[3] > got[4] {
		got[3], got[4] = got[4], got[3]
	}
	want := []string{"connected", "result started", "process.started", "stderr oops\n", "stdout hi\n", "completed xxxx"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("frames:\n%q\nwant\n%q\nstdout:\n%s", got, want, res.stdout)
	}
}

// TestRunCancel checks that Ctrl-C cancels the command and that the client waits for the
// server's process.completed, exiting with the status of the canceled command (SIGTERM).
func TestRunCancel(t *testing.T) {
	url := serveForRun(t, ccexecutor.Config{})
	for _, tt := range []struct {
		name  string
		json  bool
		ready string // the line that shows the command runs
	}{
		{"plain", false, "ready\n"},
		{"json", true, `"data":"ready\n"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := []string{"--url", url}
			if tt.json {
				args = append(args, "--json")
			}
			r := startRun(t, append(args, "--", "echo ready; sleep 300")...)
			r.waitLine(t, tt.ready)
			r.signal(t, os.Interrupt)
			if code := r.finish(t); code != 128+15 {
				t.Errorf("exit status = %d, want %d; stderr %q", code, 128+15, r.stderr.String())
			}
			if r.stderr.Len() != 0 {
				t.Errorf("stderr = %q, want nothing after a cancel the user asked for", r.stderr.String())
			}
			if !tt.json {
				return
			}
			last := r.seen[len(r.seen)-1]
			var f frameLine
			if json.Unmarshal([]byte(last), &f) != nil || f.Method != "process.completed" ||
				f.Params.ExitCode == nil || *f.Params.ExitCode != -15 || f.Params.Error == nil || *f.Params.Error != "canceled" {
				t.Errorf("last frame = %s, want process.completed with exit_code -15 and error canceled", last)
			}
		})
	}
}

// TestRunInterruptTwice checks that a second Ctrl-C disconnects at once, with status 130,
// without waiting for a command that does not end on SIGTERM.
func TestRunInterruptTwice(t *testing.T) {
	// The command ignores SIGTERM, so it ends only at SIGKILL, after the kill grace.
	url := serveForRun(t, ccexecutor.Config{KillGrace: 3 * time.Second})
	r := startRun(t, "--url", url, "--json", "--", "trap '' TERM; echo ready; sleep 300")
	r.waitLine(t, `"data":"ready\n"`)
	r.signal(t, os.Interrupt)
	r.waitLine(t, `"method":"process.canceled"`)
	r.signal(t, os.Interrupt)
	if code := r.finish(t); code != 130 {
		t.Errorf("exit status = %d, want 130; stderr %q", code, r.stderr.String())
	}
	for _, line := range r.seen {
		if strings.Contains(line, "process.completed") {
			t.Errorf("the client waited for %s", line)
		}
	}
	if !strings.HasPrefix(r.stderr.String(), "ccexecutor run: interrupted") {
		t.Errorf("stderr = %q, want it to say the client was interrupted", r.stderr.String())
	}
}

// TestRunPauseOnTSTP checks that with --pause-on-tstp, SIGTSTP pauses the command and SIGCONT
// resumes it, while the client keeps running: it goes on to receive and print the frames.
func TestRunPauseOnTSTP(t *testing.T) {
	url := serveForRun(t, ccexecutor.Config{})
	r := startRun(t, "--url", url, "--json", "--pause-on-tstp", "--", "echo ready; sleep 300")
	r.waitLine(t, `"data":"ready\n"`)
	r.signal(t, syscall.SIGTSTP)
	r.waitLine(t, `"method":"process.paused"`)
	r.signal(t, syscall.SIGCONT)
	r.waitLine(t, `"method":"process.resumed"`)
	r.signal(t, os.Interrupt)
	if code := r.finish(t); code != 128+15 {
		t.Errorf("exit status = %d, want %d; stderr %q", code, 128+15, r.stderr.String())
	}
	if want := "ccexecutor run: paused; resume with kill -CONT "; !strings.HasPrefix(r.stderr.String(), want) {
		t.Errorf("stderr = %q, want it to start with %q", r.stderr.String(), want)
	}
}

// TestRunUnreachable checks that a server that cannot be reached ends the client with status
// 120 and one line saying so.
func TestRunUnreachable(t *testing.T) {
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := closed.Addr().String()
	closed.Close()

	// mute accepts connections and closes them at once, answering nothing.
	mute, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan struct{})
	go func() { // returns once mute is closed
		defer close(accepted)
		for {
			c, err := mute.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() { mute.Close(); <-accepted })

	for _, tt := range []struct {
		name, addr, want string
	}{
		{"port closed", closedAddr, "cannot reach the server at ws://" + closedAddr},
		{"not a WebSocket server", mute.Addr().String(), "no WebSocket server at ws://" + mute.Addr().String()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := execRun(t, runEnv(), "--url", "ws://"+tt.addr+"/ws/mcp", "--", "true")
			checkRunFailure(t, res, exitUnreachable, tt.want)
		})
	}
}

// TestRunAccess checks that a session the server refuses (token missing or wrong, origin or
// host refused, session limit) ends the client with status 121 and the reason, and that the
// token of --token or CC_EXECUTOR_TOKEN lets it in.
func TestRunAccess(t *testing.T) {
	locked := serveForRun(t, ccexecutor.Config{Token: "s3cret"})
	full := serveForRun(t, ccexecutor.Config{MaxSessions: 1})
	holdSession(t, full)
	forbidden := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "forbidden: origin not allowed", http.StatusForbidden)
	}))
	t.Cleanup(forbidden.Close)

	for _, tt := range []struct {
		name string
		url  string
		env  []string
		args []string
		code int
		want string // in stderr
	}{
		{"no token", locked, nil, nil, exitRefused, "server refused the session: HTTP 401 Unauthorized"},
		{"wrong token", locked, nil, []string{"--token", "nope"}, exitRefused, "HTTP 401 Unauthorized"},
		{"token flag", locked, nil, []string{"--token", "s3cret"}, 0, ""},
		{"token env", locked, []string{"CC_EXECUTOR_TOKEN=s3cret"}, nil, 0, ""},
		{"token flag over env", locked, []string{"CC_EXECUTOR_TOKEN=nope"}, []string{"--token", "s3cret"}, 0, ""},
		{"session limit", full, nil, nil, exitRefused, "server refused the session: Session limit exceeded (code -32001)"},
		{"HTTP 403", runURL(forbidden), nil, nil, exitRefused, "server refused the session: HTTP 403 Forbidden: forbidden: origin not allowed"},
		{"wrong path", strings.TrimSuffix(full, "/ws/mcp") + "/nope", nil, nil, exitUnreachable, "no ccexecutor server at " + strings.TrimSuffix(full, "/ws/mcp") + "/nope: HTTP 404 Not Found"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := execRun(t, runEnv(tt.env...), append(append([]string{"--url", tt.url}, tt.args...), "--", "echo in")...)
			if tt.code == 0 {
				if res.code != 0 || res.stdout != "in\n" {
					t.Errorf("exit status %d, stdout %q, stderr %q; want 0 and %q", res.code, res.stdout, res.stderr, "in\n")
				}
				return
			}
			checkRunFailure(t, res, tt.code, tt.want)
		})
	}
}

// holdSession opens a session on the server at url and holds it until the test ends.
func holdSession(t *testing.T, url string) {
	t.Helper()
	cfg, err := websocket.NewConfig(url, "http://"+strings.Split(strings.TrimPrefix(url, "ws://"), "/")[0])
	if err != nil {
		t.Fatal(err)
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	ws.SetReadDeadline(time.Now().Add(runWait))
	var hello string
	if err := websocket.Message.Receive(ws, &hello); err != nil || !strings.Contains(hello, `"method":"connected"`) {
		t.Fatalf("holding a session: got %q, %v; want the connected notification", hello, err)
	}
}

// TestRunBadRequest checks that the server's error answer to execute ends the client with
// status 122 and the server's message.
func TestRunBadRequest(t *testing.T) {
	url := serveForRun(t, ccexecutor.Config{})
	allow := serveForRun(t, ccexecutor.Config{AllowedCommands: []string{"echo"}})
	for _, tt := range []struct {
		name string
		url  string
		args []string
		want string
	}{
		{"cwd missing", url, []string{"--cwd", "/nonexistent", "--", "true"}, `Invalid params: cwd "/nonexistent" is not a directory (code -32602)`},
		{"empty command", url, []string{"--", ""}, "Invalid params: command must be a non-empty string (code -32602)"},
		{"not allowed", allow, []string{"--", "ls"}, "Command 'ls' is not allowed (code -32002)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := execRun(t, runEnv(), append([]string{"--url", tt.url}, tt.args...)...)
			checkRunFailure(t, res, exitRequest, "server refused the command: "+tt.want)
			if res.stdout != "" {
				t.Errorf("stdout = %q, want nothing", res.stdout)
			}
		})
	}
}

// TestRunConnectionLost checks that a connection that ends before process.completed ends the
// client with status 123, after the output that did arrive.
func TestRunConnectionLost(t *testing.T) {
	// The server starts the command, sends a line, and goes away.
	hs := httptest.NewServer(websocket.Server{
		Handshake: func(*websocket.Config, *http.Request) error { return nil },
		Handler: func(ws *websocket.Conn) {
			websocket.Message.Send(ws, `{"jsonrpc":"2.0","method":"connected","params":{}}`)
			var req string
			websocket.Message.Receive(ws, &req)
			websocket.Message.Send(ws, `{"jsonrpc":"2.0","result":{"status":"started","pid":7,"pgid":7},"id":1}`)
			websocket.Message.Send(ws, `{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"partial\n","truncated":false}}`)
			ws.Close()
		},
	})
	t.Cleanup(hs.Close)
	res := execRun(t, runEnv(), "--url", runURL(hs), "--", "sleep 300")
	checkRunFailure(t, res, exitLost, "connection lost before the command completed")
	if res.stdout != "partial\n" {
		t.Errorf("stdout = %q, want %q", res.stdout, "partial\n")
	}
}

// TestRunUsage checks that invalid arguments end the client with status 2 and one line, and
// that -h documents the exit statuses.
func TestRunUsage(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"no command", []string{"--"}, "no command given"},
		{"unknown flag", []string{"--nope", "--", "true"}, "flag provided but not defined: -nope"},
		{"env without =", []string{"--env", "A", "--", "true"}, `invalid value "A" for flag -env`},
		{"bad timeout", []string{"--timeout", "soon", "--", "true"}, `invalid value "soon" for flag -timeout`},
		{"negative timeout", []string{"--timeout", "-1", "--", "true"}, `invalid value "-1" for flag -timeout`},
		{"http url", []string{"--url", "http://127.0.0.1:1/ws/mcp", "--", "true"}, `invalid --url "http://127.0.0.1:1/ws/mcp"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			checkRunFailure(t, execRun(t, runEnv(), tt.args...), exitUsage, tt.want)
		})
	}
	t.Run("help", func(t *testing.T) {
		res := execRun(t, runEnv(), "-h")
		if res.code != 0 {
			t.Errorf("exit status = %d, want 0", res.code)
		}
		for _, want := range []string{"Exit status:", "120", "121", "122", "123", "130", "-pause-on-tstp", "-cacert", "-insecure-skip-tls-verify", "/dev/null", "U+FFFD", "binary output is not preserved", "is cut", "32 MiB"} {
			if !strings.Contains(res.stderr, want) {
				t.Errorf("usage does not mention %q:\n%s", want, res.stderr)
			}
		}
	})
}

// TestExitStatus checks the mapping of process.completed's exit_code to an exit status.
func TestExitStatus(t *testing.T) {
	for _, tt := range []struct{ code, want int }{
		{0, 0}, {1, 1}, {255, 255}, {-2, 130}, {-9, 137}, {-15, 143},
	} {
		if got := exitStatus(tt.code); got != tt.want {
			t.Errorf("exitStatus(%d) = %d, want %d", tt.code, got, tt.want)
		}
	}
}

// TestRefusal checks the description of a handshake answer that is not 101.
func TestRefusal(t *testing.T) {
	for _, tt := range []struct{ head, want string }{
		{"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\nunauthorized\n", "HTTP 401 Unauthorized: unauthorized (check --token or CC_EXECUTOR_TOKEN)"},
		{"HTTP/1.1 403 Forbidden\r\nContent-Length: 39\r\n\r\nforbidden: host is not a loopback name\n", "HTTP 403 Forbidden: forbidden: host is not a loopback name"},
		{"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "HTTP 503 Service Unavailable"},
		{"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 100\r\n\r\n<html>cut", "HTTP 502 Bad Gateway: <html>cut"},
		{"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + strings.Repeat("x", 2000), "HTTP 200 OK"},
	} {
		resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(tt.head)), nil)
		if err != nil {
			t.Fatalf("%q: %v", tt.head, err)
		}
		if got := refusal(resp); got != tt.want {
			t.Errorf("refusal(%q) = %q, want %q", tt.head, got, tt.want)
		}
	}
}
