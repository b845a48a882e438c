package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ccexecutor/ccexecutor"
	"golang.org/x/net/websocket"
)

const benchUsage = `Usage: ccexecutor bench [flags]

Opens --sessions sessions, then runs --command --runs times one after another in each, all
sessions at once, and reports lines/s, MB/s of output data (1 MB = 10^6 bytes of decoded
"data"), the time from sending execute to the run's first process.output (p50/p90/p99), the wall
time from the first execute to the last process.completed, and errors. When the command is
"seq 1 N" every stdout line is checked to be the next number. With --server-pid it also reports
the server's VmRSS (taken before the sessions close) and VmHWM from /proc.

With --noread D each session sends its execute and then never reads, for D: the server's RSS is
sampled every 100 ms, and /health tells when the server has dropped the sessions.

Flags:
`

// benchOptions is what a bench run does.
type benchOptions struct {
	url       string        // ws:// URL of the server
	command   string        // what each run executes
	sessions  int           // sessions open at once
	runs      int           // runs per session, one after another; 0 opens idle sessions
	timeout   time.Duration // bound on the whole run; every connection's deadline
	noRead    time.Duration // if set, send execute and read nothing for this long
	serverPID int           // if set, report this process's memory from /proc
}

// benchReport is the outcome of a bench run. Durations are in seconds or milliseconds as named.
type benchReport struct {
	Command     string   `json:"command"`
	Sessions    int      `json:"sessions"`
	Runs        int      `json:"runs"`  // runs that reached process.completed
	Lines       int64    `json:"lines"` // process.output notifications, stdout and stderr
	Bytes       int64    `json:"bytes"` // decoded data of those lines
	WallS       float64  `json:"wall_s"`
	LinesPerS   float64  `json:"lines_per_s"`
	MBPerS      float64  `json:"mb_per_s"`
	TTFOP50Ms   float64  `json:"ttfo_p50_ms"`
	TTFOP90Ms   float64  `json:"ttfo_p90_ms"`
	TTFOP99Ms   float64  `json:"ttfo_p99_ms"`
	TTFOMaxMs   float64  `json:"ttfo_max_ms"`
	Errors      int      `json:"errors"`
	ErrorSample []string `json:"error_sample,omitempty"`
	RSSKB       int64    `json:"server_rss_kb,omitempty"` // VmRSS; the maximum sampled with --noread
	HWMKB       int64    `json:"server_hwm_kb,omitempty"` // VmHWM at the end
	EndedAfterS float64  `json:"ended_after_s,omitempty"` // --noread: when /health first showed no session
}

// bench is the bench subcommand. It returns the exit code: 1 if any error was seen.
func bench(args []string) int {
	fs := flag.NewFlagSet("ccexecutor bench", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), benchUsage); fs.PrintDefaults() }
	var (
		o          benchOptions
		inProcess  = fs.Bool("inprocess", false, "start an in-process server on 127.0.0.1 and measure it (ignores --url)")
		asJSON     = fs.Bool("json", false, "print the report as one JSON object")
		cpuProfile = fs.String("cpuprofile", "", "write a CPU profile of this process (client, and server if --inprocess) to `file`")
	)
	fs.StringVar(&o.url, "url", "ws://127.0.0.1:8003/ws/mcp", "server URL")
	fs.StringVar(&o.command, "command", "seq 1 200000", "command each run executes")
	fs.IntVar(&o.sessions, "sessions", 1, "concurrent sessions")
	fs.IntVar(&o.runs, "runs", 1, "runs per session, one after another (0: open idle sessions)")
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "give up after this long")
	fs.DurationVar(&o.noRead, "noread", 0, "send execute, then do not read for this long (a stuck client)")
	fs.IntVar(&o.serverPID, "server-pid", 0, "report VmRSS and VmHWM of this server process")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if o.sessions < 1 || o.sessions > 10000 || o.runs < 0 || o.runs > 1e6 || o.timeout <= 0 || fs.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "ccexecutor bench: need 1 <= --sessions <= 10000, 0 <= --runs <= 1e6, --timeout > 0, no arguments")
		return 2
	}
	if *inProcess {
		u, stop, err := startServer(ccexecutor.Config{})
		if err != nil {
			fmt.Fprintf(os.Stderr, "ccexecutor bench: %v\n", err)
			return 1
		}
		defer stop()
		o.url = u
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintf(os.Stderr, "ccexecutor bench: %v\n", err)
			return 1
		}
		defer f.Close()
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	rep, err := runBench(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ccexecutor bench: %v\n", err)
		return 1
	}
	if *asJSON {
		json.NewEncoder(os.Stdout).Encode(rep)
	} else {
		rep.print(os.Stdout)
	}
	if rep.Errors > 0 {
		return 1
	}
	return 0
}

