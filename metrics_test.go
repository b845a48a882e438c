package ccexecutor

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestMetrics runs sessions through every way a run ends and a session is refused or dropped,
// then checks every series of /metrics by name and value, and that the text follows the
// Prometheus text format 0.0.4: a wrong label, a counter bumped at the wrong place or twice,
// a bucket that is not cumulative or a missing HELP line fails it.
func TestMetrics(t *testing.T) {
	t.Run("every run end and refusal", func(t *testing.T) {
		t.Parallel()
		const token = "s3cret"
		logs := newLogWatch()
		ts := newTestServer(t, Config{
			Token:        token,
			MaxSessions:  1,
			MaxLineBytes: 16,
			KillGrace:    200 * time.Millisecond,
			Logger:       slog.New(logs),
		})
		auth := http.Header{"Authorization": {"Bearer " + token}}
		open := func() *client {
			c, resp, err := tryDial(t, ts.addr, auth)
			if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("dial: %v %v", resp, err)
			}
			c.connected()
			return c
		}

		c := open()
		runs := []struct {
			command string
			params  map[string]any
			exit    int
		}{
			{`echo hello`, nil, 0},                                        // stdout: 1 line, 6 bytes
			{`echo oops >&2; echo out; exit 3`, nil, 3},                   // stderr: 1 line, 5 bytes; stdout: 4 bytes
			{`kill -KILL $$`, nil, -9},                                    // no output
			{`printf %040d 0`, nil, 0},                                    // stdout: 16 bytes and "...\n", truncated
			{`seq 1 3000`, nil, 0},                                        // stdout: 3000 lines, 13893 bytes, several flushes
			{`echo ready; sleep 30`, map[string]any{"timeout": 0.3}, -15}, // 6 bytes
		}
		for _, r := range runs {
			_, done := c.run(r.command, r.params)
			if *done.ExitCode != r.exit {
				t.Fatalf("%s: exit code %d, want %d", r.command, *done.ExitCode, r.exit)
			}
		}
		for _, command := range []string{
			`echo ready; sleep 30`,               // canceled, 6 bytes
			`trap "" TERM; echo ready; sleep 30`, // canceled after SIGKILL, 6 bytes
		} {
			c.start(command, nil)
			c.call("control", map[string]any{"type": "CANCEL"})
			c.until("process.completed")
		}
		// A variable longer than execve takes (128 KiB on Linux): the start fails with E2BIG.
		big := map[string]any{"BIG": strings.Repeat("x", 200<<10)}
		if r := c.call("execute", map[string]any{"command": "echo never", "env": big}); r.Error == nil || r.Error.Code != codeInternal {
			t.Fatalf("a command that cannot start: %.200s, want error %d", r.raw, codeInternal)
		}

		// Refusals, while c holds the only slot.
		d, resp, err := tryDial(t, ts.addr, auth)
		if err != nil {
			t.Fatal(err)
		}
		assertRefused(t, d, d.next())
		refusals := []struct {
			name   string
			host   string
			header http.Header
			code   int
		}{
			{"no token", "", nil, http.StatusUnauthorized},
			{"foreign origin", "", http.Header{"Authorization": auth["Authorization"], "Origin": {"http://evil.example"}}, http.StatusForbidden},
			{"foreign host", "evil.example", auth, http.StatusForbidden},
		}
		for _, r := range refusals {
			if _, resp = handshake(t, ts.addr, "/ws/mcp", r.host, r.header); resp.StatusCode != r.code {
				t.Errorf("%s: HTTP %s, want %d", r.name, resp.Status, r.code)
			}
		}
		if resp := get(t, ts, "/metrics", ""); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET /metrics without the token: HTTP %s, want 401", resp.Status)
		}
		req, _ := http.NewRequest("GET", ts.hs.URL+"/metrics", nil)
		req.Host = "evil.example"
		req.Header.Set("Authorization", "Bearer "+token)
		if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
			t.Errorf("GET /metrics for a foreign host: %v %v, want 403", resp, err)
		} else {
			resp.Body.Close()
		}
		if resp := get(t, ts, "/health", ""); resp.StatusCode != http.StatusOK {
			t.Errorf("GET /health without the token: HTTP %s, want 200", resp.Status)
		}
		c.close()

		// A client that leaves mid-run, then a run ended by the shutdown.
		logs.wait(t, "session closed", 1, 10*time.Second)
		c = open()
		c.start(`echo ready; sleep 30`, nil)
		c.close()
		logs.wait(t, "session closed", 2, 10*time.Second)
		c = open()
		c.start(`echo ready; sleep 30`, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := ts.Shutdown(ctx); err != nil {
			t.Fatal(err)
		}
		if _, resp = handshake(t, ts.addr, "/ws/mcp", "", auth); resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("after shutdown: HTTP %s, want 503", resp.Status)
		}

		got := scrape(t, ts, token)
		want := map[string]float64{
			`ccexecutor_sessions_active`:                                     0,
			`ccexecutor_sessions_admitted_total`:                             3,
			`ccexecutor_refused_total{reason="host"}`:                        2, // a handshake and /metrics
			`ccexecutor_refused_total{reason="origin"}`:                      1,
			`ccexecutor_refused_total{reason="token"}`:                       2, // a handshake and /metrics
			`ccexecutor_refused_total{reason="limit"}`:                       1,
			`ccexecutor_refused_total{reason="shutting_down"}`:               1,
			`ccexecutor_runs_started_total`:                                  10,
			`ccexecutor_runs_ended_total{cause="exit",class="0"}`:            3,
			`ccexecutor_runs_ended_total{cause="exit",class="nonzero"}`:      1,
			`ccexecutor_runs_ended_total{cause="exit",class="signal"}`:       1,
			`ccexecutor_runs_ended_total{cause="timeout",class="signal"}`:    1,
			`ccexecutor_runs_ended_total{cause="canceled",class="signal"}`:   2,
			`ccexecutor_runs_ended_total{cause="disconnect",class="signal"}`: 1,
			`ccexecutor_runs_ended_total{cause="shutdown",class="signal"}`:   1,
			`ccexecutor_start_failures_total`:                                1,
			`ccexecutor_kill_escalations_total`:                              1,
			`ccexecutor_output_lines_total{stream="stdout"}`:                 8 + 3000,
			`ccexecutor_output_bytes_total{stream="stdout"}`:                 6 + 4 + 20 + 5*6 + 13893,
			`ccexecutor_output_truncated_lines_total{stream="stdout"}`:       1,
			`ccexecutor_output_lines_total{stream="stderr"}`:                 1,
			`ccexecutor_output_bytes_total{stream="stderr"}`:                 5,
			`ccexecutor_run_duration_seconds_count`:                          10,
			`ccexecutor_first_output_seconds_count`:                          9, // every run but kill -KILL
		}
		checkSeries(t, got, want)
		// The timeout run took 0.3 s at least, the run that ignored SIGTERM the kill grace, 0.2 s.
		if s := got["ccexecutor_run_duration_seconds_sum"]; s < 0.5 {
			t.Errorf("ccexecutor_run_duration_seconds_sum = %v, want at least 0.5", s)
		}
		if n := got[`ccexecutor_run_duration_seconds_bucket{le="0.25"}`]; n > 9 {
			t.Errorf("%v runs took at most 0.25 s, want at most 9", n)
		}
	})

	t.Run("dropped by the write deadline", func(t *testing.T) {
		t.Parallel()
		logs := newLogWatch()
		ts := newTestServer(t, Config{WriteWait: 300 * time.Millisecond, KillGrace: 200 * time.Millisecond, Logger: slog.New(logs)})
		c := dial(t, ts.addr)
		c.connected()
		c.start("yes", nil) // from here on the client reads nothing
		logs.wait(t, "session closed", 1, 10*time.Second)
		got := scrape(t, ts, "")
		checkSeries(t, got, map[string]float64{
			`ccexecutor_sessions_admitted_total`:                             1,
			`ccexecutor_runs_started_total`:                                  1,
			`ccexecutor_runs_ended_total{cause="disconnect",class="signal"}`: 1,
			`ccexecutor_clients_dropped_total{reason="write_deadline"}`:      1,
			`ccexecutor_run_duration_seconds_count`:                          1,
			`ccexecutor_first_output_seconds_count`:                          1,
			`ccexecutor_output_lines_total{stream="stdout"}`:                 -1, // many
			`ccexecutor_output_bytes_total{stream="stdout"}`:                 -1,
		})
	})

	// A client that leaves while the writer waits on it is gone, not dropped by the deadline,
	// although the abort that ends the write moves the write's deadline.
	t.Run("left while the writer waits", func(t *testing.T) {
		t.Parallel()
		logs := newLogWatch()
		ts := newTestServer(t, Config{KillGrace: 200 * time.Millisecond, Logger: slog.New(logs)})
		c := dial(t, ts.addr)
		c.connected()
		c.start("yes", nil) // from here on the client reads nothing
		// Wait until the writer is blocked in a write to the client.
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		deadline := time.Now().Add(10 * time.Second)
		for !writerBlocked() {
			if time.Now().After(deadline) {
				t.Fatal("the session's writer did not block on the client within 10s")
			}
			<-tick.C
		}
		c.c.(*net.TCPConn).CloseWrite()
		logs.wait(t, "session closed", 1, 10*time.Second)
		checkSeries(t, scrape(t, ts, ""), map[string]float64{
			`ccexecutor_sessions_admitted_total`:                             1,
			`ccexecutor_runs_started_total`:                                  1,
			`ccexecutor_runs_ended_total{cause="disconnect",class="signal"}`: 1,
			`ccexecutor_run_duration_seconds_count`:                          1,
			`ccexecutor_first_output_seconds_count`:                          1,
			`ccexecutor_output_lines_total{stream="stdout"}`:                 -1,
			`ccexecutor_output_bytes_total{stream="stdout"}`:                 -1,
		})
	})

	t.Run("dropped by an unanswered Ping", func(t *testing.T) {
		t.Parallel()
		logs := newLogWatch()
		ts := newTestServer(t, Config{PingInterval: 50 * time.Millisecond, Logger: slog.New(logs)})
		c := dial(t, ts.addr)
		c.connected() // and then says nothing, not even a Pong
		logs.wait(t, "session closed", 1, 10*time.Second)
		checkSeries(t, scrape(t, ts, ""), map[string]float64{
			`ccexecutor_sessions_admitted_total`:              1,
			`ccexecutor_clients_dropped_total{reason="ping"}`: 1,
		})
	})

	t.Run("label and help escaping", func(t *testing.T) {
		var m metrics
		var b strings.Builder
		version := "v1 \\ \"quoted\"\nnext"
		m.write(&b, 0, buildInfo{version: version, goversion: "go1"})
		want := `ccexecutor_build_info{version="v1 \\ \"quoted\"\nnext",goversion="go1"} 1` + "\n"
		if !strings.Contains(b.String(), want) {
			t.Errorf("exposition lacks %q:\n%s", want, b.String())
		}
		got := parseExposition(t, b.String())
		if _, ok := got[`ccexecutor_build_info{version="`+version+`",goversion="go1"}`]; !ok {
			t.Errorf("the label did not read back as %q: %v", version, got)
		}
	})
}

