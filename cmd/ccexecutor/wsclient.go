package main

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
)

// wsConn is the client end of a WebSocket connection (RFC 6455), as much of it as run needs.
// run does the handshake itself, rather than through x/net/websocket, so that it sends no
// Origin (x/net always sends one; clients that are not browsers send none, and a server behind
// a proxy rightly refuses an Origin made from the URL), and reads the frames itself, so that a
// frame cut short by the connection's end is an error and not a message.
//
// One goroutine reads, with next; any goroutine may write: writes are serialized, and each has
// a deadline of its own, so that a deadline set for one write never fails a later one.
type wsConn struct {
	nc   net.Conn
	br   *bufio.Reader // the connection through Read, from the end of the handshake answer on
	wait time.Duration // time a frame may take to be written

	// Set by keepAlive before reading begins, and then only read by the reading goroutine.
	idle     time.Duration // silence after which a Ping is sent; 0 while keep-alive is off
	pongWait time.Duration // silence after that Ping after which the server counts as gone

	wmu  sync.Mutex // serializes writes; guards wbuf
	wbuf []byte     // the frame being written
}

// wsGUID is the key suffix of the opening handshake (RFC 6455, section 1.3).
const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// WebSocket opcodes (RFC 6455, section 5.2).
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa
)

// A refusedError is an answer to the opening handshake other than 101 Switching Protocols.
type refusedError struct {
	status int    // HTTP status code
	text   string // the status line's text and the first line of the body
}

func (e *refusedError) Error() string { return e.text }

// wsHandshake upgrades nc to a WebSocket connection to u, sending header besides the handshake's
// own fields, and no Origin. An answer other than 101 is returned as a *refusedError. The
// caller sets nc's deadlines.
func wsHandshake(nc net.Conn, u *url.URL, header http.Header, wait time.Duration) (*wsConn, error) {
	var key [16]byte
	rand.Read(key[:])
	k := base64.StdEncoding.EncodeToString(key[:])
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n", u.RequestURI(), u.Host)
	fmt.Fprintf(&b, "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", k)
	header.Write(&b)
	b.WriteString("\r\n")
	if _, err := io.WriteString(nc, b.String()); err != nil {
		return nil, err
	}

	c := &wsConn{nc: nc, wait: wait}
	c.br = bufio.NewReaderSize(c, 64<<10)
	resp, err := http.ReadResponse(c.br, &http.Request{Method: http.MethodGet})
	if err != nil {
		return nil, fmt.Errorf("no HTTP answer to the WebSocket handshake: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		return nil, &refusedError{resp.StatusCode, refusal(resp)}
	}
	sum := sha1.Sum([]byte(k + wsGUID))
	switch {
	case !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket"):
		return nil, fmt.Errorf("HTTP 101 answer without Upgrade: websocket")
	case resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]):
		return nil, fmt.Errorf("HTTP 101 answer with a wrong Sec-WebSocket-Accept")
	}
	return c, nil
}

// errSilent is the error of a read from a server that sent nothing, not even a Pong, in the
// keep-alive's idle time and its Pong wait after it.
var errSilent = errors.New("the server sent nothing")

// keepAlive makes reading notice a server that has gone silent, as when the network between
// drops every packet without a reset: once nothing at all has arrived for idle, a Ping is
// sent, and a read that gets nothing within pongWait after it fails with errSilent. It must
// be called after the handshake's deadline is cleared, by the goroutine that reads or before
// that goroutine starts.
func (c *wsConn) keepAlive(idle, pongWait time.Duration) {
	c.idle, c.pongWait = idle, pongWait
}

// Read reads from the connection for br, applying the keep-alive once keepAlive has set it.
// Only the goroutine that reads may call it.
func (c *wsConn) Read(p []byte) (int, error) {
	if c.idle <= 0 {
		return c.nc.Read(p)
	}
	wait, pinged := c.idle, false
	for {
		c.nc.SetReadDeadline(time.Now().Add(wait))
		n, err := c.nc.Read(p)
		var ne net.Error
		if n > 0 || err == nil || !errors.As(err, &ne) || !ne.Timeout() {
			return n, err
		}
		if pinged {
			return 0, fmt.Errorf("%w for %v, not even a Pong", errSilent, c.idle+c.pongWait)
		}
		if err := c.write(opPing, nil); err != nil {
			return 0, fmt.Errorf("sending a Ping: %w", err)
		}
		wait, pinged = c.pongWait, true
	}
}

// refusal describes resp, an answer that refused a handshake: its status and the first line of
// its body, and which flag may help.
func refusal(resp *http.Response) string {
	msg := "HTTP " + resp.Status
	body, _ := io.ReadAll(io.LimitReader(resp.Body, refusalBytes))
	if line, _, _ := strings.Cut(strings.TrimSpace(string(body)), "\n"); line != "" && len(line) <= 200 {
		msg += ": " + line
	}
	if resp.StatusCode == http.StatusUnauthorized {
		msg += " (check --token or CC_EXECUTOR_TOKEN)"
	}
	return msg
}

