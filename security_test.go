package ccexecutor

import (
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// The tests of this file cross each of the server's limits from the outside, as a hostile or
// broken client would, and check that the server refuses, answers or disconnects as the
// protocol says, and that nothing is left behind: no process, no session, no pile of memory.

// TestHostileInput guards against the Python service's fragile framing: non-object JSON,
// binary frames and odd ids crashed its session silently. Every frame must get exactly one
// response, in valid UTF-8 JSON with the protocol's error, and the same session must run a
// command afterwards.
func TestHostileInput(t *testing.T) {
	const maxMessage = 256 << 10
	ts := newTestServer(t, Config{MaxMessageBytes: maxMessage})
	huge := "1" + strings.Repeat("0", 99_999)
	obj := func(body string) []byte { return []byte(`{"jsonrpc":"2.0",` + body + `}`) }
	exec := func(params string) []byte {
		return obj(`"method":"execute","params":` + params + `,"id":"x"`)
	}
	type row struct {
		name   string
		frame  []byte
		binary bool
		code   int    // the error code of the response
		id     string // the id it must carry, as sent; "" for none
		// badUTF8 rows break the UTF-8 a text frame must hold; the server may answer them with
		// -32700 and no id, or read them with U+FFFD for each bad byte and answer code.
		badUTF8 bool
	}
	rows := []row{
		{name: "invalid JSON", frame: []byte(`{"jsonrpc":"2.0","method":`), code: -32700},
		{name: "garbage", frame: []byte("\x00\x01\x02 not json"), code: -32700},
		{name: "empty frame", frame: []byte{}, code: -32700},
		{name: "two objects", frame: []byte(`{"method":"control"}{"method":"control"}`), code: -32700},
		{name: "array", frame: []byte(`[{"jsonrpc":"2.0","method":"control","id":1}]`), code: -32600},
		{name: "empty array", frame: []byte(`[]`), code: -32600},
		{name: "bare string", frame: []byte(`"execute"`), code: -32600},
		{name: "number", frame: []byte(`42`), code: -32600},
		{name: "null", frame: []byte(`null`), code: -32600},
		{name: "true", frame: []byte(`true`), code: -32600},
		{name: "no method", frame: obj(`"id":5`), code: -32600, id: "5"},
		{name: "method a number", frame: obj(`"method":1,"id":5`), code: -32600, id: "5"},
		{name: "method null", frame: obj(`"method":null,"id":5`), code: -32600, id: "5"},
		{name: "method an object", frame: obj(`"method":{"a":1},"id":5`), code: -32600, id: "5"},
		{name: "id an object", frame: obj(`"method":"control","id":{"a":1}`), code: -32600},
		{name: "id an array", frame: obj(`"method":"control","id":[1]`), code: -32600},
		{name: "id true", frame: obj(`"method":"control","id":true`), code: -32600},
		{name: "huge id", frame: obj(`"method":"nope","id":` + huge), code: -32601, id: huge},
		{name: "huge negative id", frame: obj(`"method":"nope","id":-` + huge), code: -32601, id: "-" + huge},
		{name: "float id", frame: obj(`"method":"nope","id":1.50`), code: -32601, id: "1.50"},
		{name: "exponent id", frame: obj(`"method":"nope","id":-2.5E+300`), code: -32601, id: "-2.5E+300"},
		{name: "id beyond float64", frame: obj(`"method":"nope","id":1e999`), code: -32601, id: "1e999"},
		{name: "string id with escapes", frame: obj(`"method":"nope","id":"<\u2028\"&\ud800>"`), code: -32601, id: `"<\u2028\"&\ud800>"`},
		{name: "string id of 100,000 bytes", frame: obj(`"method":"nope","id":"` + strings.Repeat("é", 50_000) + `"`), code: -32601, id: `"` + strings.Repeat("é", 50_000) + `"`},
		{name: "unknown method", frame: obj(`"method":"shutdown","id":7`), code: -32601, id: "7"},
		{name: "method in the wrong case", frame: obj(`"method":"EXECUTE","id":7`), code: -32601, id: "7"},
		{name: "params an array", frame: obj(`"method":"execute","params":["echo x"],"id":7`), code: -32602, id: "7"},
		{name: "params a string", frame: obj(`"method":"execute","params":"echo x","id":7`), code: -32602, id: "7"},
		{name: "params a number", frame: obj(`"method":"control","params":1,"id":7`), code: -32602, id: "7"},
		{name: "binary frame", frame: obj(`"method":"execute","params":{"command":"echo x"},"id":7`), binary: true, code: -32600},
		{name: "nested 10,000 deep", frame: []byte(strings.Repeat("[", 10_000) + strings.Repeat("]", 10_000)), code: -32600},
		{name: "nested 30,000 deep", frame: []byte(strings.Repeat("[", 30_000) + strings.Repeat("]", 30_000)), code: -32700},
		{name: "nested deep in params", frame: exec(`{"command":` + strings.Repeat("[", 9_000) + strings.Repeat("]", 9_000) + `}`), code: -32602, id: `"x"`},
		{name: "nested objects", frame: obj(`"method":"control","params":` + strings.Repeat(`{"a":`, 9_000) + "1" + strings.Repeat("}", 9_000) + `,"id":"x"`), code: -32602, id: `"x"`},
		// A text frame must hold UTF-8, and so must every frame the server sends (RFC 6455,
		// section 5.6); the server may answer with a parse error, or decode with U+FFFD.
		{name: "invalid UTF-8 outside strings", frame: []byte("\xff\xfe"), code: -32700, badUTF8: true},
		{name: "invalid UTF-8 in the method", frame: []byte("{\"jsonrpc\":\"2.0\",\"method\":\"nop\xffe\"}"), code: -32601, badUTF8: true},
		{name: "invalid UTF-8 in the command", frame: []byte("{\"jsonrpc\":\"2.0\",\"method\":\"execute\",\"params\":{\"command\":\"\xff\",\"cwd\":\"/nonexistent\xfe\"}}"), code: -32602, badUTF8: true},
		{name: "invalid UTF-8 in the id", frame: []byte("{\"jsonrpc\":\"2.0\",\"method\":\"nope\",\"id\":\"\xff\xfe\"}"), code: -32601, badUTF8: true},
		{name: "empty command", frame: exec(`{"command":""}`), code: -32602, id: `"x"`},
		{name: "no command", frame: exec(`{}`), code: -32602, id: `"x"`},
		{name: "params null", frame: exec(`null`), code: -32602, id: `"x"`},
		{name: "command a number", frame: exec(`{"command":5}`), code: -32602, id: `"x"`},
		{name: "command with NUL", frame: exec(`{"command":"echo \u0000 x"}`), code: -32602, id: `"x"`},
		{name: "timeout 0", frame: exec(`{"command":"echo x","timeout":0}`), code: -32602, id: `"x"`},
		{name: "timeout negative", frame: exec(`{"command":"echo x","timeout":-1}`), code: -32602, id: `"x"`},
		{name: "timeout a string", frame: exec(`{"command":"echo x","timeout":"5"}`), code: -32602, id: `"x"`},
		{name: "timeout huge", frame: exec(`{"command":"echo x","timeout":1e300}`), code: -32602, id: `"x"`},
		{name: "cwd a file", frame: exec(`{"command":"echo x","cwd":"/etc/passwd"}`), code: -32602, id: `"x"`},
		{name: "cwd missing", frame: exec(`{"command":"echo x","cwd":"/nonexistent"}`), code: -32602, id: `"x"`},
		{name: "cwd a number", frame: exec(`{"command":"echo x","cwd":1}`), code: -32602, id: `"x"`},
		{name: "env value a number", frame: exec(`{"command":"echo x","env":{"A":1}}`), code: -32602, id: `"x"`},
		{name: "env value null", frame: exec(`{"command":"echo x","env":{"A":null}}`), code: -32602, id: `"x"`},
		{name: "env an array", frame: exec(`{"command":"echo x","env":["A=1"]}`), code: -32602, id: `"x"`},
		{name: "env name with =", frame: exec(`{"command":"echo x","env":{"A=B":"1"}}`), code: -32602, id: `"x"`},
		{name: "env name empty", frame: exec(`{"command":"echo x","env":{"":"1"}}`), code: -32602, id: `"x"`},
		{name: "env value with NUL", frame: exec(`{"command":"echo x","env":{"A":"1\u0000"}}`), code: -32602, id: `"x"`},
		{name: "control type lower case", frame: obj(`"method":"control","params":{"type":"cancel"},"id":"x"`), code: -32602, id: `"x"`},
		{name: "control with no run", frame: obj(`"method":"control","params":{"type":"CANCEL"},"id":"x"`), code: -32003, id: `"x"`},
	}
	c := dial(t, ts.addr)
	c.connected()
	check := func(t *testing.T, m msg, code int, id string) {
		t.Helper()
		if !utf8.ValidString(m.raw) {
			t.Errorf("the response is not valid UTF-8, which a text frame must be: %q", trim(m.raw))
		}
		if m.Method != "" || m.Error == nil || m.Error.Code != code || string(m.Error.Data) != "null" {
			t.Errorf("response %q, want error %d with data null", trim(m.raw), code)
		}
		if string(m.ID) != id {
			t.Errorf("response id %q, want %q", trim(string(m.ID)), trim(id))
		}
		if id == "" && strings.Contains(m.raw, `"id"`) {
			t.Errorf("response %q has an id key", trim(m.raw))
		}
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			c.t = t
			op := byte(0x1)
			if row.binary {
				op = 0x2
			}
			c.writeFrame(op, row.frame)
			m := c.next()
			if row.badUTF8 && m.Error != nil && m.Error.Code == -32700 {
				check(t, m, -32700, "")
			} else if row.badUTF8 {
				check(t, m, row.code, string(m.ID)) // any id, if it is valid UTF-8
			} else {
				check(t, m, row.code, row.id)
			}
			c.assertWorks()
		})
	}

	t.Run("frame over the message limit", func(t *testing.T) {
		c.t = t
		c.writeFrame(0x1, obj(`"method":"execute","params":{"command":"echo `+strings.Repeat("x", maxMessage)+`"},"id":"big"`))
		c.send([]byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":"next"}`))
		m := c.next()
		check(t, m, -32600, "")
		if m.Error != nil && !strings.Contains(m.Error.Message, "exceeds") {
			t.Errorf("message %q", m.Error.Message)
		}
		check(t, c.next(), -32003, `"next"`) // the frame after it is read as usual
		c.assertWorks()
	})

	t.Run("frame at the message limit", func(t *testing.T) {
		c.t = t
		frame := exec(`{"command":"echo y","cwd":"/nonexistent` + "/" + `"}`)
		frame = append(frame[:len(frame)-1], []byte(`,"pad":"`+strings.Repeat("p", maxMessage-len(frame)-9)+`"}`)...)
		if len(frame) != maxMessage {
			t.Fatalf("frame of %d bytes", len(frame))
		}
		c.writeFrame(0x1, frame)
		check(t, c.next(), -32602, `"x"`)
	})

	t.Run("fragmented message", func(t *testing.T) {
		// A message in two fragments is one message (RFC 6455, section 5.4), answered once.
		c.t = t
		req := []byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":"frag"}`)
		c.writeRawFrame(0x1, false, req[:20])
		c.writeRawFrame(0x0, true, req[20:])
		c.send([]byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":"after"}`))
		check(t, c.next(), -32003, `"frag"`)
		check(t, c.next(), -32003, `"after"`)
		c.assertWorks()
	})

	t.Run("10,000 requests at once, another session streaming", func(t *testing.T) {
		c.t = t
		lines := 50_000
		if testing.Short() {
			lines = 10_000
		}
		// Another session streams meanwhile and must get every line, in order.
		b := dial(t, ts.addr)
		b.connected()
		_, first := b.start(fmt.Sprintf("seq 1 %d", lines), nil)
		if first != "1\n" {
			t.Fatalf("first line %q", first)
		}
		streamed := make(chan error, 1)
		go func() { streamed <- readSeq(b, 2, lines) }() // returns at process.completed or a read error

		const n = 10_000
		var flood []byte
		for i := range n {
			flood = append(flood, maskedFrame(0x1, fmt.Appendf(nil, `{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":%d}`, i))...)
		}
		wrote := make(chan error, 1)
		go func() { // returns once the flood is written, or the write fails
			c.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			_, err := c.c.Write(flood)
			wrote <- err
		}()
		for i := range n {
			m, err := c.read()
			if err != nil {
				t.Fatalf("response %d: %v", i, err)
			}
			if m.Method != "" || string(m.ID) != strconv.Itoa(i) || m.Error == nil || m.Error.Code != -32003 {
				t.Fatalf("response %d: %q, want the -32003 answer to request %d", i, trim(m.raw), i)
			}
		}
		if err := <-wrote; err != nil {
			t.Fatalf("writing the flood: %v", err)
		}
		if err := <-streamed; err != nil {
			t.Errorf("the streaming session: %v", err)
		}
		c.assertWorks()
		b.close()
	})

	t.Run("unmasked frame", func(t *testing.T) {
		// A client frame without a mask breaks RFC 6455; the server closes with 1002 and
		// frees the slot, after ending the run.
		logs := newLogWatch()
		ts := newTestServer(t, Config{Logger: slog.New(logs), KillGrace: 200 * time.Millisecond})
		u := dial(t, ts.addr)
		u.connected()
		pgid, _ := u.start("echo ready; sleep 300", nil)
		p := []byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":1}`)
		u.c.Write(append([]byte{0x81, byte(len(p))}, p...))
		for {
			if _, err := u.read(); err != nil {
				if err != io.EOF || u.closed.code != 1002 {
					t.Errorf("after an unmasked frame: %v, close code %d; want close 1002", err, u.closed.code)
				}
				break
			}
		}
		u.c.Close() // as a client does once the server has closed its end: the server lingers until then
		logs.wait(t, "session closed", 1, 10*time.Second)
		assertGroupGone(t, pgid)
	})
	c.t = t
	c.close()
}

// readSeq reads the rest of a `seq` run on c, lines from to to, then its process.completed,
// and reports the first discrepancy. It uses only c.read, so that it may run on its own
// goroutine.
func readSeq(c *client, from, to int) error {
	next := from
	handle := func(m msg) (bool, error) {
		switch m.Method {
		case "process.output":
			if m.Params.Data != strconv.Itoa(next)+"\n" {
				return true, fmt.Errorf("line %q, want %d", m.Params.Data, next)
			}
			next++
		case "process.completed":
			if next != to+1 || m.Params.ExitCode == nil || *m.Params.ExitCode != 0 {
				return true, fmt.Errorf("completed after line %d: %s", next-1, m.raw)
			}
			return true, nil
		}
		return false, nil
	}
	for _, m := range c.backlog {
		if done, err := handle(m); done {
			return err
		}
	}
	c.backlog = nil
	for {
		m, err := c.read()
		if err != nil {
			return fmt.Errorf("after line %d: %v", next-1, err)
		}
		if done, err := handle(m); done {
			return err
		}
	}
}

// trim shortens s for a message.
func trim(s string) string {
	if len(s) > 200 {
		return s[:200] + fmt.Sprintf("...(%d bytes)", len(s))
	}
	return s
}

// writeRawFrame sends one masked frame with the FIN bit as given, so that a message can be
// sent in fragments.
func (c *client) writeRawFrame(op byte, fin bool, payload []byte) {
	c.t.Helper()
	head := op
	if fin {
		head |= 0x80
	}
	c.c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.c.Write(appendMasked(nil, head, payload)); err != nil {
		c.t.Fatalf("write frame: %v", err)
	}
}
