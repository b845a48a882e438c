package ccexecutor

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
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// testServer is a Server behind an httptest.Server.
type testServer struct {
	*Server
	hs   *httptest.Server
	addr string // host:port
}

func newTestServer(t testing.TB, cfg Config) *testServer {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Cgroup == "" {
		cfg.Cgroup = os.Getenv(testCgroupEnv)
	}
	s := NewServer(cfg)
	hs := httptest.NewServer(s)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			// Close would wait for the sessions that did not end; leave them to TestMain.
			t.Errorf("Shutdown: %v", err)
			return
		}
		hs.Close()
	})
	return &testServer{s, hs, strings.TrimPrefix(hs.URL, "http://")}
}

// msg is any frame from the server, decoded.
type msg struct {
	Method string          `json:"method"`
	Params event           `json:"params"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    int             `json:"code"`
		Message string          `json:"message"`
		Data    json.RawMessage `json:"data"`
	} `json:"error"`
	ID  json.RawMessage `json:"id"`
	raw string
}

// event is the params of any notification.
type event struct {
	SessionID    string  `json:"session_id"`
	Status       string  `json:"status"`
	PID          int     `json:"pid"`
	PGID         int     `json:"pgid"`
	ExitCode     *int    `json:"exit_code"`
	Error        *string `json:"error"`
	Type         string  `json:"type"`
	Data         string  `json:"data"`
	Truncated    bool    `json:"truncated"`
	DroppedBytes int     `json:"dropped_bytes"`
}

// client is a WebSocket client written for the tests, so that they see the frames as they are
// on the wire, close codes included.
type client struct {
	t        *testing.T
	c        net.Conn
	br       *bufio.Reader
	id       int
	backlog  []msg // notifications read while waiting for something else
	closeErr error // how the connection ended, for readUntil
	pong     bool  // answer every Ping with a Pong, as WebSocket libraries do on their own; read skips them otherwise
	pings    int   // Pings answered
	closed   struct {
		code   int // status of the close frame received, or 0
		reason string
	}
}

// dial connects to the server's /ws/mcp; it fails the test unless the upgrade succeeds.
func dial(t *testing.T, addr string) *client {
	t.Helper()
	c, resp, err := tryDial(t, addr, nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("dial: HTTP %s", resp.Status)
	}
	return c
}

// tryDial performs the handshake with the extra headers h and returns the response.
func tryDial(t *testing.T, addr string, h http.Header) (*client, *http.Response, error) {
	return dialAhead(t, addr, h, nil)
}

// dialAhead is tryDial sending ahead, in the same write as the handshake's request, before it
// reads the answer: bytes that reach the server before it has answered.
func dialAhead(t *testing.T, addr string, h http.Header, ahead []byte) (*client, *http.Response, error) {
	return dialTarget(t, addr, "/ws/mcp", h, ahead)
}

// dialTarget is dialAhead asking for target, a path with an optional query, instead of /ws/mcp.
func dialTarget(t *testing.T, addr, target string, h http.Header, ahead []byte) (*client, *http.Response, error) {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	t.Cleanup(func() { nc.Close() })
	key := make([]byte, 16)
	rand.Read(key)
	req, _ := http.NewRequest("GET", "http://"+addr+target, nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString(key))
	req.Header.Set("Sec-WebSocket-Version", "13")
	for k, v := range h {
		req.Header[k] = v
	}
	var out bytes.Buffer
	req.Write(&out)
	if _, err := nc.Write(append(out.Bytes(), ahead...)); err != nil {
		return nil, nil, err
	}
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, nil, err
	}
	return &client{t: t, c: nc, br: br}, resp, nil
}

// writeFrame sends one masked frame, as a client must.
func (c *client) writeFrame(op byte, payload []byte) {
	c.t.Helper()
	if err := c.tryWriteFrame(op, payload); err != nil {
		c.t.Fatalf("write frame: %v", err)
	}
}

// tryWriteFrame is writeFrame for a client that expects the server to close the connection.
func (c *client) tryWriteFrame(op byte, payload []byte) error {
	c.c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	_, err := c.c.Write(maskedFrame(op, payload))
	return err
}

// maskedFrame encodes one final client frame, masked as a client must.
func maskedFrame(op byte, payload []byte) []byte {
	return appendMasked(nil, 0x80|op, payload)
}

// appendMasked appends a client frame with the first byte head (FIN, RSV bits and opcode, as a
// test wants them), its payload masked.
func appendMasked(b []byte, head byte, payload []byte) []byte {
	b = append(b, head)
	switch n := len(payload); {
	case n <= 125:
		b = append(b, 0x80|byte(n))
	case n <= 0xffff:
		b = binary.BigEndian.AppendUint16(append(b, 0x80|126), uint16(n))
	default:
		b = binary.BigEndian.AppendUint64(append(b, 0x80|127), uint64(n))
	}
	mask := [4]byte{0x5a, 0x17, 0xc3, 0x08}
	b = append(b, mask[:]...)
	for i, x := range payload {
		b = append(b, x^mask[i%4])
	}
	return b
}

// readFrame reads one frame; control frames other than close are returned like the rest.
func (c *client) readFrame() (op byte, payload []byte, err error) {
	c.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	var h [2]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return 0, nil, err
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		_, err = io.ReadFull(c.br, l[:])
		n = uint64(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		_, err = io.ReadFull(c.br, l[:])
		n = binary.BigEndian.Uint64(l[:])
	}
	if err != nil {
		return 0, nil, err
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(c.br, payload); err != nil {
		return 0, nil, err
	}
	return h[0] & 0x0f, payload, nil
}

// send sends v as a text frame.
func (c *client) send(v any) {
	c.t.Helper()
	b, ok := v.([]byte)
	if !ok {
		var err error
		if b, err = json.Marshal(v); err != nil {
			c.t.Fatal(err)
		}
	}
	c.writeFrame(0x1, b)
}

// next returns the next message, from the backlog first; it fails the test at a close frame,
// the end of the connection, or after 20 s without a frame.
func (c *client) next() msg {
	c.t.Helper()
	if len(c.backlog) > 0 {
		m := c.backlog[0]
		c.backlog = c.backlog[1:]
		return m
	}
	m, err := c.read()
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return m
}

// read reads the next data frame, skipping pings; a close frame is recorded and reported as
// io.EOF.
func (c *client) read() (msg, error) {
	for {
		op, p, err := c.readFrame()
		switch {
		case err != nil:
			return msg{}, err
		case op == 0x8:
			if len(p) >= 2 {
				c.closed.code, c.closed.reason = int(binary.BigEndian.Uint16(p)), string(p[2:])
			}
			return msg{}, io.EOF
		case op == 0x9 && c.pong:
			c.pings++
			c.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.c.Write(maskedFrame(0xa, p)); err != nil {
				return msg{}, err
			}
			continue
		case op == 0x9 || op == 0xa:
			continue
		}
		m := msg{raw: string(p)}
		if err := json.Unmarshal(p, &m); err != nil {
			return msg{}, fmt.Errorf("frame %q: %v", p, err)
		}
		return m, nil
	}
}

// call sends a request and returns its response, keeping notifications read meanwhile.
func (c *client) call(method string, params any) msg {
	c.t.Helper()
	c.id++
	id := strconv.Itoa(c.id)
	c.send(map[string]any{"jsonrpc": "2.0", "method": method, "params": params, "id": c.id})
	for {
		m, err := c.read()
		if err != nil {
			c.t.Fatalf("waiting for the response to %s: %v", method, err)
		}
		if m.Method == "" && string(m.ID) == id {
			return m
		}
		c.backlog = append(c.backlog, m)
	}
}

// until returns the next notification named method and the messages before it.
func (c *client) until(method string) (msg, []msg) {
	c.t.Helper()
	var before []msg
	for {
		m := c.next()
		if m.Method == method {
			return m, before
		}
		before = append(before, m)
	}
}

// connected reads the connected notification that starts a session.
func (c *client) connected() {
	c.t.Helper()
	if m := c.next(); m.Method != "connected" || m.Params.SessionID == "" {
		c.t.Fatalf("first frame = %s, want connected", m.raw)
	}
}

// start executes command and waits until it prints a first line, which it returns with the
// process's PID: the readiness handshake.
func (c *client) start(command string, params map[string]any) (pid int, first string) {
	c.t.Helper()
	if params == nil {
		params = map[string]any{}
	}
	params["command"] = command
	r := c.call("execute", params)
	if r.Error != nil {
		c.t.Fatalf("execute %q: %s", command, r.raw)
	}
	var res struct{ PID, PGID int }
	json.Unmarshal(r.Result, &res)
	if res.PID <= 0 || res.PGID != res.PID {
		c.t.Fatalf("execute result %s: want pid > 0 and pgid == pid", r.Result)
	}
	for {
		m := c.next()
		if m.Method == "process.output" {
			return res.PID, m.Params.Data
		}
		if m.Method == "process.completed" {
			c.t.Fatalf("%q completed before printing: %s", command, m.raw)
		}
	}
}

// run executes command and returns its output lines and its process.completed.
func (c *client) run(command string, params map[string]any) (out []event, done event) {
	c.t.Helper()
	if params == nil {
		params = map[string]any{}
	}
	params["command"] = command
	if r := c.call("execute", params); r.Error != nil {
		c.t.Fatalf("execute %q: %s", command, r.raw)
	}
	m, before := c.until("process.completed")
	for _, b := range before {
		if b.Method == "process.output" {
			out = append(out, b.Params)
		}
	}
	return out, m.Params
}

// assertWorks checks that the session still runs a command.
func (c *client) assertWorks() {
	c.t.Helper()
	out, done := c.run("echo ok", nil)
	if len(out) != 1 || out[0].Data != "ok\n" || done.Status != "completed" || *done.ExitCode != 0 {
		c.t.Fatalf("echo ok: output %+v, completed %+v", out, done)
	}
}

// close sends a close frame and waits until the server has closed the connection, which it
// does only after the session's slot is free.
func (c *client) close() {
	c.t.Helper()
	c.writeFrame(0x8, []byte{0x03, 0xe8})
	for {
		if _, _, err := c.readFrame(); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.t.Fatal("server did not close the connection")
			}
			return
		}
	}
}

// readUntil reads frames until one satisfies ok, or the connection ends, which it records in
// c.closeErr.
func (c *client) readUntil(ok func(m msg) bool) {
	for {
		m, err := c.read()
		if err != nil {
			c.closeErr = err
			return
		}
		if ok(m) {
			return
		}
	}
}

// assertRefused checks the rest of a refusal: the error exactly as the protocol gives it, then
// a close frame with status 1008, then nothing.
func assertRefused(t *testing.T, c *client, m msg) {
	t.Helper()
	if want := `{"jsonrpc":"2.0","error":{"code":-32001,"message":"Session limit exceeded","data":null}}`; m.raw != want {
		t.Errorf("refusal = %s, want %s", m.raw, want)
	}
	if _, err := c.read(); err != io.EOF || c.closed.code != 1008 || c.closed.reason != "Session limit exceeded" {
		t.Errorf("after the refusal: err %v, close code %d %q; want a close frame 1008", err, c.closed.code, c.closed.reason)
	}
	if _, _, err := c.readFrame(); err != io.EOF {
		t.Errorf("after the close frame: %v, want the connection closed", err)
	}
}
