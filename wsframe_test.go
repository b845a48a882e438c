package ccexecutor

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"unicode/utf8"
)

// Frame heads for the rows below: FIN and the opcode.
const (
	finText   = 0x80 | opText
	finBinary = 0x80 | opBinary
	finCont   = 0x80 | opContinuation
	finClose  = 0x80 | opClose
	finPing   = 0x80 | opPing
	finPong   = 0x80 | opPong
)

// wire is a client frame, masked, with head as its first byte.
func wire(head byte, payload string) []byte { return appendMasked(nil, head, []byte(payload)) }

// closeWire is a client close frame with status code and reason.
func closeWire(code uint16, reason string) []byte {
	return appendMasked(nil, finClose, closePayload(code, reason))
}

// describe renders what frameReader.next returned, for comparison.
func describe(f clientFrame) string {
	name := map[byte]string{opText: "text", opBinary: "binary", opPing: "ping", opPong: "pong", opClose: "close"}[f.op]
	switch {
	case f.tooLarge:
		return name + " too large"
	case f.op == opClose:
		return fmt.Sprintf("close %d", f.code)
	case len(f.data) > 40:
		return fmt.Sprintf("%s of %d bytes", name, len(f.data))
	}
	return fmt.Sprintf("%s %q", name, f.data)
}

// describeErr renders the error that ended the reading: the close status of a protocol
// error, or the reader's error.
func describeErr(err error) string {
	var perr *protocolError
	if errors.As(err, &perr) {
		return fmt.Sprintf("fail %d", perr.code)
	}
	return err.Error()
}

