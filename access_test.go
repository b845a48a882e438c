package ccexecutor

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestAccess guards the handshake: a web page in the user's browser (cross-site WebSocket
// hijacking), a DNS-rebinding page that reaches the loopback server under a foreign name, and a
// client without the operator's token must all be refused with an HTTP error and never get a
// session; a non-browser client, the server's own origin, an allowed origin and the right token
// must get one. Health stays open.
func TestAccess(t *testing.T) {
	open := newTestServer(t, Config{AllowedOrigins: []string{"http://app.example"}})
	locked := newTestServer(t, Config{Token: "s3cret"})
	plain := newTestServer(t, Config{}) // the default: no token, no allowed origins
	origin := func(o string) func(addr string) http.Header {
		return func(addr string) http.Header {
			return http.Header{"Origin": {strings.ReplaceAll(o, "ADDR", addr)}}
		}
	}
	bearer := func(tok string) func(string) http.Header {
		return func(string) http.Header { return http.Header{"Authorization": {"Bearer " + tok}} }
	}
	rows := []struct {
		name   string
		ts     *testServer
		target string                        // request target; default /ws/mcp
		host   string                        // Host header; default the server's address
		header func(addr string) http.Header // extra headers
		want   int                           // HTTP status
	}{
		{name: "no Origin", ts: open, want: http.StatusSwitchingProtocols},
		{name: "same origin", ts: open, header: origin("http://ADDR"), want: http.StatusSwitchingProtocols},
		{name: "same origin on /ws", ts: open, target: "/ws", header: origin("http://ADDR"), want: http.StatusSwitchingProtocols},
		{name: "allowed origin", ts: open, header: origin("http://app.example"), want: http.StatusSwitchingProtocols},
		{name: "Origin null", ts: open, header: origin("null"), want: http.StatusForbidden},
		{name: "foreign origin", ts: open, header: origin("http://evil.example"), want: http.StatusForbidden},
		{name: "look-alike origin", ts: open, header: origin("http://127.0.0.1.evil.example"), want: http.StatusForbidden},
		{name: "look-alike origin with port", ts: open, header: origin("http://ADDR.evil.example"), want: http.StatusForbidden},
		{name: "allowed origin as a prefix", ts: open, header: origin("http://app.example.evil.example"), want: http.StatusForbidden},
		{name: "allowed origin, other scheme", ts: open, header: origin("https://app.example"), want: http.StatusForbidden},
		{name: "same host, other port", ts: open, header: origin("http://127.0.0.1:1"), want: http.StatusForbidden},
		{name: "empty Origin", ts: open, header: origin(""), want: http.StatusForbidden},
		{name: "same host, scheme ftp", ts: open, header: origin("ftp://ADDR"), want: http.StatusForbidden},
		{name: "same host, scheme ws", ts: open, header: origin("ws://ADDR"), want: http.StatusForbidden},
		{name: "same host, no scheme", ts: open, header: origin("//ADDR"), want: http.StatusForbidden},
		{name: "same host, scheme https", ts: open, header: origin("https://ADDR"), want: http.StatusSwitchingProtocols},
		{name: "same host, scheme in upper case", ts: open, header: origin("HTTP://ADDR"), want: http.StatusSwitchingProtocols},
		{name: "allowed host, scheme ftp", ts: open, header: origin("ftp://app.example"), want: http.StatusForbidden},
		{name: "two Origins, both allowed", ts: open, header: func(addr string) http.Header {
			return http.Header{"Origin": {"http://" + addr, "http://app.example"}}
		}, want: http.StatusForbidden},
		{name: "two Origins, foreign second", ts: open, header: func(addr string) http.Header {
			return http.Header{"Origin": {"http://" + addr, "http://evil.example"}}
		}, want: http.StatusForbidden},
		{name: "Host localhost", ts: open, host: "localhost", want: http.StatusSwitchingProtocols},
		{name: "Host [::1]", ts: open, host: "[::1]:8003", want: http.StatusSwitchingProtocols},
		{name: "Host not loopback", ts: open, host: "evil.example", want: http.StatusForbidden},
		{name: "Host not loopback, with port", ts: open, host: "evil.example:8003", want: http.StatusForbidden},
		{name: "Host rebinding look-alike", ts: open, host: "127.0.0.1.evil.example", want: http.StatusForbidden},
		{name: "Host localhost look-alike", ts: open, host: "localhost.evil.example", want: http.StatusForbidden},
		{name: "Host foreign, Origin matching it", ts: open, host: "evil.example", header: origin("http://evil.example"), want: http.StatusForbidden},
		// With nothing configured, the Origin check still holds: only the server's own origin.
		{name: "default server, foreign origin", ts: plain, header: origin("http://evil.example"), want: http.StatusForbidden},
		{name: "default server, same origin", ts: plain, header: origin("http://ADDR"), want: http.StatusSwitchingProtocols},
		{name: "token missing", ts: locked, want: http.StatusUnauthorized},
		{name: "token wrong", ts: locked, header: bearer("s3cre"), want: http.StatusUnauthorized},
		{name: "token wrong, longer", ts: locked, header: bearer("s3cret2"), want: http.StatusUnauthorized},
		{name: "token without Bearer", ts: locked, header: func(string) http.Header { return http.Header{"Authorization": {"s3cret"}} }, want: http.StatusUnauthorized},
		{name: "token wrong in query", ts: locked, target: "/ws/mcp?token=nope", want: http.StatusUnauthorized},
		{name: "token empty in query", ts: locked, target: "/ws/mcp?token=", want: http.StatusUnauthorized},
		{name: "token Bearer", ts: locked, header: bearer("s3cret"), want: http.StatusSwitchingProtocols},
		{name: "token in query", ts: locked, target: "/ws/mcp?token=s3cret", want: http.StatusSwitchingProtocols},
		{name: "token in query on /ws", ts: locked, target: "/ws?token=s3cret", want: http.StatusSwitchingProtocols},
		{name: "token right, foreign origin", ts: locked, header: func(addr string) http.Header {
			return http.Header{"Authorization": {"Bearer s3cret"}, "Origin": {"http://evil.example"}}
		}, want: http.StatusForbidden},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			target := row.target
			if target == "" {
				target = "/ws/mcp"
			}
			var h http.Header
			if row.header != nil {
				h = row.header(row.ts.addr)
			}
			c, resp := handshake(t, row.ts.addr, target, row.host, h)
			if resp.StatusCode != row.want {
				t.Fatalf("HTTP %s, want %d", resp.Status, row.want)
			}
			if row.want == http.StatusSwitchingProtocols {
				c.connected()
				c.close()
				return
			}
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
			if up := resp.Header.Get("Upgrade"); up != "" || resp.Header.Get("Sec-WebSocket-Accept") != "" {
				t.Errorf("refusal carries Upgrade %q: the connection was upgraded", up)
			}
			if !strings.HasPrefix(string(body), map[int]string{403: "forbidden", 401: "unauthorized"}[row.want]) {
				t.Errorf("body %q", body)
			}
			if n := row.ts.sessions.len(); n != 0 {
				t.Errorf("sessions = %d after a refusal, want 0", n)
			}
		})
	}
	for _, path := range []string{"/health", "/healthz"} {
		t.Run("token not needed for "+path, func(t *testing.T) {
			resp, err := http.Get("http://" + locked.addr + path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var v map[string]any
			if err := json.NewDecoder(resp.Body).Decode(&v); err != nil || resp.StatusCode != http.StatusOK {
				t.Errorf("GET %s: %s, %v, %v; want 200 and JSON", path, resp.Status, v, err)
			}
		})
	}
}

// handshake performs a WebSocket handshake on addr with the request target target, the Host
// header host (the address when empty) and the extra headers h, and returns the response. Unlike
// tryDial it lets the test choose the path, the query and the Host.
func handshake(t *testing.T, addr, target, host string, h http.Header) (*client, *http.Response) {
	t.Helper()
	nc, br, resp, err := rawHandshake(addr, target, host, h)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	t.Cleanup(func() { nc.Close() })
	return &client{t: t, c: nc, br: br}, resp
}

// rawHandshake is handshake for callers without a *testing.T; the caller closes the connection.
func rawHandshake(addr, target, host string, h http.Header) (net.Conn, *bufio.Reader, *http.Response, error) {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, nil, err
	}
	key := make([]byte, 16)
	rand.Read(key)
	req, err := http.NewRequest("GET", "http://"+addr+target, nil)
	if err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	if host != "" {
		req.Host = host
	}
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString(key))
	req.Header.Set("Sec-WebSocket-Version", "13")
	for k, v := range h {
		req.Header[k] = v
	}
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	if err := req.Write(nc); err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	nc.SetDeadline(time.Time{})
	return nc, br, resp, nil
}
