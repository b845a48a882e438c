package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// serveEnv is the environment of a server started by these tests: the test's, without any
// variable the server reads, plus extra.
func serveEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		switch name, _, _ := strings.Cut(kv, "="); name {
		case "ADDR", "DEFAULT_PORT", "LOG_LEVEL", "INSECURE", "ALLOWED_COMMANDS", "ALLOWED_ORIGINS",
			"MAX_SESSIONS", "STREAM_TIMEOUT", "MAX_LINE_BYTES", "KILL_GRACE", "MAX_MESSAGE_BYTES",
			"PING_INTERVAL", "WRITE_WAIT", "CC_EXECUTOR_TOKEN", "ALLOWED_ENV", "CC_EXECUTOR_TOKEN_FILE", "CGROUP", "IDLE_TIMEOUT":
		default:
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// serveProc is a ccexecutor binary serving for a test.
type serveProc struct {
	cmd    *exec.Cmd
	addr   string        // host:port it listens on
	stderr bytes.Buffer  // read once it has exited
	exited chan struct{} // closed once it has exited and been waited for
	err    error         // from Wait, once exited is closed
}

// startServe starts the binary with args and waits until it says where it listens. It is
// killed at the end of the test if it is still running then.
func startServe(t *testing.T, env []string, args ...string) *serveProc {
	t.Helper()
	cmd := exec.Command(binPath, args...)
	cmd.Env = env
	return startServeCmd(t, cmd)
}

// startServeCmd is startServe with the command given: the binary, or a shell that execs it.
func startServeCmd(t *testing.T, cmd *exec.Cmd) *serveProc {
	t.Helper()
	s := &serveProc{cmd: cmd, exited: make(chan struct{})}
	s.cmd.Stderr = &s.stderr
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	first := make(chan string, 1)
	go func() { // returns at the server's first line or the end of its stdout
		line, _ := bufio.NewReader(out).ReadString('\n')
		first <- line
		io.Copy(io.Discard, out)
		s.err = s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-s.exited
	})
	select {
	case line := <-first:
		addr, hasPrefix := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "ccexecutor listening on ws://")
		addr, hasSuffix := strings.CutSuffix(addr, "/ws/mcp")
		if !hasPrefix || !hasSuffix {
			<-s.exited
			t.Fatalf("first line %q, want the listening line; stderr:\n%s", line, &s.stderr)
		}
		s.addr = addr
	case <-time.After(runWait):
		t.Fatalf("the server did not say where it listens within %v", runWait)
	}
	return s
}

// rawClient is a raw WebSocket client that sees every frame as it is on the wire.
type rawClient struct {
	t      *testing.T
	c      net.Conn
	br     *bufio.Reader
	closed int // status of the close frame received, or 0
}

// rawDial connects to addr's /ws/mcp and reads the connected notification.
func rawDial(t *testing.T, addr string) *rawClient {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, runWait)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { nc.Close() })
	key := make([]byte, 16)
	rand.Read(key)
	req, _ := http.NewRequest("GET", "http://"+addr+"/ws/mcp", nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString(key))
	req.Header.Set("Sec-WebSocket-Version", "13")
	nc.SetDeadline(time.Now().Add(runWait))
	if err := req.Write(nc); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, req)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v, %v", resp, err)
	}
	c := &rawClient{t: t, c: nc, br: br}
	if m := c.next(); m.Method != "connected" {
		t.Fatalf("first frame %s, want connected", m.raw)
	}
	return c
}

// rawMsg is a frame from the server, decoded.
type rawMsg struct {
	Method string          `json:"method"`
	ID     json.RawMessage `json:"id"`
	Result struct {
		PGID int `json:"pgid"`
	} `json:"result"`
	Error  *struct{ Code int } `json:"error"`
	Params struct {
		Data     string  `json:"data"`
		ExitCode *int    `json:"exit_code"`
		Error    *string `json:"error"`
	} `json:"params"`
	raw string
}

