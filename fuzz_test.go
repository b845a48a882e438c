package ccexecutor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
	"unicode/utf8"
)

// fuzzProgram is the only program the fuzzed server may run. It does not exist, so that no
// input, whatever it asks for, can start a process: execute is refused by the allowlist, or
// fails to start with -32603.
const fuzzProgram = "ccexecutor-fuzz-no-such-program"

// fuzzMaxMessage is the fuzzed server's message limit, small so that inputs cross it.
const fuzzMaxMessage = 4096

// FuzzRequest sends one message to a real session, in one frame or in fragments of fragment
// bytes, and checks that the server does not panic, answers it with exactly one response that is a JSON-RPC error (no input can start a run),
// echoes a string or number id as sent, and still answers a control request afterwards. The
// seeds are in testdata/fuzz/FuzzRequest.
func FuzzRequest(f *testing.F) {
	for _, s := range []string{
		`{"jsonrpc":"2.0","method":"execute","params":{"command":"` + fuzzProgram + ` 'a b' \"c\"","timeout":1.5,"cwd":"/","env":{"A":"1"}},"id":1}`,
		`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":"x"}`,
		`[{"method":"control"}]`,
	} {
		f.Add([]byte(s), false, uint16(0))
	}
	f.Add([]byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"CANCEL"},"id":1}`), true, uint16(0))
	f.Add([]byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"CANCEL"},"id":"frag"}`), false, uint16(7))

	srv := NewServer(Config{
		AllowedCommands: []string{fuzzProgram},
		MaxMessageBytes: fuzzMaxMessage,
		Logger:          slog.New(slog.DiscardHandler),
	})
	hs := httptest.NewServer(srv)
	nc, br, resp, err := rawHandshake(hs.Listener.Addr().String(), "/ws/mcp", "", nil)
	if err != nil {
		hs.Close()
		f.Fatal(err)
	}
	f.Cleanup(func() {
		nc.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			f.Errorf("Shutdown: %v", err)
		}
		hs.Close()
	})
	if resp.StatusCode != http.StatusSwitchingProtocols {
		f.Fatalf("handshake: %s", resp.Status)
	}
	if _, p, err := (&client{c: nc, br: br}).readFrame(); err != nil || !bytes.Contains(p, []byte(`"connected"`)) {
		f.Fatalf("first frame %q, %v", p, err)
	}

	marker := int64(-7_000_000_000)
	f.Fuzz(func(t *testing.T, frame []byte, binary bool, fragment uint16) {
		c := &client{t: t, c: nc, br: br}
		op := byte(0x1)
		if binary {
			op = 0x2
		}
		if fragment == 0 {
			c.writeFrame(op, frame)
		} else {
			var b []byte
			for rest := frame; ; op = 0x0 {
				n := min(int(fragment), len(rest))
				head := op
				if n == len(rest) {
					head |= 0x80
				}
				b = appendMasked(b, head, rest[:n])
				if rest = rest[n:]; len(rest) == 0 {
					break
				}
			}
			c.rawWrite(b)
		}
		// An id the frame cannot know, so that its answer cannot be taken for the frame's.
		marker--
		c.send(fmt.Appendf(nil, `{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":%d}`, marker))

		m, err := c.read()
		if err != nil {
			t.Fatalf("reading the answer to %q: %v", frame, err)
		}
		checkFuzzResponse(t, frame, binary, m)

		after, err := c.read()
		if err != nil {
			t.Fatalf("reading the answer to the control request after %q: %v", frame, err)
		}
		if after.Method != "" || string(after.ID) != fmt.Sprint(marker) || after.Error == nil || after.Error.Code != codeNoProcess {
			t.Fatalf("after %q: %q, want the -32003 answer to the control request (one answer per frame, and no run)", frame, trim(after.raw))
		}
	})
}

// checkFuzzResponse checks the answer m to a fuzzed frame.
func checkFuzzResponse(t *testing.T, frame []byte, binary bool, m msg) {
	t.Helper()
	var envelope struct {
		JSONRPC string `json:"jsonrpc"`
	}
	json.Unmarshal([]byte(m.raw), &envelope)
	if m.Method != "" || envelope.JSONRPC != "2.0" || m.Error == nil || string(m.Error.Data) != "null" || m.Result != nil {
		t.Fatalf("answer to %q: %q, want a JSON-RPC error (nothing can run)", frame, trim(m.raw))
	}
	switch m.Error.Code {
	case codeParse, codeInvalidRequest, codeUnknownMethod, codeInvalidParams, codeInternal, codeNotAllowed, codeNoProcess:
	default:
		t.Fatalf("answer to %q: code %d", frame, m.Error.Code)
	}
	if binary || len(frame) > fuzzMaxMessage {
		if m.Error.Code != codeInvalidRequest || len(m.ID) != 0 {
			t.Fatalf("answer to %q (binary %v, %d bytes): %q, want -32600 without id", frame, binary, len(frame), trim(m.raw))
		}
		return
	}
	// A frame that is not UTF-8 is not a text frame; what the server answers it with is
	// checked by TestHostileInput, which finds that an id is then echoed as invalid UTF-8.
	if !utf8.Valid(frame) {
		return
	}
	if !utf8.ValidString(m.raw) {
		t.Fatalf("answer to %q is not valid UTF-8: %q", frame, m.raw)
	}
	var fields map[string]json.RawMessage
	wantID := ""
	if json.Unmarshal(frame, &fields) == nil {
		if raw := fields["id"]; len(raw) > 0 && (raw[0] == '"' || raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9') {
			wantID = string(raw)
		}
	}
	if string(m.ID) != wantID {
		t.Fatalf("answer to %q has id %q, want %q", frame, trim(string(m.ID)), trim(wantID))
	}
}