// startServer starts a server with cfg on a loopback port of this process and returns its URL
// and a function that shuts it down.
func startServer(cfg ccexecutor.Config) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	srv := ccexecutor.NewServer(cfg)
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan struct{})
	go func() { hs.Serve(ln); close(served) }() // returns once hs.Shutdown has closed ln
	stop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), ccexecutor.KillGrace+time.Second)
		defer cancel()
		hs.Shutdown(ctx)
		srv.Shutdown(ctx)
		<-served
	}
	return "ws://" + ln.Addr().String() + "/ws/mcp", stop, nil
}

// runBench opens the sessions, runs the load and reports. An error means the sessions could
// not be opened; what goes wrong later is counted in the report.
func runBench(o benchOptions) (*benchReport, error) {
	deadline := time.Now().Add(o.timeout)
	clients := make([]*client, o.sessions)
	errs := make([]error, o.sessions)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() { clients[i], errs[i] = dial(o.url, deadline, o.noRead == 0) }) // returns once connected, or at the deadline
	}
	wg.Wait()
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.close()
			}
		}
	}()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	rep := &benchReport{Command: o.command, Sessions: o.sessions}
	if o.noRead > 0 {
		return rep, flood(o, clients, rep)
	}
	want := seqCount(o.command)
	stats := make([]runStats, len(clients))
	start := time.Now()
	for i, c := range clients {
		wg.Go(func() { stats[i] = c.runAll(o.command, o.runs, want) }) // returns after runs runs, or at the first failure
	}
	wg.Wait()
	wall := time.Since(start)
	if o.serverPID > 0 {
		rep.RSSKB, rep.HWMKB = memory(o.serverPID)
	}

	var ttfo []time.Duration
	for _, s := range stats {
		rep.Runs += s.runs
		rep.Lines += s.lines
		rep.Bytes += s.bytes
		ttfo = append(ttfo, s.ttfo...)
		rep.Errors += len(s.errs)
		for _, err := range s.errs {
			if len(rep.ErrorSample) < 5 {
				rep.ErrorSample = append(rep.ErrorSample, err.Error())
			}
		}
	}
	rep.WallS = wall.Seconds()
	rep.LinesPerS = float64(rep.Lines) / wall.Seconds()
	rep.MBPerS = float64(rep.Bytes) / 1e6 / wall.Seconds()
	slices.Sort(ttfo)
	rep.TTFOP50Ms, rep.TTFOP90Ms, rep.TTFOP99Ms = ms(percentile(ttfo, 50)), ms(percentile(ttfo, 90)), ms(percentile(ttfo, 99))
	if len(ttfo) > 0 {
		rep.TTFOMaxMs = ms(ttfo[len(ttfo)-1])
	}
	return rep, nil
}

// flood sends the command on every session and then reads nothing, sampling the server's
// memory and its session count (of all its clients) every 100 ms until o.noRead has passed.
func flood(o benchOptions, clients []*client, rep *benchReport) error {
	for _, c := range clients {
		if err := c.execute(1, o.command); err != nil {
			return err
		}
	}
	health := healthURL(o.url)
	start := time.Now()
	hc := &http.Client{Timeout: time.Second}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for ; time.Since(start) < o.noRead; <-t.C {
		if o.serverPID > 0 {
			// The kernel's RSS counters are per-CPU approximations, so a VmHWM read can trail
			// an earlier VmRSS read: the high-water mark is at least every RSS seen.
			rss, hwm := memory(o.serverPID)
			rep.RSSKB = max(rep.RSSKB, rss)
			rep.HWMKB = max(rep.HWMKB, hwm, rep.RSSKB)
		}
		if rep.EndedAfterS == 0 && activeSessions(hc, health) == 0 {
			rep.EndedAfterS = time.Since(start).Seconds()
		}
	}
	if rep.EndedAfterS == 0 {
		rep.Errors++
		rep.ErrorSample = append(rep.ErrorSample, "the server still held the sessions at the end")
	}
	return nil
}

