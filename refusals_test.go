package ccexecutor

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestRefusalTrace guards against refusals that leave no trace: every refused handshake (401,
// 403, 503, session limit) and every refused command (-32002) must be logged at warn with the
// remote address and the reason, and a command line at most as 1 KiB and its length.
func TestRefusalTrace(t *testing.T) {
	long := "echo " + strings.Repeat("é", 1000) // 2005 bytes
	rows := []struct {
		name   string
		cfg    Config
		do     func(t *testing.T, ts *testServer)
		msg    string // the log message
		reason string
		attrs  map[string]string // further attributes the line must have
	}{
		{name: "Host", do: func(t *testing.T, ts *testServer) {
			handshake(t, ts.addr, "/ws/mcp", "evil.example", nil)
		}, msg: "request refused", reason: "forbidden: host is not a loopback name", attrs: map[string]string{"status": "403", "host": "evil.example"}},
		{name: "Origin", do: func(t *testing.T, ts *testServer) {
			handshake(t, ts.addr, "/ws/mcp", "", http.Header{"Origin": {"http://evil.example"}})
		}, msg: "handshake refused", reason: "forbidden: origin not allowed", attrs: map[string]string{"status": "403"}},
		{name: "two Origins", do: func(t *testing.T, ts *testServer) {
			handshake(t, ts.addr, "/ws/mcp", "", http.Header{"Origin": {"http://" + ts.addr, "http://" + ts.addr}})
		}, msg: "handshake refused", reason: "forbidden: more than one Origin", attrs: map[string]string{"status": "403"}},
		{name: "token", cfg: Config{Token: "s3cret"}, do: func(t *testing.T, ts *testServer) {
			handshake(t, ts.addr, "/ws/mcp?token=guess", "", nil)
		}, msg: "handshake refused", reason: "unauthorized", attrs: map[string]string{"status": "401"}},
		{name: "shutting down", do: func(t *testing.T, ts *testServer) {
			if err := ts.Shutdown(t.Context()); err != nil {
				t.Fatal(err)
			}
			handshake(t, ts.addr, "/ws/mcp", "", nil)
		}, msg: "handshake refused", reason: "server shutting down", attrs: map[string]string{"status": "503"}},
		{name: "session limit", cfg: Config{MaxSessions: 1}, do: func(t *testing.T, ts *testServer) {
			c := dial(t, ts.addr)
			c.connected()
			defer c.close()
			d := dial(t, ts.addr)
			d.next() // the -32001 error
		}, msg: "session refused", reason: "session limit exceeded", attrs: map[string]string{"close_code": "1008"}},
		{name: "command", cfg: Config{AllowedCommands: []string{"echo"}}, do: func(t *testing.T, ts *testServer) {
			c := dial(t, ts.addr)
			c.connected()
			c.call("execute", map[string]any{"command": "id; " + long})
			c.close()
		}, msg: "command refused", reason: "command not allowed", attrs: map[string]string{
			"error":   "shell syntax ';' is not allowed",
			"command": "id; echo " + strings.Repeat("é", 507) + "... (2009 bytes)", // 1,023 bytes: 1,024 would split an é
		}},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			logs := newLogWatch()
			row.cfg.Logger = slog.New(logs)
			ts := newTestServer(t, row.cfg)
			row.do(t, ts)
			logs.wait(t, row.msg, 1, 10*time.Second)
			logs.mu.Lock()
			defer logs.mu.Unlock()
			for _, r := range logs.recs {
				if r.Message != row.msg {
					continue
				}
				got := map[string]string{}
				r.Attrs(func(a slog.Attr) bool {
					got[a.Key] = a.Value.String()
					return true
				})
				if r.Level != slog.LevelWarn {
					t.Errorf("logged at %v, want warn", r.Level)
				}
				if !strings.HasPrefix(got["remote"], "127.0.0.1:") {
					t.Errorf("remote = %q, want the client's address", got["remote"])
				}
				if got["reason"] != row.reason {
					t.Errorf("reason = %q, want %q", got["reason"], row.reason)
				}
				for k, v := range row.attrs {
					if got[k] != v {
						t.Errorf("%s = %q, want %q", k, got[k], v)
					}
				}
			}
		})
	}
}

// TestLoggedText checks the cut of a long command line (or Host) in the log: whole up to 1 KiB, then
// cut at a character boundary at or before it, with the length.
func TestLoggedText(t *testing.T) {
	rows := []struct {
		name, line, want string
	}{
		{"short", "echo hi", "echo hi"},
		{"at the limit", strings.Repeat("x", 1024), strings.Repeat("x", 1024)},
		{"one byte over", strings.Repeat("x", 1025), strings.Repeat("x", 1024) + "... (1025 bytes)"},
		{"a character across the cut", strings.Repeat("x", 1023) + "é" + "y", strings.Repeat("x", 1023) + "... (1026 bytes)"},
		{"a character ending at the cut", strings.Repeat("x", 1022) + "é" + "y", strings.Repeat("x", 1022) + "é... (1025 bytes)"},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			if got := loggedText(row.line); got != row.want {
				t.Errorf("loggedText(%d bytes) = %q (%d bytes), want %q", len(row.line), got, len(got), row.want)
			}
		})
	}
}

