package main

import (
	"bufio"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestTokenFile checks that the token read from --token-file guards the server, with the
// file's trailing newline trimmed, and that it lets the server listen beyond loopback as a
// token does.
func TestTokenFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(path, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--addr", "127.0.0.1:0", "--token-file", path},
		{"--addr", "0.0.0.0:0", "--token-file", path}, // refused without a token
	} {
		t.Run(args[1], func(t *testing.T) {
			s := startServe(t, serveEnv(), args...)
			_, port, _ := net.SplitHostPort(s.addr)
			addr := net.JoinHostPort("127.0.0.1", port)
			for _, row := range []struct {
				auth string
				want int
			}{
				{"", http.StatusUnauthorized},
				{"Bearer s3cre", http.StatusUnauthorized},
				{"Bearer s3cret", http.StatusSwitchingProtocols},
			} {
				if got := handshakeStatus(t, addr, row.auth); got != row.want {
					t.Errorf("Authorization %q: HTTP %d, want %d", row.auth, got, row.want)
				}
			}
		})
	}
}

// handshakeStatus performs a WebSocket handshake on addr with the Authorization header auth,
// if not empty, and returns the HTTP status of the answer.
func handshakeStatus(t *testing.T, addr, auth string) int {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, runWait)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(runWait))
	req, _ := http.NewRequest("GET", "http://"+addr+"/ws/mcp", nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	req.Header.Set("Sec-WebSocket-Version", "13")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	if err := req.Write(nc); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(nc), req)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode
}
