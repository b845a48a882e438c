package ccexecutor

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"unicode/utf8"
)

// WebSocket opcodes (RFC 6455, section 5.2); every other opcode is reserved. The server
// writes text, close and ping frames; a client may send any of these.
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa
)

// maxControlPayload is the longest payload of a control frame (RFC 6455, section 5.5).
const maxControlPayload = 125

// A protocolError is a frame that breaks RFC 6455: the connection fails with a close frame of
// status code (section 7.1.7), and nothing the client sends after it is read.
type protocolError struct {
	code   uint16 // 1002, or 1007 for a close reason that is not UTF-8
	reason string // sent as the close frame's reason
}

func (e *protocolError) Error() string {
	return fmt.Sprintf("ccexecutor: protocol error %d: %s", e.code, e.reason)
}

func failWith(code uint16, format string, args ...any) *protocolError {
	return &protocolError{code, fmt.Sprintf(format, args...)}
}

// A clientFrame is what frameReader.next returns: a whole data message, or a control frame.
type clientFrame struct {
	op       byte   // opText or opBinary for a message; opPing, opPong or opClose
	data     []byte // the message, or the control frame's payload
	tooLarge bool   // the message was longer than the limit; it was skipped and data is nil
	code     uint16 // for opClose, the status to answer with: the client's, or 1000 if it sent none
}

// frameReader reads the frames a client sends on a server connection and reassembles
// fragmented messages (RFC 6455, section 5.4). Control frames, which may come between the
// fragments of a message, are returned as they arrive. A message longer than max, counted over
// all of its fragments, is read to its end without being kept and returned as tooLarge.
// Any error other than a *protocolError comes from the reader. After an error, next must not be
// called again.
type frameReader struct {
	r   *bufio.Reader
	max int
	buf [8]byte // a header's bytes, being read

	// The message being reassembled, while in is set.
	in       bool
	op       byte // opText or opBinary, from its first frame
	data     []byte
	tooLarge bool
}

// A frameHeader is the fixed part of a frame (RFC 6455, section 5.2).
type frameHeader struct {
	fin    bool
	op     byte
	length uint64
	mask   [4]byte
}

// next returns the next message or control frame.
func (fr *frameReader) next() (clientFrame, error) {
	for {
		h, err := fr.header()
		if err != nil {
			return clientFrame{}, err
		}
		if h.op&0x8 != 0 {
			return fr.control(h)
		}
		switch {
		case h.op == opContinuation && !fr.in:
			return clientFrame{}, failWith(1002, "continuation frame without a message to continue")
		case h.op != opContinuation && fr.in:
			return clientFrame{}, failWith(1002, "new message before the last one was finished")
		case h.op != opContinuation:
			fr.in, fr.op, fr.data, fr.tooLarge = true, h.op, nil, false
		}
		if fr.tooLarge || h.length > uint64(fr.max-len(fr.data)) {
			fr.tooLarge, fr.data = true, nil
			if _, err := io.CopyN(io.Discard, fr.r, int64(h.length)); err != nil {
				return clientFrame{}, unexpected(err)
			}
		} else {
			n, need := len(fr.data), len(fr.data)+int(h.length)
			if need > cap(fr.data) { // at least double, so that many fragments cost few copies
				fr.data = append(make([]byte, 0, min(max(2*cap(fr.data), need), fr.max)), fr.data...)
			}
			fr.data = fr.data[:need]
			if err := fr.payload(h, fr.data[n:]); err != nil {
				return clientFrame{}, err
			}
		}
		if h.fin {
			f := clientFrame{op: fr.op, data: fr.data, tooLarge: fr.tooLarge}
			fr.in, fr.data = false, nil
			return f, nil
		}
	}
}