// TestRefusalRateLimit guards against a log flood: a client that sends refused handshakes as
// fast as it can must get a few lines a second per reason into the log, not one per handshake,
// and the lines that are logged must say how many were left out. In a synctest bubble, 1,000
// handshakes at one instant write exactly refusalBurst lines per reason; one refusalEvery
// later, the next line counts the rest.
func TestRefusalRateLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		logs := newLogWatch()
		s := NewServer(Config{Token: "s3cret", Logger: slog.New(logs)})
		refuse := func(origin string) {
			r := httptest.NewRequest("GET", "/ws/mcp", nil)
			r.Header.Set("Upgrade", "websocket")
			r.Header.Set("Connection", "Upgrade")
			r.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
			r.Header.Set("Sec-WebSocket-Version", "13")
			if origin != "" {
				r.Header.Set("Origin", origin)
			}
			w := httptest.NewRecorder()
			s.ServeHTTP(w, r)
			if w.Code != http.StatusForbidden && w.Code != http.StatusUnauthorized {
				t.Fatalf("HTTP %d, want a refusal", w.Code)
			}
		}
		for range 1000 {
			refuse("http://evil.example")
		}
		for range 10 {
			refuse("") // another reason: no token
		}
		if got := logs.reasons("handshake refused"); got["forbidden: origin not allowed"] != refusalBurst || got["unauthorized"] != refusalBurst {
			t.Errorf("lines by reason after 1,000 refused origins and 10 missing tokens: %v, want %d of each", got, refusalBurst)
		}
		if held := logs.attrs("handshake refused", "suppressed"); len(held) != 0 {
			t.Errorf("suppressed = %v before anything was left out", held)
		}
		time.Sleep(refusalEvery - time.Nanosecond)
		refuse("http://evil.example")
		if got := logs.reasons("handshake refused"); got["forbidden: origin not allowed"] != refusalBurst {
			t.Errorf("a line was logged before the window ended: %v", got)
		}
		time.Sleep(time.Nanosecond)
		refuse("http://evil.example")
		refuse("")
		if got := logs.reasons("handshake refused"); got["forbidden: origin not allowed"] != refusalBurst+1 || got["unauthorized"] != refusalBurst+1 {
			t.Errorf("lines by reason in the next window: %v, want %d of each", got, refusalBurst+1)
		}
		want := []string{fmt.Sprint(1000 - refusalBurst + 1), fmt.Sprint(10 - refusalBurst)}
		if held := logs.attrs("handshake refused", "suppressed"); strings.Join(held, ",") != strings.Join(want, ",") {
			t.Errorf("suppressed = %v, want %v", held, want)
		}
	})
}

// TestRefusalFlood sends 1,000 refused handshakes over real connections, from several clients
// at once, and checks that the log grew by a number of lines bounded by the time it took, not
// by the number of handshakes.
func TestRefusalFlood(t *testing.T) {
	const total, clients = 1000, 8
	logs := newLogWatch()
	ts := newTestServer(t, Config{Logger: slog.New(logs)})
	start := time.Now()
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() { // returns after its share of handshakes
			for range total / clients {
				nc, _, resp, err := rawHandshake(ts.addr, "/ws/mcp", "", http.Header{"Origin": {fmt.Sprintf("http://evil%d.example", i)}})
				if err != nil {
					t.Error(err)
					return
				}
				nc.Close()
				if resp.StatusCode != http.StatusForbidden {
					t.Errorf("HTTP %s, want 403", resp.Status)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	lines, _ := logs.count("handshake refused")
	held := 0
	for _, n := range logs.attrs("handshake refused", "suppressed") {
		var k int
		fmt.Sscan(n, &k)
		held += k
	}
	// Each window of refusalEvery that began within elapsed lets refusalBurst lines through.
	bound := refusalBurst * (int(elapsed/refusalEvery) + 1)
	t.Logf("%d refused handshakes in %v: %d lines, %d counted as suppressed in them (bound %d)", total, elapsed, lines, held, bound)
	if lines > bound || lines < refusalBurst {
		t.Errorf("%d lines for %d refused handshakes in %v, want %d to %d", lines, total, elapsed, refusalBurst, bound)
	}
	if lines+held > total {
		t.Errorf("%d lines and %d suppressed, more than the %d refusals", lines, held, total)
	}
}

// reasons counts the records msg by their reason.
func (w *logWatch) reasons(msg string) map[string]int {
	n := map[string]int{}
	for _, r := range w.attrs(msg, "reason") {
		n[r]++
	}
	return n
}