// TestFrameReader checks frameReader on bytes as a client would send them, one RFC 6455 rule
// per row: what it returns, in order, and how the stream ends (io.EOF between frames, or the
// close status that fails the connection).
func TestFrameReader(t *testing.T) {
	const max = 100 // the rows' message limit
	cat := func(frames ...[]byte) []byte { return bytes.Join(frames, nil) }
	long := strings.Repeat("a", 70_000)
	type row struct {
		rfc  string // the section of RFC 6455 the row checks
		name string
		in   []byte
		max  int // default 100
		want []string
		end  string // describeErr of the error after the last frame; default "EOF"
	}
	rows := []row{
		{rfc: "5.2", name: "text frame", in: wire(finText, "hello"), want: []string{`text "hello"`}},
		{rfc: "5.2", name: "binary frame", in: wire(finBinary, "\x00\xff"), want: []string{`binary "\x00\xff"`}},
		{rfc: "5.2", name: "empty text frame", in: wire(finText, ""), want: []string{`text ""`}},
		{rfc: "5.2", name: "16-bit length", in: wire(finText, strings.Repeat("b", 300)), max: 1000, want: []string{"text of 300 bytes"}},
		{rfc: "5.2", name: "64-bit length", in: wire(finText, long), max: 100_000, want: []string{"text of 70000 bytes"}},
		{rfc: "5.2", name: "length not in its shortest form is read as sent",
			in: append([]byte{finText, 0x80 | 126, 0, 2, 1, 2, 3, 4}, 'h'^1, 'i'^2), want: []string{`text "hi"`}},
		{rfc: "5.3", name: "masking key of each frame applies from the frame's first byte",
			in: cat(wire(opText, "abc"), append([]byte{finCont, 0x80 | 3, 9, 8, 7, 6}, 'd'^9, 'e'^8, 'f'^7)), want: []string{`text "abcdef"`}},
		{rfc: "5.2", name: "frames in a row", in: cat(wire(finText, "1"), wire(finBinary, "2"), wire(finText, "3")),
			want: []string{`text "1"`, `binary "2"`, `text "3"`}},

		{rfc: "5.4", name: "fragmented text message", in: cat(wire(opText, "he"), wire(opContinuation, "ll"), wire(finCont, "o")),
			want: []string{`text "hello"`}},
		{rfc: "5.4", name: "fragmented binary message", in: cat(wire(opBinary, "\x01"), wire(finCont, "\x02")),
			want: []string{`binary "\x01\x02"`}},
		{rfc: "5.4", name: "empty fragments", in: cat(wire(opText, ""), wire(opContinuation, "x"), wire(finCont, "")),
			want: []string{`text "x"`}},
		{rfc: "5.4", name: "ping between fragments comes first", in: cat(wire(opText, "a"), wire(finPing, "p"), wire(finCont, "b")),
			want: []string{`ping "p"`, `text "ab"`}},
		{rfc: "5.4", name: "pong between fragments", in: cat(wire(opText, "a"), wire(finPong, ""), wire(finCont, "b")),
			want: []string{`pong ""`, `text "ab"`}},
		{rfc: "5.4", name: "close between fragments", in: cat(wire(opText, "a"), closeWire(1001, "")),
			want: []string{"close 1001"}},
		{rfc: "5.4", name: "continuation without a message", in: wire(finCont, `{"method":"execute"}`), end: "fail 1002"},
		{rfc: "5.4", name: "continuation after a finished message", in: cat(wire(finText, "a"), wire(finCont, "b")),
			want: []string{`text "a"`}, end: "fail 1002"},
		{rfc: "5.4", name: "text frame inside a fragmented message", in: cat(wire(opText, "a"), wire(finText, "b")), end: "fail 1002"},
		{rfc: "5.4", name: "binary frame inside a fragmented message", in: cat(wire(opText, "a"), wire(opBinary, "b")), end: "fail 1002"},

		{rfc: "5.2", name: "RSV1 without an extension", in: wire(finText|0x40, "x"), end: "fail 1002"},
		{rfc: "5.2", name: "RSV2 without an extension", in: wire(finText|0x20, "x"), end: "fail 1002"},
		{rfc: "5.2", name: "RSV3 without an extension", in: wire(finText|0x10, "x"), end: "fail 1002"},
		{rfc: "5.2", name: "RSV1 on a ping", in: wire(finPing|0x40, ""), end: "fail 1002"},
		{rfc: "5.2", name: "64-bit length with the top bit set",
			in: []byte{finText, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4}, end: "fail 1002"},
		{rfc: "5.1", name: "unmasked frame", in: append([]byte{finText, 2}, "hi"...), end: "fail 1002"},
		{rfc: "5.1", name: "unmasked ping", in: []byte{finPing, 0}, end: "fail 1002"},

		{rfc: "5.5", name: "control frame of 125 bytes", in: wire(finPing, strings.Repeat("p", 125)), want: []string{"ping of 125 bytes"}},
		{rfc: "5.5", name: "control frame of 126 bytes", in: wire(finPing, strings.Repeat("p", 126)), end: "fail 1002"},
		{rfc: "5.5", name: "close frame of 126 bytes", in: closeWire(1000, strings.Repeat("r", 124)), end: "fail 1002"},
		{rfc: "5.5", name: "fragmented ping", in: cat(wire(opPing, "a"), wire(finCont, "b")), end: "fail 1002"},
		{rfc: "5.5", name: "fragmented close", in: append([]byte{opClose, 0x80 | 2, 0, 0, 0, 0}, 0x03, 0xe8), end: "fail 1002"},
		{rfc: "5.5.2", name: "ping payload kept for the pong", in: wire(finPing, "\x00echo\xff"), want: []string{`ping "\x00echo\xff"`}},
		{rfc: "5.5.3", name: "unsolicited pong", in: cat(wire(finPong, "x"), wire(finText, "t")), want: []string{`pong "x"`, `text "t"`}},

		{rfc: "5.5.1", name: "close without a status is answered with 1000", in: wire(finClose, ""), want: []string{"close 1000"}},
		{rfc: "5.5.1", name: "close 1000", in: closeWire(1000, ""), want: []string{"close 1000"}},
		{rfc: "5.5.1", name: "close 1001 with a reason", in: closeWire(1001, "bye ü"), want: []string{"close 1001"}},
		{rfc: "5.5.1", name: "close with a 1-byte payload", in: wire(finClose, "\x03"), end: "fail 1002"},
		{rfc: "5.5.1", name: "close reason not UTF-8", in: closeWire(1000, "\xff"), end: "fail 1007"},
	}
	for _, code := range []uint16{1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999} {
		rows = append(rows, row{rfc: "7.4", name: fmt.Sprintf("close code %d", code), in: closeWire(code, ""), want: []string{fmt.Sprintf("close %d", code)}})
	}
	for _, code := range []uint16{0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535} {
		rows = append(rows, row{rfc: "7.4", name: fmt.Sprintf("close code %d", code), in: closeWire(code, ""), end: "fail 1002"})
	}
	for _, op := range []byte{0x3, 0x4, 0x5, 0x6, 0x7, 0xb, 0xc, 0xd, 0xe, 0xf} {
		rows = append(rows, row{rfc: "5.2", name: fmt.Sprintf("reserved opcode %#x", op), in: wire(0x80|op, `{"method":"execute"}`), end: "fail 1002"})
	}
	rows = append(rows, []row{
		{rfc: "5.4", name: "message at the limit", in: wire(finText, strings.Repeat("m", max)), want: []string{"text of 100 bytes"}},
		{rfc: "5.4", name: "message one byte over the limit is skipped", in: cat(wire(finText, strings.Repeat("m", max+1)), wire(finText, "next")),
			want: []string{"text too large", `text "next"`}},
		{rfc: "5.4", name: "fragmented message at the limit", in: cat(wire(opText, strings.Repeat("m", 60)), wire(finCont, strings.Repeat("m", 40))),
			want: []string{"text of 100 bytes"}},
		{rfc: "5.4", name: "fragmented message over the limit, every fragment under it",
			in:   cat(wire(opText, strings.Repeat("m", 60)), wire(opContinuation, strings.Repeat("m", 41)), wire(finCont, "more"), wire(finText, "next")),
			want: []string{"text too large", `text "next"`}},
		{rfc: "5.4", name: "control frames inside a message over the limit",
			in:   cat(wire(opBinary, strings.Repeat("m", 101)), wire(finPing, "p"), wire(finCont, "x"), closeWire(1000, "")),
			want: []string{`ping "p"`, "binary too large", "close 1000"}},
		{rfc: "5.4", name: "rules still apply inside a message over the limit",
			in: cat(wire(opText, strings.Repeat("m", 101)), wire(finText, "x")), end: "fail 1002"},

		{rfc: "5.2", name: "stream ends inside a header", in: []byte{finText}, end: "unexpected EOF"},
		{rfc: "5.2", name: "stream ends inside a payload", in: wire(finText, "hello")[:8], end: "unexpected EOF"},
		{rfc: "5.2", name: "stream ends inside a skipped payload", in: wire(finText, strings.Repeat("m", 200))[:50], end: "unexpected EOF"},
		{rfc: "5.2", name: "stream ends inside the masking key", in: wire(finText, "x")[:4], end: "unexpected EOF"},
	}...)
	for _, row := range rows {
		t.Run(row.rfc+"/"+row.name, func(t *testing.T) {
			if row.max == 0 {
				row.max = max
			}
			if row.end == "" {
				row.end = "EOF"
			}
			fr := frameReader{r: bufio.NewReader(bytes.NewReader(row.in)), max: row.max}
			var got []string
			var err error
			for {
				var f clientFrame
				if f, err = fr.next(); err != nil {
					break
				}
				got = append(got, describe(f))
				if len(got) > len(row.want)+1 {
					break
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(row.want) || err == nil || describeErr(err) != row.end {
				t.Errorf("RFC 6455 section %s: read %q, then %v; want %q, then %s", row.rfc, got, err, row.want, row.end)
			}
		})
	}
}

// FuzzFrameReader reads any bytes as frames and checks frameReader's contract: it does not
// panic; a message is never longer than the limit, and one too large has no data; a control
// frame has at most 125 bytes; a close frame's code is one a peer may send; the stream ends
// with the reader's error or a protocol error with status 1002 or 1007.
// The second property is reassembly: a text message cut into fragments at split reads back
// whole, whatever the split.
func FuzzFrameReader(f *testing.F) {
	f.Add(wire(finText, "hello"), uint16(3), uint16(100))
	f.Add(bytes.Join([][]byte{wire(opText, "a"), wire(finPing, "p"), wire(finCont, "b")}, nil), uint16(0), uint16(1))
	f.Add(closeWire(1005, ""), uint16(1), uint16(10))
	f.Add([]byte{finText, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4}, uint16(2), uint16(5))
	f.Fuzz(func(t *testing.T, in []byte, split, limit uint16) {
		max := int(limit)
		fr := frameReader{r: bufio.NewReader(bytes.NewReader(in)), max: max}
		for {
			fm, err := fr.next()
			var perr *protocolError
			if errors.As(err, &perr) {
				if perr.code != 1002 && perr.code != 1007 {
					t.Fatalf("protocol error with status %d", perr.code)
				}
				break
			}
			if err != nil {
				if err != io.EOF && err != io.ErrUnexpectedEOF {
					t.Fatalf("error %v", err)
				}
				break
			}
			switch fm.op {
			case opText, opBinary:
				if len(fm.data) > max || fm.tooLarge && fm.data != nil {
					t.Fatalf("message of %d bytes (too large %v), limit %d", len(fm.data), fm.tooLarge, max)
				}
			case opPing, opPong:
				if len(fm.data) > maxControlPayload {
					t.Fatalf("control frame of %d bytes", len(fm.data))
				}
			case opClose:
				if !validCloseCode(fm.code) || len(fm.data) > maxControlPayload || len(fm.data) > 2 && !utf8.Valid(fm.data[2:]) {
					t.Fatalf("close frame %q, code %d", fm.data, fm.code)
				}
			default:
				t.Fatalf("frame with opcode %#x", fm.op)
			}
		}

		// Reassembly: in itself as a text message, in fragments of split bytes.
		var stream []byte
		head := byte(opText)
		for rest := in; ; {
			n := min(int(split)+1, len(rest))
			frag := rest[:n]
			rest = rest[n:]
			if len(rest) == 0 {
				head |= 0x80
			}
			stream = appendMasked(stream, head, frag)
			head = opContinuation
			if len(rest) == 0 {
				break
			}
		}
		fr = frameReader{r: bufio.NewReader(bytes.NewReader(stream)), max: len(in)}
		fm, err := fr.next()
		if err != nil || fm.op != opText || fm.tooLarge || !bytes.Equal(fm.data, in) {
			t.Fatalf("%d bytes in fragments of %d: read %s, %v", len(in), int(split)+1, describe(fm), err)
		}
		if _, err := fr.next(); err != io.EOF {
			t.Fatalf("after the message: %v, want EOF", err)
		}
	})
}

// BenchmarkFrameReader reads a 1 MiB text message sent in fragments of 4 KiB, as
// gorilla/websocket's client sends it.
func BenchmarkFrameReader(b *testing.B) {
	msg := bytes.Repeat([]byte("x"), 1<<20)
	var stream []byte
	for i := 0; i < len(msg); i += 4096 {
		head := byte(opContinuation)
		if i == 0 {
			head = opText
		}
		if i+4096 >= len(msg) {
			head |= 0x80
		}
		stream = appendMasked(stream, head, msg[i:min(i+4096, len(msg))])
	}
	b.SetBytes(int64(len(msg)))
	r := bytes.NewReader(stream)
	br := bufio.NewReader(r)
	for b.Loop() {
		r.Reset(stream)
		br.Reset(r)
		fr := frameReader{r: br, max: len(msg)}
		if f, err := fr.next(); err != nil || len(f.data) != len(msg) {
			b.Fatalf("%d bytes, %v", len(f.data), err)
		}
	}
}
