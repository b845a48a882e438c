package ccexecutor

import (
	"encoding/binary"
	"math"
	"strconv"
	"unicode/utf8"
)

// maxBatch is the size at which a stream's pending frames are handed to the writer even though
// more lines are ready.
const maxBatch = 32 << 10

// A batch is one or more encoded frames for the writer. A pump's batches go back to it, on
// free, once written; other batches (responses, notifications) are written once and dropped.
//
// When line is not nil, the last frame in frames is the start of a process.output whose JSON
// is longer than maxInline: what follows it is line escaped as a JSON string, then tail. The
// writer escapes line a piece at a time as it writes, so that no more than escapeChunk bytes
// of it are ever held escaped, and line belongs to the writer until the batch is back.
type batch struct {
	frames []byte
	line   []byte
	tail   []byte
	n      int           // how many text messages the batch holds; control frames are not counted
	free   chan<- *batch // nil for a batch that is not reused
}

// addOutput adds the process.output frame of a line to b, whole when its JSON is at most
// maxInline bytes. Otherwise it sets b.line to line and b.tail, and reports true: b must then
// be sent at once, and line kept as it is until b is back. A seq of 0 is not sent.
func (b *batch) addOutput(stream string, line []byte, dropped int, seq uint64) (long bool) {
	b.n++
	if len(line) <= maxInlineLine {
		b.frames = appendOutputFrame(b.frames, stream, line, dropped, seq)
		return false
	}
	b.tail = appendOutputTail(b.tail[:0], dropped, seq)
	n := len(outputHead) + len(stream) + len(dataKey) + escapedLen(line) + len(b.tail)
	if n <= maxInline {
		b.frames = appendOutputFrame(b.frames, stream, line, dropped, seq)
		return false
	}
	b.frames = appendFrameHeader(b.frames, opText, n)
	b.frames = appendOutputHead(b.frames, stream)
	b.line = line
	return true
}

// reset empties b for reuse.
func (b *batch) reset() {
	b.frames, b.line, b.n = b.frames[:0], nil, 0
}

// maxInline is the longest process.output JSON that a pump encodes whole into its batch; a
// longer one the writer escapes as it writes it (see batch). It is the most a 16-bit frame
// length holds, which appendOutputFrame relies on.
const maxInline = math.MaxUint16

// maxInlineLine is the longest line whose JSON is certainly no longer than maxInline: a byte
// becomes at most six ("\u0001"), and the rest of the notification takes under 200 bytes.
const maxInlineLine = (maxInline - 200) / 6

// escapeChunk is how many bytes of a long line the writer escapes per piece; a piece is at
// most six times as long.
const escapeChunk = 16 << 10

// closeFrame is a close frame as a batch.
func closeFrame(code uint16, reason string) *batch {
	return &batch{frames: appendFrame(nil, opClose, closePayload(code, reason))}
}

// The parts of a process.output notification around its stream and its data.
const (
	outputHead = `{"jsonrpc":"2.0","method":"process.output","params":{"type":"`
	dataKey    = `","data":"`
)

// appendOutput appends the JSON of a process.output notification; a seq of 0 is left out.
func appendOutput(b []byte, stream string, line []byte, dropped int, seq uint64) []byte {
	return appendOutputTail(appendEscaped(appendOutputHead(b, stream), line), dropped, seq)
}

// appendOutputHead appends a process.output up to the opening quote of its data.
func appendOutputHead(b []byte, stream string) []byte {
	return append(append(append(b, outputHead...), stream...), dataKey...)
}

// appendOutputTail appends the rest of a process.output after its data, from the closing quote.
func appendOutputTail(b []byte, dropped int, seq uint64) []byte {
	if dropped > 0 {
		b = append(b, `","truncated":true,"dropped_bytes":`...)
		b = strconv.AppendInt(b, int64(dropped), 10)
	} else {
		b = append(b, `","truncated":false`...)
	}
	if seq > 0 {
		b = strconv.AppendUint(append(b, `,"seq":`...), seq, 10)
	}
	return append(b, "}}"...)
}

