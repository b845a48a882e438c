package ccexecutor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// The tests of this file cover the output path between a pump and the socket: that a line's
// frame is the same whether the pump encodes it whole or the writer escapes it piece by piece,
// and that the write deadline measures the client's progress, not the size of what is queued.

// TestOutputFrames guards the encoding of process.output frames: a frame encoded in place
// with its length fixed up afterwards (appendOutputFrame), and one the writer escapes a piece
// at a time (batch.addOutput, conn.writeBatches), must be byte for byte the frame that
// appendFrame makes of appendOutput's whole JSON, at every boundary: 7- and 16-bit lengths,
// the JSON exactly at and one past maxInline, characters and invalid bytes across the cuts
// between pieces.
func TestOutputFrames(t *testing.T) {
	head := len(outputHead) + len("stdout") + len(dataKey) + len(`","truncated":false}}`)
	around := func(at int, s string) string { // s placed across the cut at escapeChunk
		return strings.Repeat("a", at-len(s)/2) + s + strings.Repeat("b", 3*escapeChunk)
	}
	rows := []struct {
		name    string
		line    string
		dropped int
		long    bool // the writer escapes it
	}{
		{"empty", "", 0, false},
		{"short", "hi\n", 0, false},
		{"payload of 125 bytes", strings.Repeat("a", 125-head), 0, false},
		{"payload of 126 bytes", strings.Repeat("a", 126-head), 0, false},
		{"4 KiB", strings.Repeat("a", 4095) + "\n", 0, false},
		{"control bytes, certainly inline", strings.Repeat("\x01", maxInlineLine), 0, false},
		{"control bytes, JSON at maxInline", strings.Repeat("\x01", (maxInline-head)/6), 0, false},
		{"control bytes, one more", strings.Repeat("\x01", (maxInline-head)/6+1), 0, true},
		{"JSON of maxInline bytes", strings.Repeat("a", maxInline-head), 0, false},
		{"JSON of maxInline+1 bytes", strings.Repeat("a", maxInline-head+1), 0, true},
		{"512 KiB of control bytes", strings.Repeat("\x01", 512<<10) + "\n", 0, true},
		{"512 KiB of escapes and text", strings.Repeat("\"\\\t\r\n<&>\u2028 x", 40<<10), 0, true},
		{"truncated", strings.Repeat("\x1f", 100<<10) + truncMarker, 12345, true},
	}
	// Short lines around a payload of 125 bytes, whose escapes the length guessed from the
	// line's size does not foresee.
	for k := 10; k <= 28; k++ {
		rows = append(rows, struct {
			name    string
			line    string
			dropped int
			long    bool
		}{fmt.Sprintf("%d quotes", k), strings.Repeat(`"`, k), 0, false})
	}
	for _, c := range []string{"é", "€", "𝄞", "\xff", "\xe2\x82", "\xf0\x9d\x84", "\x80\x80\x80\x80\x80"} {
		for d := -4; d <= 4; d++ {
			rows = append(rows, struct {
				name    string
				line    string
				dropped int
				long    bool
			}{fmt.Sprintf("%q at the cut%+d", c, d), around(escapeChunk+d, c), 0, true})
		}
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			want := appendFrame(nil, opText, appendOutput(nil, "stdout", []byte(row.line), row.dropped, 0))
			if !utf8.Valid(want[4:]) && !utf8.Valid(want[10:]) {
				t.Fatalf("the reference frame is not UTF-8")
			}
			b := &batch{frames: []byte("before")}
			if long := b.addOutput("stdout", []byte(row.line), row.dropped, 0); long != row.long {
				t.Errorf("addOutput reports long = %v, want %v", long, row.long)
			}
			got := writeOut(t, b)
			if !bytes.HasPrefix(got, []byte("before")) || !bytes.Equal(got[len("before"):], want) {
				t.Errorf("frame differs from the reference:\n got %s\nwant %s", trimBytes(got), trimBytes(want))
			}
		})
	}
}

// writeOut writes b with conn.writeBatches and returns the bytes on the wire.
func writeOut(t *testing.T, b *batch) []byte {
	t.Helper()
	client, server := net.Pipe()
	defer client.Close()
	c := newConn(server, 10*time.Second)
	c.raw = server
	errc := make(chan error, 1)
	go func() { // returns once the batch is written, or the pipe is closed
		var bufs net.Buffers
		var scratch []byte
		errc <- c.writeBatches([]*batch{b}, &bufs, &scratch)
		server.Close()
	}()
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("writeBatches: %v", err)
	}
	return got
}

func trimBytes(b []byte) string {
	if len(b) > 200 {
		return fmt.Sprintf("%q...(%d bytes)", b[:200], len(b))
	}
	return fmt.Sprintf("%q", b)
}

// FuzzEscape checks escapedLen and escapeCut against appendEscaped: the length is exact, and
// escaping the two sides of a cut gives the escaping of the whole.
func FuzzEscape(f *testing.F) {
	for _, s := range []string{"", "plain", "a\x01\"\\\n\r\t", "é€𝄞", "\xff\xfe", "ab\xe2\x82", "\xf0\x9d\x84\x9e\x80\x80", "\u2028<>&"} {
		f.Add([]byte(s), 4)
	}
	f.Fuzz(func(t *testing.T, s []byte, max int) {
		want := appendEscaped(nil, s)
		if n := escapedLen(s); n != len(want) {
			t.Fatalf("escapedLen(%q) = %d, want %d", s, n, len(want))
		}
		if max = 4 + abs(max)%64; len(s) <= max {
			return
		}
		n := escapeCut(s, max)
		if n < 1 || n > max {
			t.Fatalf("escapeCut(%q, %d) = %d, want 1..%d", s, max, n, max)
		}
		if got := appendEscaped(appendEscaped(nil, s[:n]), s[n:]); !bytes.Equal(got, want) {
			t.Fatalf("escaping %q cut at %d = %q, want %q", s, n, got, want)
		}
	})
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}