// healthURL is the /health URL of the server of a ws:// or wss:// URL.
func healthURL(wsURL string) string {
	u, err := url.Parse(wsURL)
	if err != nil {
		return ""
	}
	u.Scheme = strings.Replace(u.Scheme, "ws", "http", 1)
	u.Path, u.RawQuery = "/health", ""
	return u.String()
}

// activeSessions asks the server's /health for its session count; -1 if it cannot tell.
func activeSessions(hc *http.Client, health string) int {
	resp, err := hc.Get(health)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var h struct {
		Active *int `json:"active_sessions"`
	}
	if json.NewDecoder(resp.Body).Decode(&h) != nil || h.Active == nil {
		return -1
	}
	return *h.Active
}

// memory returns VmRSS and VmHWM of process pid in kB, or zeros.
func memory(pid int) (rss, hwm int64) {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	for line := range strings.Lines(string(b)) {
		k, v, _ := strings.Cut(line, ":")
		n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			rss = n
		case "VmHWM":
			hwm = n
		}
	}
	return rss, hwm
}

// percentile is the nearest-rank p-th percentile of sorted d, or 0.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[max(0, int(math.Ceil(p/100*float64(len(d))))-1)]
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func (r *benchReport) print(w io.Writer) {
	fmt.Fprintf(w, "command    %q\n", r.Command)
	fmt.Fprintf(w, "sessions   %d, runs completed %d\n", r.Sessions, r.Runs)
	fmt.Fprintf(w, "lines      %d (%.0f lines/s)\n", r.Lines, r.LinesPerS)
	fmt.Fprintf(w, "data       %d bytes (%.1f MB/s)\n", r.Bytes, r.MBPerS)
	fmt.Fprintf(w, "wall       %.4f s\n", r.WallS)
	fmt.Fprintf(w, "first out  p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms\n", r.TTFOP50Ms, r.TTFOP90Ms, r.TTFOP99Ms, r.TTFOMaxMs)
	if r.RSSKB > 0 || r.HWMKB > 0 {
		fmt.Fprintf(w, "server     VmRSS %.1f MiB, VmHWM %.1f MiB\n", float64(r.RSSKB)/1024, float64(r.HWMKB)/1024)
	}
	if r.EndedAfterS > 0 {
		fmt.Fprintf(w, "ended      the server dropped the sessions after %.1f s\n", r.EndedAfterS)
	}
	fmt.Fprintf(w, "errors     %d\n", r.Errors)
	for _, e := range r.ErrorSample {
		fmt.Fprintf(w, "  %s\n", e)
	}
}

// seqCount returns N if command is "seq N" or "seq 1 N", whose output bench can check line by
// line; -1 otherwise.
func seqCount(command string) int {
	f := strings.Fields(command)
	if len(f) == 3 && f[0] == "seq" && f[1] == "1" {
		f = f[1:]
		f[0] = "seq"
	}
	if len(f) != 2 || f[0] != "seq" {
		return -1
	}
	n, err := strconv.Atoi(f[1])
	if err != nil || n < 0 {
		return -1
	}
	return n
}

// client is one session. It dials and sends through x/net/websocket, but reads the server's
// frames straight from the connection: x/net allocates a reader, a header buffer and the whole
// payload for every frame it receives, which costs more than the server spends on it.
type client struct {
	ws   *websocket.Conn
	nc   net.Conn
	br   *bufio.Reader // the connection past the handshake response
	buf  []byte        // a frame larger than br's buffer
	skip int           // bytes of br still to discard: the frame last returned
}

