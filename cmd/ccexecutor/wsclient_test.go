package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// scriptConn is a connection that reads a script and records what is written to it.
type scriptConn struct {
	net.Conn // nil: only the methods below are used
	r        io.Reader
	written  bytes.Buffer
}

func (c *scriptConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)      { return c.written.Write(p) }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }
func (c *scriptConn) Close() error                     { return nil }

// frame is an unmasked frame with the header bytes b0 (FIN, RSV, opcode) and payload p.
func frame(b0 byte, p string) string {
	b := []byte{b0}
	switch n := len(p); {
	case n <= 125:
		b = append(b, byte(n))
	case n <= 0xffff:
		b = binary.BigEndian.AppendUint16(append(b, 126), uint16(n))
	default:
		b = binary.BigEndian.AppendUint64(append(b, 127), uint64(n))
	}
	return string(b) + p
}

// unmask decodes the masked frames a client wrote, as opcode:payload strings.
func unmask(b []byte) []string {
	var out []string
	for len(b) >= 6 {
		op, n := b[0]&0x0f, int(b[1]&0x7f)
		mask, p := b[2:6], b[6:6+n]
		for i := range p {
			p[i] ^= mask[i%4]
		}
		out = append(out, fmt.Sprintf("%x:%s", op, p))
		b = b[6+n:]
	}
	return out
}

// TestWSNext checks the client's frame reader: messages whole, fragmented, around Pings; and
// every way a server's frames can be wrong or cut, each an error and never a message.
func TestWSNext(t *testing.T) {
	big := strings.Repeat("b", 70000)
	for _, tt := range []struct {
		name   string
		script string
		max    int
		want   []string // messages, then "err: ..." for the error that ends them
		pongs  []string // frames written, as opcode:payload
	}{
		{"text", frame(0x81, "hi") + frame(0x82, "bin"), 100, []string{"hi", "bin", "err: EOF"}, nil},
		{"16-bit and 64-bit lengths", frame(0x81, strings.Repeat("m", 300)) + frame(0x81, big), 1 << 20, []string{strings.Repeat("m", 300), big, "err: EOF"}, nil},
		{"fragments with a Ping between", frame(0x01, "a") + frame(0x89, "p1") + frame(0x00, "b") + frame(0x80, "c"), 100, []string{"abc", "err: EOF"}, []string{"a:p1"}},
		{"Pong ignored", frame(0x8a, "x") + frame(0x81, "m"), 100, []string{"m", "err: EOF"}, nil},
		{"at the limit", frame(0x81, "12345"), 5, []string{"12345", "err: EOF"}, nil},
		{"over the limit, skipped", frame(0x81, "123456") + frame(0x81, "next"), 5, []string{"err: frame too large", "next", "err: EOF"}, nil},
		{"fragments over the limit", frame(0x01, "123") + frame(0x80, "456") + frame(0x81, "next"), 5, []string{"err: frame too large", "next", "err: EOF"}, nil},
		{"close with code", frame(0x88, "\x03\xe9going away"), 100, []string{"err: closed by the server: going away (code 1001)"}, nil},
		{"close without code", frame(0x88, ""), 100, []string{"err: closed by the server"}, nil},
		{"cut in the payload", frame(0x81, "whole")[:4], 100, []string{"err: unexpected EOF"}, nil},
		{"cut in the length", "\x81\x7e\x01", 100, []string{"err: unexpected EOF"}, nil},
		{"cut between fragments", frame(0x01, "a"), 100, []string{"err: unexpected EOF"}, nil},
		{"masked", "\x81\x82abcdxy", 100, []string{"err: invalid frame header 8182: reserved bits or mask set"}, nil},
		{"reserved bit", frame(0xc1, "x"), 100, []string{"err: invalid frame header c101: reserved bits or mask set"}, nil},
		{"continuation first", frame(0x80, "x"), 100, []string{"err: invalid fragment (opcode 0)"}, nil},
		{"text inside a message", frame(0x01, "x") + frame(0x81, "y"), 100, []string{"err: invalid fragment (opcode 1)"}, nil},
		{"long Ping", frame(0x89, strings.Repeat("p", 126)), 1000, []string{"err: invalid control frame (opcode 9, 126 bytes)"}, nil},
		{"fragmented Ping", frame(0x09, "p"), 100, []string{"err: invalid control frame (opcode 9, 1 bytes)"}, nil},
		{"unknown opcode", frame(0x83, "x"), 100, []string{"err: unknown opcode 3"}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			nc := &scriptConn{r: strings.NewReader(tt.script)}
			c := &wsConn{nc: nc, br: bufio.NewReader(nc), wait: time.Second}
			var got []string
			for {
				m, err := c.next([]byte("x"), tt.max) // appends to what is there
				if err != nil {
					got = append(got, "err: "+err.Error())
					if !errors.Is(err, errFrameTooLarge) {
						break
					}
					continue
				}
				got = append(got, string(m[1:]))
			}
			if strings.Join(got, "|") != strings.Join(tt.want, "|") {
				t.Errorf("got %.200q, want %.200q", got, tt.want)
			}
			if w := unmask(nc.written.Bytes()); strings.Join(w, "|") != strings.Join(tt.pongs, "|") {
				t.Errorf("wrote %q, want %q", w, tt.pongs)
			}
		})
	}
}