// errFrameTooLarge is returned by next for a message over its limit, whose rest it has skipped.
var errFrameTooLarge = errors.New("frame too large")

// A closeError is the server's close frame.
type closeError struct {
	code   int // 0 when the frame had no code
	reason string
}

func (e *closeError) Error() string {
	if e.code == 0 {
		return "closed by the server"
	}
	if e.reason == "" {
		return fmt.Sprintf("closed by the server (code %d)", e.code)
	}
	return fmt.Sprintf("closed by the server: %s (code %d)", e.reason, e.code)
}

// next appends to dst the payload of the next text or binary message, of at most max bytes,
// answering the Pings that come before it. It returns a *closeError for a close frame,
// io.ErrUnexpectedEOF for a connection that ends inside a frame, and errFrameTooLarge for a
// message over max, after skipping it.
func (c *wsConn) next(dst []byte, max int) ([]byte, error) {
	msg, start := dst, len(dst)
	inMessage, tooLarge := false, false
	for {
		h, err := c.br.Peek(2)
		if err != nil {
			if err == io.EOF && (inMessage || len(h) > 0) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		fin, op, n := h[0]&0x80 != 0, h[0]&0x0f, uint64(h[1]&0x7f)
		if h[0]&0x70 != 0 || h[1]&0x80 != 0 {
			return nil, fmt.Errorf("invalid frame header %x: reserved bits or mask set", h[:2])
		}
		hl := 2 // header length
		switch n {
		case 126:
			if h, err = c.br.Peek(4); err != nil {
				return nil, unexpected(err)
			}
			n, hl = uint64(binary.BigEndian.Uint16(h[2:4])), 4
		case 127:
			if h, err = c.br.Peek(10); err != nil {
				return nil, unexpected(err)
			}
			n, hl = binary.BigEndian.Uint64(h[2:10]), 10
		}
		c.br.Discard(hl)
		if op >= opClose { // a control frame: short, whole, and possibly inside a message
			if n > 125 || !fin {
				return nil, fmt.Errorf("invalid control frame (opcode %d, %d bytes)", op, n)
			}
			p := make([]byte, n)
			if _, err := io.ReadFull(c.br, p); err != nil {
				return nil, unexpected(err)
			}
			switch op {
			case opClose:
				e := &closeError{}
				if len(p) >= 2 {
					e.code, e.reason = int(binary.BigEndian.Uint16(p)), string(p[2:])
				}
				return nil, e
			case opPing:
				if err := c.write(opPong, p); err != nil {
					return nil, fmt.Errorf("answering a Ping: %w", err)
				}
			}
			continue
		}
		switch {
		case op == opContinuation && !inMessage, op != opContinuation && inMessage:
			return nil, fmt.Errorf("invalid fragment (opcode %d)", op)
		case op != opContinuation && op != opText && op != opBinary:
			return nil, fmt.Errorf("unknown opcode %d", op)
		}
		inMessage = true
		if tooLarge || n > uint64(max-(len(msg)-start)) {
			tooLarge, msg = true, msg[:start]
			if _, err := io.CopyN(io.Discard, c.br, int64(min(n, 1<<62))); err != nil {
				return nil, unexpected(err)
			}
		} else {
			at := len(msg)
			msg = slices.Grow(msg, int(n))[:at+int(n)]
			if _, err := io.ReadFull(c.br, msg[at:]); err != nil {
				return nil, unexpected(err)
			}
		}
		if fin {
			if tooLarge {
				return nil, errFrameTooLarge
			}
			return msg, nil
		}
	}
}

// unexpected is err from reading the rest of a frame: an end there is unexpected.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// write sends payload as one masked frame of type op, giving it c.wait to be written.
func (c *wsConn) write(op byte, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	b := append(c.wbuf[:0], 0x80|op) // FIN
	n := len(payload)
	switch {
	case n <= 125:
		b = append(b, 0x80|byte(n))
	case n <= 0xffff:
		b = binary.BigEndian.AppendUint16(append(b, 0x80|126), uint16(n))
	default:
		b = binary.BigEndian.AppendUint64(append(b, 0x80|127), uint64(n))
	}
	var mask [4]byte
	rand.Read(mask[:])
	b = append(b, mask[:]...)
	start := len(b)
	b = append(b, payload...)
	for i := range payload {
		b[start+i] ^= mask[i%4]
	}
	c.wbuf = b
	c.nc.SetWriteDeadline(time.Now().Add(c.wait))
	_, err := c.nc.Write(b)
	return err
}

// close sends a normal close frame, without waiting for the server's, and closes the
// connection.
func (c *wsConn) close() {
	c.write(opClose, binary.BigEndian.AppendUint16(nil, 1000))
	c.nc.Close()
}