// dial opens a session and, if wait, reads its connected notification.
func dial(rawURL string, deadline time.Time, wait bool) (*client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	// The server accepts an Origin only when it names the host the client connected to.
	cfg, err := websocket.NewConfig(rawURL, "http://"+u.Host)
	if err != nil {
		return nil, err
	}
	nc, err := net.DialTimeout("tcp", u.Host, time.Until(deadline))
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(deadline)
	hc := &handshakeConn{Conn: nc}
	ws, err := websocket.NewClient(cfg, hc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	hc.done = true
	c := &client{ws: ws, nc: nc, br: bufio.NewReaderSize(nc, 64<<10)}
	if !wait {
		return c, nil
	}
	p, err := c.next()
	if err == nil && !bytes.Contains(p, []byte(`"method":"connected"`)) {
		err = fmt.Errorf("refused: %s", p)
	}
	if err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

func (c *client) close() { c.ws.Close() }

// handshakeConn gives x/net's handshake one byte per Read until done, so that its buffered
// reader holds nothing past the handshake response and the frames can be read from the
// connection itself.
type handshakeConn struct {
	net.Conn
	done bool
}

func (h *handshakeConn) Read(p []byte) (int, error) {
	if !h.done && len(p) > 1 {
		p = p[:1]
	}
	return h.Conn.Read(p)
}

// next returns the payload of the next text frame, valid until the next call, and answers the
// Pings on its way. The server neither masks nor fragments its frames.
func (c *client) next() ([]byte, error) {
	c.br.Discard(c.skip)
	c.skip = 0
	for {
		h, err := c.br.Peek(2)
		if err != nil {
			return nil, err
		}
		op, n, hl := h[0]&0x0f, int64(h[1]&0x7f), 2
		if h[0]&0x80 == 0 || h[1]&0x80 != 0 {
			return nil, fmt.Errorf("unexpected frame header %x", h)
		}
		switch n {
		case 126:
			if h, err = c.br.Peek(4); err != nil {
				return nil, err
			}
			n, hl = int64(binary.BigEndian.Uint16(h[2:])), 4
		case 127:
			if h, err = c.br.Peek(10); err != nil {
				return nil, err
			}
			n, hl = int64(binary.BigEndian.Uint64(h[2:])), 10
		}
		if n > 64<<20 {
			return nil, fmt.Errorf("frame of %d bytes", n)
		}
		c.br.Discard(hl)
		var p []byte
		if int(n) <= c.br.Size() {
			p, err = c.br.Peek(int(n)) // no copy: the frame is discarded by the next call
			c.skip = int(n)
		} else {
			c.buf = slices.Grow(c.buf[:0], int(n))[:n]
			_, err = io.ReadFull(c.br, c.buf)
			p = c.buf
		}
		switch {
		case err != nil:
			return nil, err
		case op == 0x8:
			return nil, fmt.Errorf("server closed the session: %q", p)
		case op == 0x1:
			return p, nil
		case op == 0x9:
			// The server drops a client that leaves a Ping unanswered; x/net answers only
			// within its own reads, so answer here through its writer.
			c.ws.PayloadType = websocket.PongFrame
			_, err = c.ws.Write(p)
			c.ws.PayloadType = websocket.TextFrame
			if err != nil {
				return nil, err
			}
		}
		c.br.Discard(c.skip)
		c.skip = 0
	}
}

// execute sends an execute request.
func (c *client) execute(id int, command string) error {
	req, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "method": "execute", "params": map[string]string{"command": command}, "id": id})
	_, err := c.ws.Write(req)
	return err
}

// runStats is what one session saw.
type runStats struct {
	runs         int
	lines, bytes int64
	ttfo         []time.Duration // per run with output: execute sent to first process.output
	errs         []error
}

// runAll runs command runs times, one after another. want is the N of a "seq 1 N" command, or
// -1. It stops at the first error.
func (c *client) runAll(command string, runs, want int) runStats {
	var s runStats
	for i := range runs {
		if err := c.run(i+1, command, want, &s); err != nil {
			s.errs = append(s.errs, fmt.Errorf("run %d: %w", i+1, err))
			break
		}
		s.runs++
	}
	return s
}