// TestWriteProgress guards against dropping a client that reads steadily but slower than the
// output comes: the write deadline must measure the client's progress, not how long a write
// of everything queued takes. A client counts as gone when it accepts fewer than minProgress
// bytes in the write wait; not "no byte", since a client that reads nothing still takes some
// bytes now and then (see minProgress).
func TestWriteProgress(t *testing.T) {
	t.Run("conn", func(t *testing.T) {
		const wait = 400 * time.Millisecond
		rows := []struct {
			name   string
			per    int // bytes the client reads per 10 ms
			writev bool
			gone   bool
		}{
			// 640 kB take 0.8 s at 800 kB/s: a deadline for the whole write drops the client.
			{"steady 800 kB/s", 8000, false, false},
			{"steady 800 kB/s, writev", 8000, true, false},
			// 40 kB per write wait, under minProgress.
			{"trickle of 100 kB/s", 1000, false, true},
			{"trickle of 100 kB/s, writev", 1000, true, true},
			{"reads nothing", 0, false, true},
		}
		for _, row := range rows {
			t.Run(row.name, func(t *testing.T) {
				t.Parallel()
				client, server := net.Pipe()
				defer client.Close()
				c := newConn(server, wait)
				c.raw = server
				done := make(chan struct{})
				read := make(chan int, 1)
				go func() { // returns once the pipe is closed
					tick := time.NewTicker(10 * time.Millisecond)
					defer tick.Stop()
					n, _ := io.Copy(io.Discard, &pacedReader{r: client, perTick: row.per, tick: tick.C})
					read <- int(n)
				}()
				if row.per == 0 {
					go func() { <-done; client.Close() }() // returns once the write is over
				}
				data := bytes.Repeat([]byte("x"), 640_000)
				var err error
				start := time.Now()
				if row.writev {
					c.mu.Lock()
					bufs := net.Buffers{data[:300_000], data[300_000:]}
					err = c.writevLocked(&bufs)
					c.mu.Unlock()
				} else {
					_, err = c.Write(data)
				}
				took := time.Since(start)
				close(done)
				server.Close()
				n := <-read
				switch {
				case row.gone && !errors.Is(err, os.ErrDeadlineExceeded):
					t.Errorf("write = %v after %v, %d bytes read; want the deadline exceeded", err, took, n)
				case !row.gone && (err != nil || n != len(data)):
					t.Errorf("write = %v after %v, %d bytes read; want all %d", err, took, n, len(data))
				}
			})
		}
	})

	t.Run("512 KiB lines at 400 kB/s", func(t *testing.T) {
		testWriteProgress(t)
	})
}

// testWriteProgress: lines of 512 KiB on both streams, read at 400 kB/s with a write wait of
// one second, make one frame take 1.3 s to write, and two queued frames 2.6 s.
func testWriteProgress(t *testing.T) {
	const lineLen = 512 << 10
	const lines = 1 // per stream
	logs := newLogWatch()
	// A long kill grace: the pipes hold the last lines when the shell exits, and, until issue
	// 8's first part, the time the pump waits on the client counts against the grace.
	s := NewServer(Config{WriteWait: time.Second, KillGrace: 30 * time.Second, Logger: slog.New(logs)})
	hs := httptest.NewUnstartedServer(s)
	// Small socket buffers, so that the kernel's buffers do not hide the time writes take.
	hs.Listener = smallBufListener{hs.Listener}
	hs.Start()
	t.Cleanup(func() {
		s.Shutdown(t.Context())
		hs.Close()
	})
	c := dial(t, strings.TrimPrefix(hs.URL, "http://"))
	c.c.(*net.TCPConn).SetReadBuffer(64 << 10)
	c.connected()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	c.br.Reset(&pacedReader{r: c.c, perTick: 8000, tick: tick.C}) // 400 kB/s

	command := fmt.Sprintf(`x=$(head -c %d /dev/zero | tr '\0' a); for i in $(seq %d); do echo "$x"; echo "$x" >&2; done`, lineLen-1, lines)
	if r := c.call("execute", map[string]any{"command": command}); r.Error != nil {
		t.Fatalf("execute: %s", r.raw)
	}
	want := strings.Repeat("a", lineLen-1) + "\n"
	got := map[string]int{}
	start := time.Now()
	for {
		m, err := c.read()
		if err != nil {
			t.Fatalf("after %v and %v lines: %v (the session was dropped: %q)", time.Since(start).Round(time.Millisecond), got, err, logs.attrs("session closed", "cause"))
		}
		switch m.Method {
		case "process.output":
			if m.Params.Data != want || m.Params.Truncated {
				t.Fatalf("%s line %d: %d bytes, truncated %v; want %d bytes", m.Params.Type, got[m.Params.Type]+1, len(m.Params.Data), m.Params.Truncated, len(want))
			}
			got[m.Params.Type]++
			continue
		case "process.started":
			continue
		case "process.completed":
		default:
			t.Fatalf("unexpected %s", trim(m.raw))
		}
		if got["stdout"] != lines || got["stderr"] != lines || m.Params.Status != "completed" || m.Params.Error != nil {
			t.Fatalf("lines %v, completed %s; want %d lines per stream, completed", got, trim(m.raw), lines)
		}
		break
	}
	t.Logf("%d lines of %d bytes read in %v", 2*lines, lineLen, time.Since(start).Round(time.Millisecond))
	c.close()
}

// smallBufListener gives every connection it accepts a send buffer of 64 KiB.
type smallBufListener struct{ net.Listener }

func (l smallBufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetWriteBuffer(64 << 10)
	}
	return c, err
}
