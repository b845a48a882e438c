package ccexecutor

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// rawWrite sends bytes as they are.
func (c *client) rawWrite(b []byte) {
	c.t.Helper()
	c.c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// untilClosed reads frames until the server's close frame, and returns the text frames before
// it and the close frame's payload. It fails the test unless the server then closes the
// connection: a clean close, which a browser reports as the code in the frame, not 1006.
func (c *client) untilClosed() (before []string, payload []byte) {
	c.t.Helper()
	for {
		op, p, err := c.readFrame()
		if err != nil {
			c.t.Fatalf("no close frame from the server: %v (frames before: %q)", err, before)
		}
		if op == opClose {
			payload = p
			break
		}
		if op == opText {
			before = append(before, string(p))
		}
	}
	if _, _, err := c.readFrame(); err != io.EOF {
		c.t.Fatalf("after the close frame: %v; want the server to close the connection", err)
	}
	return before, payload
}

// closeCode is the status of a close frame's payload, or 0 without one.
func closeCode(p []byte) int {
	if len(p) < 2 {
		return 0
	}
	return int(binary.BigEndian.Uint16(p))
}

// TestRFC6455 guards against reading the wire the way golang.org/x/net/websocket does: it
// answered every fragment of a message as a frame of its own (so a 5 KB execute from a client
// that fragments at 4 KiB never ran), accepted frames with reserved opcodes or RSV bits, and
// dropped the connection on a client's close frame without answering it, which browsers
// report as 1006. Each row goes through a real server; frameReader's rules are checked one by
// one in TestFrameReader.
func TestRFC6455(t *testing.T) {
	const limit = 16 << 10
	ts := newTestServer(t, Config{MaxMessageBytes: limit})
	execute := func(command, id string) []byte {
		return fmt.Appendf(nil, `{"jsonrpc":"2.0","method":"execute","params":{"command":%q},"id":%q}`, command, id)
	}
	// fragments cuts msg into frames of at most n bytes, the first of opcode op.
	fragments := func(op byte, msg []byte, n int) [][]byte {
		var frames [][]byte
		for len(msg) > 0 || len(frames) == 0 {
			k := min(n, len(msg))
			head := op
			if k == len(msg) {
				head |= 0x80
			}
			frames = append(frames, appendMasked(nil, head, msg[:k]))
			msg, op = msg[k:], opContinuation
		}
		return frames
	}

	t.Run("5 KB execute in fragments of 4 KiB runs", func(t *testing.T) {
		c := dial(t, ts.addr)
		c.connected()
		req := execute("echo ok #"+strings.Repeat("x", 5000), "frag")
		for _, f := range fragments(opText, req, 4096) {
			c.rawWrite(f)
		}
		m := c.next()
		if string(m.ID) != `"frag"` || m.Error != nil {
			t.Fatalf("answer %s; want the result of the execute", trim(m.raw))
		}
		done, before := c.until("process.completed")
		if len(before) != 2 || before[1].Params.Data != "ok\n" || done.Params.Status != "completed" {
			t.Errorf("notifications %v, then %s; want process.started, the line ok, completed", before, done.raw)
		}
		c.close()
	})

	t.Run("fragments of 1 byte, a Ping and a Pong among them", func(t *testing.T) {
		c := dial(t, ts.addr)
		c.connected()
		frames := fragments(opText, execute("echo ok", "tiny"), 1)
		frames = slices.Insert(frames, 10, wire(finPing, "between"))
		frames = slices.Insert(frames, 20, wire(finPong, "unasked"))
		c.rawWrite(bytes.Join(frames, nil))
		op, p, err := c.readFrame()
		if err != nil || op != opPong || string(p) != "between" {
			t.Fatalf("first frame %#x %q, %v; want the Pong to the Ping", op, p, err)
		}
		if m := c.next(); string(m.ID) != `"tiny"` || m.Error != nil {
			t.Fatalf("answer %s; want the result of the execute", trim(m.raw))
		}
		c.until("process.completed")
		c.close()
	})

	t.Run("fragmented message over the limit", func(t *testing.T) {
		c := dial(t, ts.addr)
		c.connected()
		req := execute("echo no #"+strings.Repeat("x", limit), "big")
		frames := fragments(opText, req, 4096)
		frames = slices.Insert(frames, 2, wire(finPing, "inside"))
		c.rawWrite(bytes.Join(frames, nil))
		c.send([]byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":"next"}`))
		op, p, err := c.readFrame()
		if err != nil || op != opPong || string(p) != "inside" {
			t.Fatalf("first frame %#x %q, %v; want the Pong to the Ping inside the message", op, p, err)
		}
		if m := c.next(); m.Error == nil || m.Error.Code != codeInvalidRequest || !strings.Contains(m.Error.Message, "exceeds") || len(m.ID) != 0 {
			t.Errorf("answer %s; want -32600, message exceeds the limit", trim(m.raw))
		}
		if m := c.next(); string(m.ID) != `"next"` || m.Error == nil || m.Error.Code != codeNoProcess {
			t.Errorf("answer %s; want the -32003 answer to the next request, and no run", trim(m.raw))
		}
		c.assertWorks()
		c.close()
	})

	t.Run("fragmented message at the limit", func(t *testing.T) {
		c := dial(t, ts.addr)
		c.connected()
		req := []byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":"at","pad":""}`)
		req = append(req[:len(req)-2], strings.Repeat("p", limit-len(req))+`"}`...)
		if len(req) != limit {
			t.Fatalf("message of %d bytes", len(req))
		}
		c.rawWrite(bytes.Join(fragments(opText, req, 5000), nil))
		if m := c.next(); string(m.ID) != `"at"` || m.Error == nil || m.Error.Code != codeNoProcess {
			t.Errorf("answer %s; want the -32003 answer to the PAUSE", trim(m.raw))
		}
		c.close()
	})

	// Protocol errors: the server fails the connection with 1002 (1007 for a close reason
	// that is not UTF-8), and runs nothing, even when the frame holds an execute.
	dir := t.TempDir()
	for i, row := range []struct {
		name   string
		frames func(req []byte) []byte
		code   int
	}{
		{"reserved opcode 0x3", func(r []byte) []byte { return appendMasked(nil, 0x83, r) }, 1002},
		{"reserved opcode 0x7", func(r []byte) []byte { return appendMasked(nil, 0x87, r) }, 1002},
		{"reserved opcode 0xb", func(r []byte) []byte { return appendMasked(nil, 0x8b, r[:100]) }, 1002},
		{"reserved opcode 0xf", func(r []byte) []byte { return appendMasked(nil, 0x8f, r[:100]) }, 1002},
		{"RSV1 without an extension", func(r []byte) []byte { return appendMasked(nil, finText|0x40, r) }, 1002},
		{"RSV2 without an extension", func(r []byte) []byte { return appendMasked(nil, finText|0x20, r) }, 1002},
		{"RSV3 without an extension", func(r []byte) []byte { return appendMasked(nil, finText|0x10, r) }, 1002},
		{"continuation without a start", func(r []byte) []byte { return appendMasked(nil, finCont, r) }, 1002},
		{"new text frame inside a fragmented message", func(r []byte) []byte {
			return append(appendMasked(nil, opText, []byte(`{"jsonrpc":`)), appendMasked(nil, finText, r)...)
		}, 1002},
		{"Ping of 126 bytes", func(r []byte) []byte { return appendMasked(nil, finPing, bytes.Repeat([]byte("p"), 126)) }, 1002},
		{"fragmented Ping", func(r []byte) []byte {
			return append(appendMasked(nil, opPing, []byte("a")), appendMasked(nil, finCont, []byte("b"))...)
		}, 1002},
		{"64-bit length with the top bit set", func(r []byte) []byte {
			return append([]byte{finText, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, byte(len(r)), 1, 2, 3, 4}, r...)
		}, 1002},
		{"unmasked frame", func(r []byte) []byte { return append([]byte{finText, 126, 0, byte(len(r))}, r...) }, 1002},
		{"close with a 1-byte payload", func(r []byte) []byte { return appendMasked(nil, finClose, []byte{3}) }, 1002},
		{"close code 1005", func(r []byte) []byte { return closeWire(1005, "") }, 1002},
		{"close code 1006", func(r []byte) []byte { return closeWire(1006, "") }, 1002},
		{"close code 999", func(r []byte) []byte { return closeWire(999, "") }, 1002},
		{"close code 1016", func(r []byte) []byte { return closeWire(1016, "") }, 1002},
		{"close code 2999", func(r []byte) []byte { return closeWire(2999, "") }, 1002},
		{"close reason not UTF-8", func(r []byte) []byte { return closeWire(1000, "\xff") }, 1007},
	} {
		t.Run(row.name, func(t *testing.T) {
			marker := filepath.Join(dir, fmt.Sprint(i))
			req := execute("touch "+marker, "bad")
			if len(req) < 100 || len(req) > 255 {
				t.Fatalf("request of %d bytes; the rows want 100 to 255", len(req))
			}
			c := dial(t, ts.addr)
			c.connected()
			c.rawWrite(row.frames(req))
			before, p := c.untilClosed()
			if closeCode(p) != row.code || len(before) != 0 {
				t.Errorf("frames %q, then close %d %q; want nothing but close %d", before, closeCode(p), p[min(2, len(p)):], row.code)
			}
			if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the execute in the bad frame ran: %v", err)
			}
		})
	}

	t.Run("protocol error with 60 KB unread behind it", func(t *testing.T) {
		// Closing a socket with unread bytes sends a reset, which can destroy the close frame
		// before the client reads it: the server half-closes and reads on until the client
		// closes, and the client sees the close frame, then the end of the stream.
		for range 5 {
			c := dial(t, ts.addr)
			c.connected()
			c.rawWrite(append([]byte{finText, 126, 0xea, 0x60}, bytes.Repeat([]byte("x"), 60_000)...)) // unmasked
			if before, p := c.untilClosed(); closeCode(p) != 1002 || len(before) != 0 {
				t.Errorf("frames %q, then close %d; want nothing but close 1002", before, closeCode(p))
			}
			c.c.Close()
		}
	})

	t.Run("lingering after a protocol error ends after the write deadline", func(t *testing.T) {
		// A client that never closes its end holds the connection for WriteWait, no longer.
		logs := newLogWatch()
		ts := newTestServer(t, Config{WriteWait: 300 * time.Millisecond, Logger: slog.New(logs)})
		c := dial(t, ts.addr)
		c.connected()
		c.rawWrite(wire(0x83, "reserved"))
		if _, p := c.untilClosed(); closeCode(p) != 1002 {
			t.Errorf("close %d; want 1002", closeCode(p))
		}
		logs.wait(t, "session closed", 1, 20*time.Second) // c stays open meanwhile
	})

	// The close handshake: a client's close frame is answered with its status, then the
	// server closes the connection.
	for _, row := range []struct {
		name    string
		payload []byte
		want    int
	}{
		{"empty close is answered with 1000", nil, 1000},
		{"close 1000", closePayload(1000, ""), 1000},
		{"close 1001 with a reason", closePayload(1001, "tab closed"), 1001},
		{"close 4000", closePayload(4000, "app"), 4000},
		{"close 3000", closePayload(3000, ""), 3000},
	} {
		t.Run(row.name, func(t *testing.T) {
			c := dial(t, ts.addr)
			c.connected()
			c.rawWrite(appendMasked(nil, finClose, row.payload))
			before, p := c.untilClosed()
			if closeCode(p) != row.want || len(before) != 0 {
				t.Errorf("frames %q, then close %d; want close %d", before, closeCode(p), row.want)
			}
		})
	}

	t.Run("close during a run ends the run, then answers", func(t *testing.T) {
		c := dial(t, ts.addr)
		c.connected()
		pgid, _ := c.start("echo ready; sleep 300", nil)
		c.rawWrite(closeWire(1001, ""))
		before, p := c.untilClosed()
		if closeCode(p) != 1001 {
			t.Errorf("close %d; want 1001", closeCode(p))
		}
		if n := len(before); n == 0 || !strings.Contains(before[n-1], `"process.completed"`) || !strings.Contains(before[n-1], `"client disconnected"`) {
			t.Errorf("frames before the close %q; want process.completed with error client disconnected last", before)
		}
		assertGroupGone(t, pgid)
	})
}