// read returns the next data frame, skipping pings; a close frame is recorded and reported as
// io.EOF.
func (c *rawClient) read() (rawMsg, error) {
	for {
		c.c.SetReadDeadline(time.Now().Add(runWait))
		var h [2]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return rawMsg{}, err
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var l [2]byte
			if _, err := io.ReadFull(c.br, l[:]); err != nil {
				return rawMsg{}, err
			}
			n = uint64(binary.BigEndian.Uint16(l[:]))
		case 127:
			var l [8]byte
			if _, err := io.ReadFull(c.br, l[:]); err != nil {
				return rawMsg{}, err
			}
			n = binary.BigEndian.Uint64(l[:])
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(c.br, p); err != nil {
			return rawMsg{}, err
		}
		switch h[0] & 0x0f {
		case 0x8:
			if len(p) >= 2 {
				c.closed = int(binary.BigEndian.Uint16(p))
			}
			return rawMsg{}, io.EOF
		case 0x9, 0xa:
			continue
		}
		m := rawMsg{raw: string(p)}
		if err := json.Unmarshal(p, &m); err != nil {
			return rawMsg{}, fmt.Errorf("frame %q: %v", p, err)
		}
		return m, nil
	}
}

// next is read that fails the test on an error.
func (c *rawClient) next() rawMsg {
	c.t.Helper()
	m, err := c.read()
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return m
}

// send sends a text frame, masked as a client must.
func (c *rawClient) send(payload string) {
	c.t.Helper()
	b := []byte{0x81}
	switch n := len(payload); {
	case n <= 125:
		b = append(b, 0x80|byte(n))
	default:
		b = binary.BigEndian.AppendUint16(append(b, 0x80|126), uint16(n))
	}
	mask := []byte{9, 8, 7, 6}
	b = append(b, mask...)
	for i := range len(payload) {
		b = append(b, payload[i]^mask[i%4])
	}
	c.c.SetWriteDeadline(time.Now().Add(runWait))
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// TestShutdownSignal checks the binary's end on SIGTERM or SIGINT: a run that ignores SIGTERM
// is killed after the kill grace, its client gets process.completed with "server shutting
// down" and a close frame 1001, new connections are refused, the server exits 0 within the kill
// grace plus one second, and nothing of the run's process group survives it. A plain HTTP
// connection that has not sent a whole request, such as a browser's preconnect, must not
// change any of that.
func TestShutdownSignal(t *testing.T) {
	const grace = 500 * time.Millisecond
	rows := []struct {
		name string
		sig  syscall.Signal
		idle bool // a TCP connection that sent nothing is open at the signal
	}{
		{"SIGTERM", syscall.SIGTERM, false},
		{"SIGINT", syscall.SIGINT, false},
		{"SIGTERM with an idle connection open", syscall.SIGTERM, true},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			t.Parallel()
			s := startServe(t, serveEnv(), "--addr", "127.0.0.1:0", "--kill-grace", grace.String())
			if row.idle {
				// Connected before the session, so that the server has accepted it once the
				// session is upgraded: it accepts in order.
				nc, err := net.Dial("tcp", s.addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { nc.Close() })
			}
			c := rawDial(t, s.addr)
			c.send(`{"jsonrpc":"2.0","method":"execute","params":{"command":"trap '' TERM; echo ready; sleep 300"},"id":1}`)
			r := c.next()
			if r.Error != nil || r.Result.PGID <= 0 {
				t.Fatalf("execute: %s", r.raw)
			}
			pgid := r.Result.PGID
			t.Cleanup(func() { syscall.Kill(-pgid, syscall.SIGKILL) }) // if the test fails because it survived
			for m := c.next(); m.Method != "process.output" || m.Params.Data != "ready\n"; m = c.next() {
				if m.Method == "process.completed" {
					t.Fatalf("the command ended before it was ready: %s", m.raw)
				}
			}

			signaled := time.Now()
			if err := s.cmd.Process.Signal(row.sig); err != nil {
				t.Fatal(err)
			}
			var done rawMsg
			var err error
			for done, err = c.read(); err == nil && done.Method != "process.completed"; done, err = c.read() {
			}
			if p := done.Params; err != nil || p.Error == nil || *p.Error != "server shutting down" || p.ExitCode == nil || *p.ExitCode != -int(syscall.SIGKILL) {
				t.Errorf("process.completed = %s, %v; want error %q and exit code -9 (SIGTERM is ignored)", done.raw, err, "server shutting down")
			}
			if err == nil {
				if m, err := c.read(); err != io.EOF || c.closed != 1001 {
					t.Errorf("after process.completed: %s, %v, close code %d; want a close frame 1001", m.raw, err, c.closed)
				}
			}
			if err := refused(s.addr); err != nil {
				t.Errorf("after %v: %v", row.sig, err)
			}

			limit := grace + time.Second
			select {
			case <-s.exited:
			case <-time.After(limit - time.Since(signaled)):
				t.Errorf("the server did not exit within %v of %v", limit, row.sig)
				select {
				case <-s.exited:
				case <-time.After(runWait):
					t.Fatalf("the server did not exit within %v of %v", runWait, row.sig)
				}
			}
			if code := s.cmd.ProcessState.ExitCode(); code != 0 {
				t.Errorf("exit status %d (%v), want 0; stderr:\n%s", code, s.err, &s.stderr)
			}
			if err := syscall.Kill(-pgid, 0); err != syscall.ESRCH {
				t.Errorf("kill(-%d, 0) = %v after the server exited, want ESRCH: the run's group survived", pgid, err)
			}
			checkNoPanic(t, s.stderr.String())
		})
	}
}