// FuzzReadLines feeds random input, in random read sizes, to readLines with a random limit,
// and checks its contract: no line is longer than the limit plus the marker; a line that was
// not cut comes out byte for byte; a line was cut, with dropped > 0 saying by how much and the
// marker appended, exactly when it was longer than the limit; and together the lines account
// for every byte of the input. The seeds are in testdata/fuzz/FuzzReadLines.
func FuzzReadLines(f *testing.F) {
	f.Add([]byte("one\ntwo\r\nthree"), uint16(16), uint8(0))
	f.Add([]byte("0123456789abcdefXYZ\nnext\n"), uint16(15), uint8(3))
	f.Add([]byte("aaaaaaaaaaaaaaaaaaaaaaa\r\nb"), uint16(15), uint8(6))
	f.Add([]byte("aaaaaaaaaaaaaaé\xf0\x9f\x98\x80\n\xff\xfe...\n"), uint16(14), uint8(255))

	f.Fuzz(func(t *testing.T, data []byte, limit uint16, chunk uint8) {
		lim := int(limit%1024) + 1
		type line struct {
			b       []byte
			dropped int
		}
		var lines []line
		err := readLines(&chunkReader{data, int(chunk) + 1}, lim, func(l []byte, dropped int, more bool) error {
			lines = append(lines, line{bytes.Clone(l), dropped})
			return nil
		})
		if err != nil {
			t.Fatalf("readLines: %v", err)
		}
		rest := data // the input not yet accounted for by a line
		for i, l := range lines {
			last := i == len(lines)-1
			if len(l.b) > lim+len(truncMarker) {
				t.Fatalf("line %d is %d bytes, limit %d: %q", i, len(l.b), lim, l.b)
			}
			if l.dropped < 0 {
				t.Fatalf("line %d: dropped %d", i, l.dropped)
			}
			if l.dropped == 0 {
				// Not cut: the line as it was, ending included.
				if !bytes.HasPrefix(rest, l.b) {
					t.Fatalf("line %d %q is not the input's next bytes %q", i, l.b, rest[:min(len(rest), len(l.b)+8)])
				}
				content := len(l.b)
				switch {
				case bytes.HasSuffix(l.b, []byte("\r\n")):
					content -= 2
				case bytes.HasSuffix(l.b, []byte("\n")):
					content--
				case !last || len(l.b) == 0:
					t.Fatalf("line %d %q has no ending but is not the last", i, l.b)
				}
				if content > lim {
					t.Fatalf("line %d of %d bytes, limit %d, was not cut", i, content, lim)
				}
				rest = rest[len(l.b):]
				continue
			}
			// Cut: a prefix of the line, the marker, and dropped bytes of the line discarded.
			kept, ok := bytes.CutSuffix(l.b, []byte(truncMarker))
			if !ok {
				t.Fatalf("line %d %q has dropped %d but no marker", i, l.b, l.dropped)
			}
			if len(kept) > lim || len(kept) < lim-(utf8.UTFMax-1) {
				t.Fatalf("line %d keeps %d bytes, limit %d", i, len(kept), lim)
			}
			if !bytes.HasPrefix(rest, kept) || len(rest) < len(kept)+l.dropped {
				t.Fatalf("line %d %q (dropped %d) is not a cut of the input %q", i, l.b, l.dropped, rest[:min(len(rest), len(l.b)+8)])
			}
			content := rest[:len(kept)+l.dropped]
			if len(content) <= lim {
				t.Fatalf("line %d of %d bytes, limit %d, was cut", i, len(content), lim)
			}
			if bytes.IndexByte(content, '\n') >= 0 {
				t.Fatalf("line %d: dropped %d runs past the end of the line %q", i, l.dropped, content)
			}
			if utf8.Valid(content) && !utf8.Valid(kept) {
				t.Fatalf("line %d was cut inside a character: %q", i, kept)
			}
			rest = rest[len(content):]
			switch {
			case bytes.HasPrefix(rest, []byte("\r\n")):
				rest = rest[2:]
			case bytes.HasPrefix(rest, []byte("\n")):
				rest = rest[1:]
			case len(rest) == 0 && last:
			default:
				t.Fatalf("line %d: dropped %d does not end at the end of the line; next %q", i, l.dropped, rest[:min(len(rest), 8)])
			}
		}
		if len(rest) != 0 {
			t.Fatalf("%d bytes of input in no line: %q", len(rest), rest[:min(len(rest), 32)])
		}
	})
}

// chunkReader returns data at most n bytes per Read, so that lines and line endings cross the
// reads at every place.
type chunkReader struct {
	data []byte
	n    int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.n)], r.data)
	r.data = r.data[n:]
	return n, nil
}