// writerBlocked reports whether a goroutine waits for the network inside a write of a conn.
func writerBlocked() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		// conn.Write, or one of the writer's own: writeBatches, writevLocked, writeLocked.
		if strings.Contains(g, "[IO wait") && (strings.Contains(g, "ccexecutor.(*conn).Write(") || strings.Contains(g, "ccexecutor.(*conn).write")) {
			return true
		}
	}
	return false
}

// get requests path on ts with the bearer token, if not empty.
func get(t *testing.T, ts *testServer, path, token string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("GET", ts.hs.URL+path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// scrape gets /metrics and returns its samples, checked by parseExposition.
func scrape(t *testing.T, ts *testServer, token string) map[string]float64 {
	t.Helper()
	req, _ := http.NewRequest("GET", ts.hs.URL+"/metrics", nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: HTTP %s, %v", resp.Status, err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Errorf("Content-Type = %q", ct)
	}
	return parseExposition(t, string(body))
}

// checkSeries checks every counter and gauge in got: those in want must have their value there
// (-1: any value above 0), all others must be 0. Histogram buckets and sums, and build info, are
// checked by parseExposition and by the caller.
func checkSeries(t *testing.T, got, want map[string]float64) {
	t.Helper()
	for key := range want {
		if _, ok := got[key]; !ok {
			t.Errorf("no series %s", key)
		}
	}
	for key, v := range got {
		if strings.Contains(key, "_bucket{") || strings.HasSuffix(key, "_sum") || strings.HasPrefix(key, "ccexecutor_build_info{") {
			continue
		}
		w := want[key]
		if w == -1 && v > 0 {
			continue
		}
		if v != w {
			t.Errorf("%s = %v, want %v", key, v, w)
		}
	}
}

// Patterns of the text exposition format's lines.
var (
	helpLine   = regexp.MustCompile(`^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) ((?:[^\\\n]|\\[\\n])*)$`)
	typeLine   = regexp.MustCompile(`^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$`)
	sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$`)
	labelPair  = regexp.MustCompile(`^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^\\"\n]|\\[\\"n])*)"(?:,|$)`)
)

