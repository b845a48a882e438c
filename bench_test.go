package ccexecutor

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The benchmarks measure the streaming path piece by piece (readLines, appendOutput), the cost
// of starting a command, and the whole path over loopback. Run them with
//
//	go test -run '^$' -bench . -benchmem
//
// `ccexecutor bench` is the load tool for the targets that need many sessions or a separate
// server process; BENCHMARKS.md has the numbers.

// seqOutput is what `seq 1 n` prints.
func seqOutput(n int) []byte {
	var b []byte
	for i := 1; i <= n; i++ {
		b = append(strconv.AppendInt(b, int64(i), 10), '\n')
	}
	return b
}

// BenchmarkReadLines reads one input per iteration: the output of seq, 4 KiB lines, and one
// 16 MiB line through a 4 KiB limit, which must be cut and its rest discarded.
func BenchmarkReadLines(b *testing.B) {
	line4k := append(bytes.Repeat([]byte("a"), 4096), '\n')
	for _, bc := range []struct {
		name  string
		input []byte
		limit int
	}{
		{"seq", seqOutput(100_000), MaxLineBytes},
		{"4KiB", bytes.Repeat(line4k, 256), MaxLineBytes},
		{"huge", bytes.Repeat([]byte("b"), 16<<20), 4 << 10},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.input)))
			var lines int
			for b.Loop() {
				err := readLines(bytes.NewReader(bc.input), bc.limit, func(line []byte, dropped int, more bool) error {
					lines++
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(lines)/b.Elapsed().Seconds(), "lines/s")
		})
	}
}

// BenchmarkAppendOutput encodes one process.output per iteration into a reused buffer, as pump
// does; it should not allocate.
func BenchmarkAppendOutput(b *testing.B) {
	for _, bc := range []struct{ name, line string }{
		{"seq", "123456\n"},
		{"4KiB", strings.Repeat("a", 4096) + "\n"},
		{"utf8", strings.Repeat("grüße, 世界 ", 100) + "\n"},
		{"escapes", strings.Repeat(`{"k":"v\t"}`, 100) + "\n"},
		{"invalid", strings.Repeat("ok\xff", 100) + "\n"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.line)))
			line := []byte(bc.line)
			var frames []byte
			for b.Loop() {
				frames = appendOutputFrame(frames[:0], "stdout", line, 0, 0)
			}
		})
	}
}

// BenchmarkFirstOutput measures the time from asking for `echo hi` to its first output line:
// "exec" with the package's start alone, the floor set by the kernel; "exec-parallel" the same
// from 25 goroutines per CPU at once (50 on 2 CPUs), reporting the percentiles of that time;
// "server" through a session over loopback.
func BenchmarkFirstOutput(b *testing.B) {
	// echoHi starts `echo hi` and returns the time until its output can be read.
	echoHi := func(b *testing.B) time.Duration {
		t0 := time.Now()
		p, err := start(command{args: []string{"/bin/sh", "-c", "echo hi"}})
		if err != nil {
			b.Error(err)
			return 0
		}
		defer func() {
			io.Copy(io.Discard, p.stdout)
			p.wait()
			p.stdout.Close()
			p.stderr.Close()
		}()
		if _, err := p.stdout.Read(make([]byte, 64)); err != nil {
			b.Error(err)
		}
		return time.Since(t0)
	}
	b.Run("exec", func(b *testing.B) {
		for b.Loop() {
			echoHi(b)
		}
	})
	b.Run("exec-parallel", func(b *testing.B) {
		var mu sync.Mutex
		var times []time.Duration
		b.SetParallelism(25)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				d := echoHi(b)
				mu.Lock()
				times = append(times, d)
				mu.Unlock()
			}
		})
		slices.Sort(times)
		b.ReportMetric(float64(times[len(times)/2].Nanoseconds()), "p50-ns")
		b.ReportMetric(float64(times[len(times)*99/100].Nanoseconds()), "p99-ns")
	})
	b.Run("server", func(b *testing.B) {
		c := newBenchConn(b, Config{})
		var first time.Duration
		for b.Loop() {
			t0 := time.Now()
			c.execute("echo hi")
			for {
				p := c.next()
				if bytes.Contains(p, []byte(`"method":"process.output"`)) {
					first += time.Since(t0)
				}
				if bytes.Contains(p, []byte(`"method":"process.completed"`)) {
					break
				}
			}
		}
		b.ReportMetric(float64(first)/float64(b.N), "ns/first-output")
	})
}