// header reads and checks a frame's header, masking key included (RFC 6455, section 5.2).
func (fr *frameReader) header() (frameHeader, error) {
	b := fr.buf[:]
	if _, err := io.ReadFull(fr.r, b[:2]); err != nil {
		return frameHeader{}, err
	}
	h := frameHeader{fin: b[0]&0x80 != 0, op: b[0] & 0x0f, length: uint64(b[1] & 0x7f)}
	control := h.op&0x8 != 0
	switch {
	case b[0]&0x70 != 0:
		return h, failWith(1002, "reserved bits set without an extension")
	case h.op > opBinary && h.op < opClose || h.op > opPong:
		return h, failWith(1002, "reserved opcode %#x", h.op)
	case control && !h.fin:
		return h, failWith(1002, "fragmented control frame")
	case control && h.length > maxControlPayload:
		return h, failWith(1002, "control frame longer than 125 bytes")
	case b[1]&0x80 == 0:
		return h, failWith(1002, "unmasked frame from a client")
	}
	switch h.length {
	case 126:
		if _, err := io.ReadFull(fr.r, b[:2]); err != nil {
			return h, unexpected(err)
		}
		h.length = uint64(binary.BigEndian.Uint16(b[:2]))
	case 127:
		if _, err := io.ReadFull(fr.r, b[:8]); err != nil {
			return h, unexpected(err)
		}
		if h.length = binary.BigEndian.Uint64(b[:8]); h.length>>63 != 0 {
			return h, failWith(1002, "payload length with the most significant bit set")
		}
	}
	if _, err := io.ReadFull(fr.r, b[:4]); err != nil {
		return h, unexpected(err)
	}
	copy(h.mask[:], b)
	return h, nil
}

// payload reads the payload of h into p, which has its length, and unmasks it.
func (fr *frameReader) payload(h frameHeader, p []byte) error {
	if _, err := io.ReadFull(fr.r, p); err != nil {
		return unexpected(err)
	}
	key := uint64(binary.LittleEndian.Uint32(h.mask[:]))
	key |= key << 32
	i := 0
	for ; i+8 <= len(p); i += 8 { // eight bytes at a time; i stays a multiple of 4
		binary.LittleEndian.PutUint64(p[i:], binary.LittleEndian.Uint64(p[i:])^key)
	}
	for ; i < len(p); i++ {
		p[i] ^= h.mask[i&3]
	}
	return nil
}

// control reads the payload of the control frame h and returns it. A close frame's payload
// is checked (RFC 6455, sections 5.5.1 and 7.4): empty, or a valid status code followed by a
// UTF-8 reason.
func (fr *frameReader) control(h frameHeader) (clientFrame, error) {
	f := clientFrame{op: h.op, data: make([]byte, h.length)}
	if err := fr.payload(h, f.data); err != nil {
		return clientFrame{}, err
	}
	if h.op != opClose {
		return f, nil
	}
	switch len(f.data) {
	case 0:
		f.code = 1000
		return f, nil
	case 1:
		return clientFrame{}, failWith(1002, "close frame with a 1-byte payload")
	}
	f.code = binary.BigEndian.Uint16(f.data)
	if !validCloseCode(f.code) {
		return clientFrame{}, failWith(1002, "invalid close code %d", f.code)
	}
	if !utf8.Valid(f.data[2:]) {
		return clientFrame{}, failWith(1007, "close reason is not UTF-8")
	}
	return f, nil
}

// validCloseCode reports whether a peer may send code in a close frame (RFC 6455, section 7.4):
// the codes defined for it in sections 7.4.1 and 11.7 (1004, 1005, 1006 and 1015 are never
// sent), and the ranges left to libraries and applications (section 7.4.2).
func validCloseCode(code uint16) bool {
	switch {
	case code >= 1000 && code <= 1003, code >= 1007 && code <= 1014:
		return true
	default:
		return code >= 3000 && code <= 4999
	}
}

// unexpected turns the end of the stream inside a frame into io.ErrUnexpectedEOF.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// appendFrame appends an unmasked, unfragmented WebSocket frame (RFC 6455, section 5.2).
func appendFrame(b []byte, op byte, payload []byte) []byte {
	return append(appendFrameHeader(b, op, len(payload)), payload...)
}

// appendFrameHeader appends the header of an unmasked, unfragmented frame of n bytes.
func appendFrameHeader(b []byte, op byte, n int) []byte {
	b = append(b, 0x80|op) // FIN
	switch {
	case n <= 125:
		return append(b, byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, 126), uint16(n))
	default:
		return binary.BigEndian.AppendUint64(append(b, 127), uint64(n))
	}
}

func closePayload(code uint16, reason string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, code), reason...)
}

// skipFrames returns b without its first k frames, which must be whole frames of
// appendFrameHeader's form.
func skipFrames(b []byte, k int) []byte {
	for ; k > 0; k-- {
		b = b[frameLen(b):]
	}
	return b
}

// frameLen is the length of the frame that b begins with, of appendFrameHeader's form, header
// and payload.
func frameLen(b []byte) int {
	switch n := int(b[1] & 0x7f); n {
	case 126:
		return 4 + int(binary.BigEndian.Uint16(b[2:]))
	case 127:
		return 10 + int(binary.BigEndian.Uint64(b[2:]))
	default:
		return 2 + n
	}
}