// appendOutputFrame appends the text frame of a process.output whose JSON is at most
// maxInline bytes long. It encodes the JSON in place, after a 7-bit length when the line is
// short enough for one if only its ending needs escaping, as short lines are, else after a
// 16-bit one, and moves the JSON by two bytes when the guess was wrong: so the JSON is
// written once, without a buffer of its own or a pass to measure it first.
func appendOutputFrame(b []byte, stream string, line []byte, dropped int, seq uint64) []byte {
	start := len(b)
	guess := len(outputHead) + len(stream) + len(dataKey) + len(line) + 1 + len(`","truncated":false}}`)
	if seq > 0 {
		guess += len(`,"seq":`) + 1
		for n := seq; n >= 10; n /= 10 {
			guess++
		}
	}
	if guess <= 125 && dropped == 0 {
		b = appendOutput(append(b, 0x80|opText, 0), stream, line, dropped, seq)
		if n := len(b) - start - 2; n <= 125 {
			b[start+1] = byte(n)
		} else {
			b = append(b, 0, 0)
			copy(b[start+4:], b[start+2:len(b)-2])
			b[start+1] = 126
			binary.BigEndian.PutUint16(b[start+2:], uint16(n))
		}
		return b
	}
	b = appendOutput(append(b, 0x80|opText, 126, 0, 0), stream, line, dropped, seq)
	n := len(b) - start - 4
	if n <= 125 {
		b[start+1] = byte(n)
		return b[:start+2+copy(b[start+2:], b[start+4:])]
	}
	binary.BigEndian.PutUint16(b[start+2:], uint16(n))
	return b
}

// appendEscaped appends s escaped as the inside of a JSON string, without the quotes. Invalid
// UTF-8 becomes U+FFFD, a byte at a time.
func appendEscaped(b []byte, s []byte) []byte {
	const hex = "0123456789abcdef"
	start := 0 // s[start:i] is still to be copied
	plain := 0 // how many plain ASCII bytes come right before s[i]
	for i := 0; i < len(s); {
		if plain >= 8 {
			// In a run of plain ASCII, as most output is: go sixteen, then eight bytes at a time.
			i = skipPlain(s, i)
			if plain = 0; i == len(s) {
				break
			}
		}
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			plain++
			continue
		}
		plain = 0
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRune(s[i:])
			if r != utf8.RuneError || size != 1 {
				i += size
				continue
			}
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			if c < 0x20 {
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			} else {
				b = append(b, "\uFFFD"...)
			}
		}
		i++
		start = i
	}
	return append(b, s[start:]...)
}

// escapedLen returns len(appendEscaped(nil, s)) without making it.
func escapedLen(s []byte) int {
	n := len(s)
	for i := 0; i < len(s); {
		i = skipPlain(s, i)
		if i == len(s) {
			break
		}
		c := s[i]
		switch {
		case c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf:
		case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
			n++
		case c < 0x20:
			n += 5
		default:
			r, size := utf8.DecodeRune(s[i:])
			if r != utf8.RuneError || size != 1 {
				i += size
				continue
			}
			n += len("\uFFFD") - 1
		}
		i++
	}
	return n
}

// escapeCut returns where to cut s so that s[:n] is at most max bytes (max >= 4), at least
// one, and appendEscaped(s[:n]) followed by appendEscaped(s[n:]) is appendEscaped(s): the cut
// never falls inside a valid UTF-8 character, since it comes before a byte that can start one
// or after three that cannot, while a character has at most three after its first.
func escapeCut(s []byte, max int) int {
	if len(s) <= max {
		return len(s)
	}
	for n := max; n >= max-(utf8.UTFMax-1); n-- {
		if utf8.RuneStart(s[n]) {
			return n
		}
	}
	return max
}

// skipPlain returns the index after the run of plain ASCII at s[i:], found eight bytes at a
// time; it may stop up to seven bytes short of the run's end.
func skipPlain(s []byte, i int) int {
	for ; i+16 <= len(s); i += 16 {
		if escapeBits(binary.LittleEndian.Uint64(s[i:]))|escapeBits(binary.LittleEndian.Uint64(s[i+8:])) != 0 {
			break
		}
	}
	for ; i+8 <= len(s); i += 8 {
		if escapeBits(binary.LittleEndian.Uint64(s[i:])) != 0 {
			break
		}
	}
	return i
}

// escapeBits is not zero when any of the eight bytes in w is a control character, '"', '\\'
// or not ASCII: the bytes appendEscaped cannot copy as they are. It tests all eight at once
// with the "has a zero byte" trick of bit manipulation, applied to w^'"' and w^'\\'.
func escapeBits(w uint64) uint64 {
	const lo, hi = 0x0101010101010101, 0x8080808080808080
	q, bs := w^(lo*'"'), w^(lo*'\\')
	return ((w-lo*0x20)&^w | (q-lo)&^q | (bs-lo)&^bs | w) & hi
}