// run executes command once and reads until its process.completed.
func (c *client) run(id int, command string, want int, s *runStats) error {
	if err := c.execute(id, command); err != nil {
		return err
	}
	sent := time.Now()
	first := true
	next := 1 // the next number a seq must print
	var line, expect []byte
	for {
		p, err := c.next()
		if err != nil {
			return err
		}
		switch kind(p) {
		case msgOutput:
			var stderr bool
			line, stderr, err = decodeOutput(p, line[:0])
			if err != nil {
				return err
			}
			if first {
				s.ttfo = append(s.ttfo, time.Since(sent))
				first = false
			}
			s.lines++
			s.bytes += int64(len(line))
			if want < 0 || stderr {
				continue
			}
			expect = append(strconv.AppendInt(expect[:0], int64(next), 10), '\n')
			if !bytes.Equal(line, expect) {
				return fmt.Errorf("stdout line %d is %q, want %q", next, line, expect)
			}
			next++
		case msgCompleted:
			if !bytes.Contains(p, []byte(`"status":"completed"`)) {
				return fmt.Errorf("run failed: %s", p)
			}
			if want >= 0 && next-1 != want {
				return fmt.Errorf("got %d of %d lines of seq", next-1, want)
			}
			return nil
		case msgError:
			return fmt.Errorf("server answered %s", p)
		}
	}
}

// Kinds of messages that bench tells apart.
const (
	msgOther = iota
	msgOutput
	msgCompleted
	msgError // an error response
)

// stdoutPrefix is how the server begins a process.output of stdout: kind and decodeOutput take
// a short cut for it, since searching JSON for a key that starts with a quote is slow.
var stdoutPrefix = []byte(`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"`)

// kind tells which message p is. The keys are matched as compact JSON, which the protocol
// promises; an unescaped `"` can not occur inside a string, so no value can fake them.
func kind(p []byte) int {
	switch {
	case bytes.HasPrefix(p, stdoutPrefix[:len(`{"jsonrpc":"2.0","method":"process.output"`)]) || bytes.Contains(p, []byte(`"method":"process.output"`)):
		return msgOutput
	case bytes.Contains(p, []byte(`"method":"process.completed"`)):
		return msgCompleted
	case bytes.Contains(p, []byte(`"error":{`)):
		return msgError
	}
	return msgOther
}

// decodeOutput appends the data of process.output p to line and tells whether it is stderr.
// A line without escapes, or whose only escape is its final "\n", is copied as it is; any other
// is left to encoding/json.
func decodeOutput(p, line []byte) ([]byte, bool, error) {
	fast := bytes.HasPrefix(p, stdoutPrefix)
	i := len(stdoutPrefix) - len(`"data":"`)
	if !fast {
		i = bytes.Index(p, []byte(`"data":"`))
	}
	if i < 0 {
		return line, false, fmt.Errorf("malformed process.output %.200s", p)
	}
	quote := i + len(`"data":`) // the string's opening quote
	s := p[quote+1:]
	end := bytes.IndexByte(s, '"') // the closing quote, unless a backslash comes first
	if end < 0 {
		return line, false, fmt.Errorf("malformed process.output %.200s", p)
	}
	switch bs := bytes.IndexByte(s[:end], '\\'); {
	case bs < 0:
		line = append(line, s[:end]...)
	case bs == end-2 && s[end-1] == 'n':
		line = append(append(line, s[:bs]...), '\n')
	default:
		for end = bs; end < len(s) && s[end] != '"'; end++ {
			if s[end] == '\\' {
				end++
			}
		}
		if end >= len(s) {
			return line, false, fmt.Errorf("malformed process.output %.200s", p)
		}
		var str string
		if err := json.Unmarshal(p[quote:quote+end+2], &str); err != nil {
			return line, false, err
		}
		line = append(line, str...)
	}
	stderr := []byte(`"type":"stderr"`)
	return line, !fast && (bytes.Contains(p[:i], stderr) || bytes.Contains(s[end:], stderr)), nil
}