// BenchmarkStream runs `seq 1 N` once per iteration through a session over loopback and checks
// that every line arrives, in order.
func BenchmarkStream(b *testing.B) {
	for _, row := range []struct {
		name string
		n    int
		cfg  Config
	}{
		{"lines=20000", 20_000, Config{}},
		{"lines=200000", 200_000, Config{}},
		// With a reattach window every message is held until a Pong acknowledges it.
		{"lines=200000/reattach", 200_000, Config{ReattachWindow: time.Minute}},
	} {
		n := row.n
		b.Run(row.name, func(b *testing.B) {
			c := newBenchConn(b, row.cfg)
			want := bytes.Split(seqOutput(n), []byte("\n"))
			for b.Loop() {
				c.execute(fmt.Sprintf("seq 1 %d", n))
				got := 0
				for {
					p := c.next()
					if rest, ok := bytes.CutPrefix(p, []byte(`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"`)); ok {
						if !bytes.HasPrefix(rest, want[got]) || !bytes.HasPrefix(rest[len(want[got]):], []byte(`\n"`)) {
							b.Fatalf("line %d: %s", got+1, p)
						}
						got++
					}
					if bytes.Contains(p, []byte(`"method":"process.completed"`)) {
						break
					}
				}
				if got != n {
					b.Fatalf("got %d lines, want %d", got, n)
				}
			}
			b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "lines/s")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n*b.N), "ns/line")
		})
	}
}

// benchConn is a minimal WebSocket client of a session on a server of its own, which the
// benchmark's cleanup shuts down.
type benchConn struct {
	b    *testing.B
	c    net.Conn
	br   *bufio.Reader
	skip int // length of the payload last returned, still in br
}

func newBenchConn(b *testing.B, cfg Config) *benchConn {
	cfg.Logger = slog.New(slog.DiscardHandler)
	srv := NewServer(cfg)
	hs := httptest.NewServer(srv)
	c := dialBench(b, hs.Listener.Addr().String())
	b.Cleanup(func() {
		c.c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		hs.Close()
	})
	if p := c.next(); !bytes.Contains(p, []byte(`"method":"connected"`)) {
		b.Fatalf("first frame %s", p)
	}
	return c
}

// dialBench opens a WebSocket connection to the server at addr; the caller closes it.
func dialBench(b *testing.B, addr string) *benchConn {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(5 * time.Minute))
	req, _ := http.NewRequest("GET", "http://"+addr+"/ws/mcp", nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	req.Header.Set("Sec-WebSocket-Version", "13")
	if err := req.Write(nc); err != nil {
		b.Fatal(err)
	}
	c := &benchConn{b: b, c: nc, br: bufio.NewReaderSize(nc, 64<<10)}
	resp, err := http.ReadResponse(c.br, req)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		b.Fatalf("handshake: %v %v", resp, err)
	}
	return c
}

// execute sends an execute request in a masked frame (the mask is zero: masking is a no-op).
func (c *benchConn) execute(command string) {
	p := fmt.Appendf(nil, `{"jsonrpc":"2.0","method":"execute","params":{"command":%q},"id":1}`, command)
	f := binary.BigEndian.AppendUint16([]byte{0x81, 0x80 | 126}, uint16(len(p)))
	if _, err := c.c.Write(append(append(f, 0, 0, 0, 0), p...)); err != nil {
		c.b.Fatal(err)
	}
}

// next returns the payload of the next data frame, valid until the next call.
func (c *benchConn) next() []byte {
	c.br.Discard(c.skip)
	for {
		h, err := c.br.Peek(2)
		if err != nil {
			c.b.Fatal(err)
		}
		op, n, hl := h[0]&0x0f, int(h[1]&0x7f), 2 // h is valid only until the next Peek
		switch n {
		case 126:
			h, err = c.br.Peek(4)
			n, hl = int(binary.BigEndian.Uint16(h[2:])), 4
		case 127:
			h, err = c.br.Peek(10)
			n, hl = int(binary.BigEndian.Uint64(h[2:])), 10
		}
		if err != nil || n > c.br.Size() {
			c.b.Fatalf("frame of %d bytes: %v", n, err)
		}
		c.br.Discard(hl)
		p, err := c.br.Peek(n)
		if err != nil {
			c.b.Fatal(err)
		}
		c.skip = n
		switch op {
		case opText:
			return p
		case opPing: // answered, as every client does: with a reattach window, the Pong acknowledges
			if _, err := c.c.Write(append([]byte{0x80 | opPong, 0x80 | byte(n), 0, 0, 0, 0}, p...)); err != nil {
				c.b.Fatal(err)
			}
		}
		c.br.Discard(n)
		c.skip = 0
	}
}