// parseExposition checks that text follows the text format 0.0.4 as the server writes it, and
// returns its samples by name and labels, the label values unescaped: every family has one HELP
// and then one TYPE line before its samples, which follow together; counters end in _total;
// label values escape only backslash, double quote and newline; a histogram's buckets rise in
// le, are cumulative, end in +Inf, which equals _count, and come with a _sum.
func parseExposition(t *testing.T, text string) map[string]float64 {
	t.Helper()
	samples := make(map[string]float64)
	if !strings.HasSuffix(text, "\n") {
		t.Errorf("exposition does not end in a newline")
	}
	var (
		family, typ string
		help        = make(map[string]bool)
		seen        = make(map[string]bool) // families whose samples are over
		nSamples    int
		lastLE      float64
		lastBucket  float64
		inf         = -1.0 // the +Inf bucket of the histogram being read, or -1
		hasSum      bool
	)
	endFamily := func() {
		if family == "" {
			return
		}
		if nSamples == 0 {
			t.Errorf("family %s has no samples", family)
		}
		if typ == "histogram" && (inf < 0 || !hasSum) {
			t.Errorf("histogram %s: +Inf bucket or _sum missing", family)
		}
		seen[family] = true
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if m := helpLine.FindStringSubmatch(line); m != nil {
			endFamily()
			if help[m[1]] || seen[m[1]] {
				t.Errorf("line %d: second HELP for %s", n, m[1])
			}
			help[m[1]], family, typ, nSamples, lastLE, lastBucket, inf, hasSum = true, m[1], "", 0, -1, 0, -1, false
			continue
		}
		if m := typeLine.FindStringSubmatch(line); m != nil {
			if m[1] != family || typ != "" {
				t.Errorf("line %d: TYPE of %s not right after its HELP", n, m[1])
			}
			if typ = m[2]; typ == "counter" && !strings.HasSuffix(family, "_total") {
				t.Errorf("line %d: counter %s does not end in _total", n, family)
			}
			continue
		}
		m := sampleLine.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("line %d: not HELP, TYPE or a sample: %q", n, line)
			continue
		}
		name, rawLabels := m[1], m[2]
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Errorf("line %d: value %q: %v", n, m[3], err)
		}
		suffix, ok := strings.CutPrefix(name, family)
		if typ == "" || !ok || suffix != "" && (typ != "histogram" || suffix != "_bucket" && suffix != "_sum" && suffix != "_count") {
			t.Errorf("line %d: sample %s outside its family (in %s, %s)", n, name, family, typ)
		}
		nSamples++
		key := name
		var labels []string
		le := ""
		for rest := rawLabels; rest != ""; {
			lm := labelPair.FindStringSubmatch(rest)
			if lm == nil {
				t.Errorf("line %d: malformed labels %q", n, rest)
				break
			}
			val := strings.NewReplacer(`\\`, `\`, `\"`, `"`, `\n`, "\n").Replace(lm[2])
			labels = append(labels, lm[1]+`="`+val+`"`)
			if lm[1] == "le" {
				le = val
			}
			rest = rest[len(lm[0]):]
		}
		if len(labels) > 0 {
			key += "{" + strings.Join(labels, ",") + "}"
		}
		if _, dup := samples[key]; dup {
			t.Errorf("line %d: second sample %s", n, key)
		}
		samples[key] = v
		switch suffix {
		case "_bucket":
			bound, err := strconv.ParseFloat(le, 64)
			switch {
			case le == "" || err != nil:
				t.Errorf("line %d: bucket le %q", n, le)
			case inf >= 0 || bound <= lastLE:
				t.Errorf("line %d: le %q after le %v", n, le, lastLE)
			case v < lastBucket:
				t.Errorf("line %d: bucket %v below the one before, %v: not cumulative", n, v, lastBucket)
			}
			lastLE, lastBucket = bound, v
			if le == "+Inf" {
				inf = v
			}
		case "_sum":
			hasSum = true
		case "_count":
			if v != inf {
				t.Errorf("line %d: %s = %v, want the +Inf bucket, %v", n, name, v, inf)
			}
		}
	}
	endFamily()
	return samples
}

// BenchmarkMetricsOutput measures what counting costs a line of output while output floods,
// from every core at once as from sessions that stream together.
func BenchmarkMetricsOutput(b *testing.B) {
	var m metrics
	line := []byte("a line of output of typical length, 48 bytes..\n")
	b.RunParallel(func(pb *testing.PB) {
		var first atomic.Int64
		count := m.stream("stdout", &first)
		for pb.Next() {
			count.line(line, 0, true)
		}
		count.flush()
	})
}

// TestMetricsReattach checks what /health and /metrics say of detached sessions: a session that
// lost its connection counts in active_sessions and in detached_sessions until it reattaches,
// and each detach, reattach (a takeover too) and refused reattach is counted, before the client
// reads connected. Without a window /health has no
// detached_sessions.
func TestMetricsReattach(t *testing.T) {
	logs := newLogWatch()
	ts := newTestServer(t, reattachConfig(t, Config{Logger: slog.New(logs)}, time.Minute))
	p := newCutProxy(t, ts.addr)
	c := rattach(t, p.addr())
	want := func(stage string, active, detached int, counts map[string]float64) {
		t.Helper()
		h := health(t, ts)
		got := -1 // no detached_sessions at all
		if h.Detached != nil {
			got = *h.Detached
		}
		if h.Active != active || got != detached {
			t.Errorf("%s: /health says %d active, %d detached (-1: none); want %d and %d", stage, h.Active, got, active, detached)
		}
		m := scrape(t, ts, "")
		counts["ccexecutor_sessions_active"] = float64(active)
		counts["ccexecutor_sessions_detached"] = float64(detached)
		for name, v := range counts {
			if m[name] != v {
				t.Errorf("%s: %s = %v, want %v", stage, name, m[name], v)
			}
		}
	}
	const detaches, reattaches, refusals = "ccexecutor_session_detaches_total", "ccexecutor_reattaches_total", `ccexecutor_refused_total{reason="resume"}`
	want("attached", 1, 0, map[string]float64{detaches: 0, reattaches: 0, refusals: 0})
	c.lose(p.last(), cutReset, logs, 1)
	want("detached", 1, 1, map[string]float64{detaches: 1, reattaches: 0, refusals: 0})
	assertResumeRefused(t, p.addr(), c.id, strings.Repeat("0", 32), "0", "unknown session or token")
	want("refused", 1, 1, map[string]float64{detaches: 1, reattaches: 0, refusals: 1})
	c.reattach(p.addr())
	want("reattached", 1, 0, map[string]float64{detaches: 1, reattaches: 1, refusals: 1})
	// A takeover of the live connection, which stays open until then: no session was detached.
	next := &rclient{t: t, id: c.id, token: c.token, tokens: c.tokens, received: c.received}
	next.reattach(p.addr())
	want("taken over", 1, 0, map[string]float64{detaches: 1, reattaches: 2, refusals: 1})

	if h := health(t, newTestServer(t, Config{})); h.Detached != nil {
		t.Errorf("without a window /health says detached_sessions %d; want no such key", *h.Detached)
	}
}