// refused checks that a new session on addr is refused: the connection itself, or the
// handshake with an HTTP error.
func refused(addr string) error {
	nc, err := net.DialTimeout("tcp", addr, runWait)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil
		}
		return fmt.Errorf("a new connection: %v, want it refused", err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(runWait))
	req, _ := http.NewRequest("GET", "http://"+addr+"/ws/mcp", nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString(make([]byte, 16)))
	req.Header.Set("Sec-WebSocket-Version", "13")
	if err := req.Write(nc); err != nil {
		return nil // closed under the client: refused
	}
	resp, err := http.ReadResponse(bufio.NewReader(nc), req)
	if err == nil && resp.StatusCode == http.StatusSwitchingProtocols {
		return errors.New("a new session was accepted during shutdown")
	}
	return nil
}

// TestFlags checks that the server refuses a bad configuration before it listens, with exit
// status 2 and a message that names the problem, and that -h lists every flag.
func TestFlags(t *testing.T) {
	dir := t.TempDir()
	tokenFile := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil { // not masked by the umask
			t.Fatal(err)
		}
		return path
	}
	emptyToken := tokenFile("empty", "", 0o600)
	newlineToken := tokenFile("newline", "\n", 0o600)
	groupToken := tokenFile("group", "s3cret\n", 0o640)
	worldToken := tokenFile("world", "s3cret\n", 0o604)
	groupWritable := tokenFile("group-writable", "s3cret\n", 0o620)
	goodToken := tokenFile("good", "s3cret\n", 0o600)
	rows := []struct {
		name string
		args []string
		env  []string
		want string // in stderr
	}{
		{"max-sessions 0", []string{"--max-sessions", "0"}, nil, `invalid value "0" for flag -max-sessions: must be positive`},
		{"max-sessions negative", []string{"--max-sessions", "-3"}, nil, `invalid value "-3" for flag -max-sessions: must be positive`},
		{"max-sessions not a number", []string{"--max-sessions", "many"}, nil, `invalid value "many" for flag -max-sessions: want a whole number`},
		{"max-sessions overflows", []string{"--max-sessions", "9223372036854775808"}, nil, `invalid value "9223372036854775808" for flag -max-sessions: out of range: at most 9223372036854775807`},
		{"max-line-bytes 0", []string{"--max-line-bytes", "0"}, nil, `invalid value "0" for flag -max-line-bytes: must be positive`},
		{"max-message-bytes negative", []string{"--max-message-bytes", "-1"}, nil, `invalid value "-1" for flag -max-message-bytes: must be positive`},
		{"stream-timeout abc", []string{"--stream-timeout", "abc"}, nil, `invalid value "abc" for flag -stream-timeout: want seconds or a duration`},
		{"stream-timeout 0", []string{"--stream-timeout", "0"}, nil, `invalid value "0" for flag -stream-timeout: must be positive`},
		{"stream-timeout overflows", []string{"--stream-timeout", "1e300"}, nil, `invalid value "1e300" for flag -stream-timeout: out of range: at most 2562047h47m16s`},
		{"stream-timeout just overflows", []string{"--stream-timeout", "9223372037"}, nil, `invalid value "9223372037" for flag -stream-timeout: out of range: at most 2562047h47m16s`},
		{"kill-grace duration overflows", []string{"--kill-grace", "2562047h48m"}, nil, `invalid value "2562047h48m" for flag -kill-grace: out of range: at most 2562047h47m16s`},
		{"kill-grace negative", []string{"--kill-grace", "-1s"}, nil, `invalid value "-1s" for flag -kill-grace: must be positive`},
		{"reattach-window negative", []string{"--reattach-window", "-1s"}, nil, `invalid value "-1s" for flag -reattach-window: must be positive`},
		{"reattach-buffer zero", []string{"--reattach-buffer", "0"}, nil, `invalid value "0" for flag -reattach-buffer`},
		{"instance with a dot", []string{"--instance", "a.b"}, nil, `invalid value "a.b" for flag -instance: want 1 to 32 letters, digits, - or _`},
		{"instance too long", []string{"--instance", strings.Repeat("a", 33)}, nil, `for flag -instance: want 1 to 32 letters, digits, - or _`},
		{"instance from the environment", nil, []string{"CC_EXECUTOR_INSTANCE=x y"}, `invalid CC_EXECUTOR_INSTANCE="x y": want 1 to 32 letters, digits, - or _`},
		{"reattach window from the environment", nil, []string{"REATTACH_WINDOW=soon"}, `invalid REATTACH_WINDOW="soon"`},
		{"ping-interval NaN", []string{"--ping-interval", "NaN"}, nil, `invalid value "NaN" for flag -ping-interval: not a number`},
		{"write-wait 0", []string{"--write-wait", "0s"}, nil, `invalid value "0s" for flag -write-wait: must be positive`},
		{"log-level", []string{"--log-level", "loud"}, nil, `invalid value "loud" for flag -log-level: want debug, info, warn or error`},
		{"LOG_LEVEL=loud", nil, []string{"LOG_LEVEL=loud"}, `invalid LOG_LEVEL="loud": want debug, info, warn or error`},
		{"unknown flag", []string{"--max-session", "5"}, nil, "flag provided but not defined: -max-session"},
		{"MAX_SESSIONS=x", nil, []string{"MAX_SESSIONS=x"}, `invalid MAX_SESSIONS="x"`},
		{"MAX_SESSIONS=0", nil, []string{"MAX_SESSIONS=0"}, `invalid MAX_SESSIONS="0": must be positive`},
		{"STREAM_TIMEOUT overflows", nil, []string{"STREAM_TIMEOUT=1e300"}, `invalid STREAM_TIMEOUT="1e300": out of range`},
		{"ADDR without port", nil, []string{"ADDR=127.0.0.1"}, `invalid ADDR="127.0.0.1": want host:port`},
		{"KILL_GRACE=soon", nil, []string{"KILL_GRACE=soon"}, `invalid KILL_GRACE="soon"`},
		{"INSECURE=maybe", nil, []string{"INSECURE=maybe"}, `invalid INSECURE="maybe"`},
		{"all interfaces without a token", []string{"--addr", "0.0.0.0:0"}, nil, "refusing to listen on 0.0.0.0:0 without a token"},
		{"all IPv6 interfaces without a token", []string{"--addr", "[::]:0"}, nil, "refusing to listen on [::]:0 without a token"},
		{"no host without a token", []string{"--addr", ":0"}, nil, "refusing to listen on :0 without a token"},
		{"a name without a token", []string{"--addr", "example.com:0"}, nil, "refusing to listen on example.com:0 without a token"},
		{"ADDR on all interfaces without a token", nil, []string{"ADDR=0.0.0.0:0"}, "refusing to listen on 0.0.0.0:0 without a token"},
		{"empty token", []string{"--addr", "0.0.0.0:0", "--token", ""}, []string{"CC_EXECUTOR_TOKEN=x"}, "refusing to listen on 0.0.0.0:0 without a token"},
		{"address without port", []string{"--addr", "127.0.0.1"}, nil, `invalid value "127.0.0.1" for flag -addr: want host:port`},
		{"port out of range", []string{"--addr", "127.0.0.1:70000"}, nil, `invalid port "70000"`},
		{"DEFAULT_PORT not a number", nil, []string{"DEFAULT_PORT=http"}, `invalid DEFAULT_PORT="http": invalid port "http"`},
		// An argument that is not a flag stops flag parsing: the flags after it would be
		// dropped without a word, here the allowlist, and the server would run any command.
		{"argument before flags", []string{"--addr", "127.0.0.1:0", "8003", "--allowed-commands", "echo"}, nil, "8003"},
		// The allowlist must hold as written, or the server must not start.
		{"allowed command not found", []string{"--allowed-commands", "echo,ccexecutor-no-such-program"}, nil, `allowed command "ccexecutor-no-such-program" not found`},
		{"ALLOWED_COMMANDS not found", nil, []string{"ALLOWED_COMMANDS=/nonexistent/id"}, `allowed command "/nonexistent/id" not found`},
		{"allowed-env LD_PRELOAD", []string{"--allowed-commands", "echo", "--allowed-env", "LANG,LD_PRELOAD"}, nil, `allowed variable "LD_PRELOAD"`},
		{"allowed-env GCONV_PATH", []string{"--allowed-commands", "echo", "--allowed-env", "GCONV_PATH"}, nil, `allowed variable "GCONV_PATH"`},
		{"allowed-env ld_preload", []string{"--allowed-commands", "echo", "--allowed-env", "ld_preload"}, nil, `allowed variable "ld_preload"`},
		{"ALLOWED_ENV=MALLOC_CHECK_", []string{"--allowed-commands", "echo"}, []string{"ALLOWED_ENV=MALLOC_CHECK_"}, `allowed variable "MALLOC_CHECK_"`},
		// A token file that is missing, empty or readable by others.
		{"token file missing", []string{"--token-file", filepath.Join(dir, "missing")}, nil, "token file: open " + filepath.Join(dir, "missing") + ": no such file or directory"},
		{"token file empty", []string{"--token-file", emptyToken}, nil, "token file " + emptyToken + " is empty"},
		{"token file a newline", []string{"--token-file", newlineToken}, nil, "token file " + newlineToken + " is empty"},
		{"token file group-readable", []string{"--token-file", groupToken}, nil, "token file " + groupToken + " has mode 0640"},
		{"token file world-readable", []string{"--token-file", worldToken}, nil, "token file " + worldToken + " has mode 0604"},
		{"token file group-writable", []string{"--token-file", groupWritable}, nil, "has mode 0620"},
		{"token file a folder", []string{"--token-file", dir}, nil, "token file " + dir + " is not a regular file"},
		{"CC_EXECUTOR_TOKEN_FILE world-readable", nil, []string{"CC_EXECUTOR_TOKEN_FILE=" + worldToken}, "has mode 0604"},
		{"token file and token", []string{"--token-file", goodToken, "--token", "x"}, nil, "--token-file and --token (or CC_EXECUTOR_TOKEN) both set"},
		{"token file and CC_EXECUTOR_TOKEN", []string{"--token-file", goodToken}, []string{"CC_EXECUTOR_TOKEN=x"}, "both set"},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			t.Parallel()
			res := runServe(t, serveEnv(row.env...), row.args...)
			if res.code != 2 || !strings.Contains(res.stderr, row.want) {
				t.Errorf("exit status %d, stderr:\n%s\nwant status 2 and a message holding %q", res.code, res.stderr, row.want)
			}
			if first, _, _ := strings.Cut(res.stderr, "\n"); !strings.Contains(first, row.want) {
				t.Errorf("the first line of stderr is %q, want it to name the problem (%q)", first, row.want)
			}
			if res.stdout != "" {
				t.Errorf("stdout = %q, want nothing", res.stdout)
			}
			checkNoPanic(t, res.stderr)
		})
	}

	t.Run("-h", func(t *testing.T) {
		res := runServe(t, serveEnv(), "-h")
		if res.code != 0 {
			t.Errorf("exit status %d, want 0", res.code)
		}
		for _, flag := range []string{
			"addr", "log-level", "insecure", "allowed-commands", "allow-origin", "max-sessions", "stream-timeout",
			"max-line-bytes", "kill-grace", "max-message-bytes", "ping-interval", "write-wait", "token",
			"allowed-env", "token-file",
		} {
			if !strings.Contains(res.stderr, "  -"+flag+" ") && !strings.Contains(res.stderr, "  -"+flag+"\n") {
				t.Errorf("-h does not show -%s:\n%s", flag, res.stderr)
			}
		}
		// Each default once, and the real one: a default written into the usage text used to
		// come out next to the flag package's, taken before the default was set: "(default
		// 5s) (default 0s)".
		for line := range strings.Lines(res.stderr) {
			if strings.Count(line, "(default") > 1 || strings.Contains(line, "(default 0s)") {
				t.Errorf("-h: %q", line)
			}
		}
		for _, want := range []string{"(env KILL_GRACE) (default 5s)\n", "(env STREAM_TIMEOUT) (default 5m0s)\n", "(env MAX_SESSIONS) (default 100)\n"} {
			if !strings.Contains(res.stderr, want) {
				t.Errorf("-h does not say %q:\n%s", want, res.stderr)
			}
		}
	})

	// A flag given wins over its environment variable, which is then not even checked.
	t.Run("flag over invalid env", func(t *testing.T) {
		s := startServe(t, serveEnv("MAX_SESSIONS=x", "LOG_LEVEL=loud", "ADDR=nope", "STREAM_TIMEOUT=1e300"),
			"--max-sessions", "3", "--log-level", "warn", "--addr", "127.0.0.1:0", "--stream-timeout", "9s")
		if s.addr == "" {
			t.Fatal("no address")
		}
	})

	// Listening on all addresses, the listening line names one a client can connect to.
	for _, tt := range []struct{ addr, host string }{
		{"0.0.0.0:0", "127.0.0.1"},
		{":0", "127.0.0.1"},
		{"[::]:0", "::1"},
	} {
		t.Run("listening on "+tt.addr, func(t *testing.T) {
			s := startServe(t, serveEnv(), "--addr", tt.addr, "--token", "x")
			if host, _, _ := net.SplitHostPort(s.addr); host != tt.host {
				t.Errorf("listening line names %s, want host %s", s.addr, tt.host)
			}
			c, err := net.DialTimeout("tcp", s.addr, runWait)
			if err != nil {
				t.Fatalf("the listening line's address: %v", err)
			}
			c.Close()
		})
	}
}

// runServe runs the server binary with args, and fails the test if it starts to listen; it
// returns what it printed and its exit status.
func runServe(t *testing.T, env []string, args ...string) runResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), runWait)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, args...)
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// A server that listens prints where at once, then nothing: do not wait for it to end.
	br := bufio.NewReader(out)
	stdout, _ := br.ReadString('\n')
	if strings.HasPrefix(stdout, "ccexecutor listening on") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("ccexecutor %q started to serve: %s", args, stdout)
	}
	rest, _ := io.ReadAll(br)
	stdout += string(rest)
	err = cmd.Wait()
	if ctx.Err() != nil {
		t.Fatalf("ccexecutor %q did not end within %v", args, runWait)
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return runResult{stdout, stderr.String(), cmd.ProcessState.ExitCode()}
}
