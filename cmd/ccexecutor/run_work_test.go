package main

// Tests of ccexecutor run at real work: long runs, slow consumers, TLS, errors of the server.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/ccexecutor/ccexecutor"
)

// execRunTo runs "ccexecutor run args..." to its end, within wait, with its stdout going to
// stdout, and returns its stderr and exit status.
func execRunTo(t *testing.T, wait time.Duration, stdout io.Writer, args ...string) runResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), wait)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, append([]string{"run"}, args...)...)
	cmd.Env = runEnv()
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("ccexecutor run %q did not end within %v; stderr %q", args, wait, stderr.String())
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("ccexecutor run %q: %v", args, err)
	}
	checkNoPanic(t, stderr.String())
	return runResult{"", stderr.String(), cmd.ProcessState.ExitCode()}
}

// checkSeq checks that out is "seq 1 n" followed by tail.
func checkSeq(t *testing.T, out []byte, n int, tail string) {
	t.Helper()
	var want bytes.Buffer
	for i := 1; i <= n; i++ {
		want.WriteString(strconv.Itoa(i))
		want.WriteByte('\n')
	}
	want.WriteString(tail)
	if !bytes.Equal(out, want.Bytes()) {
		i := 0
		for i < len(out) && i < want.Len() && out[i] == want.Bytes()[i] {
			i++
		}
		t.Errorf("stdout: %d bytes, want %d; they differ from byte %d: %.40q", len(out), want.Len(), i, out[i:])
	}
}

// slowWriter passes at most 4 KiB to w at each tick: a consumer slower than the command.
type slowWriter struct {
	w    io.Writer
	tick *time.Ticker
}

func (w *slowWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		<-w.tick.C
		k := min(len(p), 4<<10)
		w.w.Write(p[:k])
		p, n = p[k:], n+k
	}
	return n, nil
}

// TestRunKeepAlive checks that a run outlives the server's keep-alive Pings, whatever its
// output does: the client used to set a write deadline for its execute request and never clear
// it, so that its answer to the first Ping after requestWait (10 s) failed, and every run died
// there with "connection lost ... i/o timeout". The runs last longer than requestWait, with a
// Ping every 1.4 s: a busy connection gets one every other interval, and the last before
// the runs end comes at 11.2 s.
func TestRunKeepAlive(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for 12 s")
	}
	url := serveForRun(t, ccexecutor.Config{PingInterval: 1400 * time.Millisecond})
	const secs = 12
	for _, tt := range []struct {
		name    string
		command string
		slow    bool
		lines   int // the run prints seq 1 lines, then "end\n"
	}{
		{"silent", fmt.Sprintf("sleep %d; echo end", secs), false, 0},
		{"chatty", fmt.Sprintf("for i in $(seq 1 %d); do echo $i; sleep 0.1; done; echo end", secs*10), false, secs * 10},
		{"slow pipe", fmt.Sprintf("for i in $(seq 0 %d); do seq $((i*2000+1)) $((i*2000+2000)); sleep 0.1; done; echo end", secs*10-1), true, secs * 10 * 2000},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out bytes.Buffer
			var w io.Writer = &out
			if tt.slow {
				tick := time.NewTicker(20 * time.Millisecond)
				defer tick.Stop()
				w = &slowWriter{w: &out, tick: tick}
			}
			res := execRunTo(t, secs*time.Second+runWait, w, "--url", url, "--", tt.command)
			if res.code != 0 || res.stderr != "" {
				t.Fatalf("exit status %d, stderr %q; want 0 and nothing", res.code, res.stderr)
			}
			checkSeq(t, out.Bytes(), tt.lines, "end\n")
		})
	}
}

// TestRunHandshake checks the opening handshake the client sends: a WebSocket upgrade with the
// token, and no Origin. x/net/websocket always sends an Origin, made from the URL; behind a
// proxy that forwards another Host, the server rightly refused it with 403.
func TestRunHandshake(t *testing.T) {
	got := make(chan *http.Request, 1)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r
		http.Error(w, "recorded", http.StatusForbidden)
	}))
	t.Cleanup(hs.Close)
	res := execRun(t, runEnv(), "--url", runURL(hs)+"?x=1", "--token", "s3cret", "--", "true")
	checkRunFailure(t, res, exitRefused, "HTTP 403 Forbidden: recorded")
	r := <-got
	if o, ok := r.Header["Origin"]; ok {
		t.Errorf("the client sent Origin: %q; want none", o)
	}
	for _, tt := range []struct{ field, want string }{
		{"Upgrade", "websocket"},
		{"Connection", "Upgrade"},
		{"Sec-WebSocket-Version", "13"},
		{"Authorization", "Bearer s3cret"},
	} {
		if v := r.Header.Get(tt.field); !strings.EqualFold(v, tt.want) {
			t.Errorf("%s: %q, want %q", tt.field, v, tt.want)
		}
	}
	if k, err := base64.StdEncoding.DecodeString(r.Header.Get("Sec-WebSocket-Key")); err != nil || len(k) != 16 {
		t.Errorf("Sec-WebSocket-Key %q is not 16 bytes in base64", r.Header.Get("Sec-WebSocket-Key"))
	}
	if r.Method != "GET" || r.URL.RequestURI() != "/ws/mcp?x=1" || r.Host != strings.TrimPrefix(hs.URL, "http://") {
		t.Errorf("request %s %s, Host %s; want GET /ws/mcp?x=1 to %s", r.Method, r.URL.RequestURI(), r.Host, hs.URL)
	}
}

// TestRunSlowConsumer checks that a stdout that takes nothing for longer than the server's
// write wait and keep-alive (a pager left on its first page) neither stalls the server nor
// loses the run: the client reads ahead, answering Pings, and prints everything once stdout
// takes it. It used to stop reading with stdout, so the server dropped it as gone and killed
// the command.
func TestRunSlowConsumer(t *testing.T) {
	url := serveForRun(t, ccexecutor.Config{WriteWait: time.Second, PingInterval: time.Second})
	// The command prints 1.3 MB (21 MB of frames), then tells the test on fifo that it is done,
	// 2.5 s later: stdout has been blocked for longer than the write wait and two Pings then.
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done, err := os.OpenFile(fifo, os.O_RDWR, 0) // read-write: opening does not wait for the writer
	if err != nil {
		t.Fatal(err)
	}
	defer done.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	const n = 200000
	cmd := exec.Command(binPath, "run", "--url", url, "--", fmt.Sprintf("seq 1 %d; sleep 2.5; echo done > %s; echo end", n, fifo))
	cmd.Env = runEnv()
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = pw, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()

	done.SetReadDeadline(time.Now().Add(runWait))
	line, err := bufio.NewReader(done).ReadString('\n')
	if err != nil || line != "done\n" {
		t.Fatalf("the command did not finish while stdout was blocked: %q, %v", line, err)
	}
	out, err := io.ReadAll(pr)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	checkNoPanic(t, stderr.String())
	if code := cmd.ProcessState.ExitCode(); code != 0 || stderr.Len() != 0 {
		t.Errorf("exit status %d, stderr %q; want 0 and nothing", code, stderr.String())
	}
	checkSeq(t, out, n, "end\n")
}

// TestRunCutFrame checks that a connection that ends inside a frame is reported as lost, not
// as the server's mistake: x/net/websocket took the part of a frame that came as the frame,
// so that a run piped into a pager for longer than the server's write wait, whose last frame
// the server cut short when it gave up, ended with "invalid frame from the server: unexpected
// end of JSON input".
func TestRunCutFrame(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { // returns after one session
		defer close(served)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(runWait))
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acceptKey(req.Header.Get("Sec-WebSocket-Key")))
		c.Write(serverFrameBytes(`{"jsonrpc":"2.0","method":"connected","params":{}}`))
		readClientFrame(br) // execute
		c.Write(serverFrameBytes(`{"jsonrpc":"2.0","result":{"status":"started","pid":7,"pgid":7},"id":1}`))
		c.Write(serverFrameBytes(`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"whole\n","truncated":false}}`))
		cut := serverFrameBytes(`{"jsonrpc":"2.0","method":"process.output","params":{"type":"stdout","data":"cut\n","truncated":false}}`)
		c.Write(cut[:len(cut)/2])
	}()
	t.Cleanup(func() { ln.Close(); <-served })
	res := execRun(t, runEnv(), "--url", "ws://"+ln.Addr().String()+"/ws/mcp", "--", "true")
	checkRunFailure(t, res, exitLost, "connection lost before the command completed: it ended inside a frame")
	if res.stdout != "whole\n" {
		t.Errorf("stdout = %q, want %q", res.stdout, "whole\n")
	}
}

// acceptKey is the Sec-WebSocket-Accept of key.
func acceptKey(key string) string {
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// serverFrameBytes is text as an unmasked text frame.
func serverFrameBytes(text string) []byte {
	b := []byte{0x81}
	if n := len(text); n <= 125 {
		b = append(b, byte(n))
	} else {
		b = binary.BigEndian.AppendUint16(append(b, 126), uint16(n))
	}
	return append(b, text...)
}

// readClientFrame reads and discards a masked frame of the client's.
func readClientFrame(br *bufio.Reader) {
	h := make([]byte, 2)
	io.ReadFull(br, h)
	n := int64(h[1] & 0x7f)
	switch n {
	case 126:
		io.ReadFull(br, h)
		n = int64(binary.BigEndian.Uint16(h))
	case 127:
		b := make([]byte, 8)
		io.ReadFull(br, b)
		n = int64(binary.BigEndian.Uint64(b))
	}
	io.CopyN(io.Discard, br, 4+n)
}

// TestRunServerErrors checks the statuses of the answers that are not a run: any error the
// server answers before the command starts ends the client with 122, even one without an id,
// which is all the server can send for a request too large to read (the client used to wait
// for an answer with its id, for ever); and an HTTP server that is not a ccexecutor server
// ends it with 120, as the help says (it used to be 121, for a refused session).
func TestRunServerErrors(t *testing.T) {
	small := serveForRun(t, ccexecutor.Config{MaxMessageBytes: 256})
	execute := func(n int) string { // a command whose execute request is n bytes
		return "echo " + strings.Repeat("x", n-len(`{"jsonrpc":"2.0","method":"execute","params":{"command":"echo "},"id":1}`))
	}
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "<html>hello</html>")
	}))
	t.Cleanup(plain.Close)
	ok := serveForRun(t, ccexecutor.Config{})
	for _, tt := range []struct {
		name, url, command string
		code               int
		want               string
	}{
		{"request over the message limit", small, execute(257), exitRequest, "server refused the command: "},
		{"request at the message limit", small, execute(256), 0, ""},
		{"404", strings.TrimSuffix(ok, "/ws/mcp") + "/nope", "true", exitUnreachable, "HTTP 404 Not Found"},
		{"plain web server", runURL(plain), "true", exitUnreachable, "no ccexecutor server at " + runURL(plain) + ": HTTP 200 OK: <html>hello</html>"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := execRun(t, runEnv(), "--url", tt.url, "--", tt.command)
			if tt.code == 0 {
				if res.code != 0 || !strings.HasPrefix(res.stdout, "xxx") {
					t.Errorf("exit status %d, stdout %q, stderr %q; want 0 and the x's", res.code, res.stdout, res.stderr)
				}
				return
			}
			checkRunFailure(t, res, tt.code, tt.want)
		})
	}
}

// TestRunTLS checks wss:// with a certificate the system does not trust: refused with a hint
// at the flags, accepted with --cacert or --insecure-skip-tls-verify.
func TestRunTLS(t *testing.T) {
	dir := t.TempDir()
	caPEM, cert := testCert(t, "127.0.0.1")
	otherPEM, other := testCert(t, "other.invalid")
	caFile, otherFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "other.pem")
	os.WriteFile(caFile, caPEM, 0o600)
	os.WriteFile(otherFile, otherPEM, 0o600)
	notPEM := filepath.Join(dir, "not.pem")
	os.WriteFile(notPEM, []byte("hello"), 0o600)

	serveTLS := func(cert tls.Certificate) string {
		srv := ccexecutor.NewServer(ccexecutor.Config{Logger: slog.New(slog.DiscardHandler)})
		hs := httptest.NewUnstartedServer(srv)
		hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		hs.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are the point
		hs.StartTLS()
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), runWait)
			defer cancel()
			srv.Shutdown(ctx)
			hs.Close()
		})
		return "wss" + strings.TrimPrefix(hs.URL, "https") + "/ws/mcp"
	}
	url, wrongName := serveTLS(cert), serveTLS(other)
	for _, tt := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"untrusted", []string{"--url", url}, exitUnreachable, "certificate signed by unknown authority (give the certificate of the CA that signed it with --cacert FILE, or skip the check with --insecure-skip-tls-verify)"},
		{"cacert", []string{"--url", url, "--cacert", caFile}, 0, ""},
		{"insecure", []string{"--url", url, "--insecure-skip-tls-verify"}, 0, ""},
		{"wrong name", []string{"--url", wrongName, "--cacert", otherFile}, exitUnreachable, "(use the host name the certificate names in --url, or --insecure-skip-tls-verify to skip the check)"},
		{"cacert missing", []string{"--url", url, "--cacert", filepath.Join(dir, "nope.pem")}, exitUsage, "--cacert: open "},
		{"cacert not PEM", []string{"--url", url, "--cacert", notPEM}, exitUsage, "--cacert: no PEM certificate in "},
		{"cacert without TLS", []string{"--url", "ws://127.0.0.1:1/ws/mcp", "--cacert", caFile}, exitUsage, "--cacert and --insecure-skip-tls-verify are for a wss:// URL"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := execRun(t, runEnv(), append(tt.args, "--", "echo in")...)
			if tt.code == 0 {
				if res.code != 0 || res.stdout != "in\n" || res.stderr != "" {
					t.Errorf("exit status %d, stdout %q, stderr %q; want 0 and %q", res.code, res.stdout, res.stderr, "in\n")
				}
				return
			}
			checkRunFailure(t, res, tt.code, tt.want)
		})
	}
}

// testCert makes a self-signed CA certificate for hosts (IP addresses or names) and returns
// it in PEM, and as the certificate of a TLS server.
func testCert(t *testing.T, hosts ...string) ([]byte, tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "ccexecutor test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	for _, host := range hosts {
		if ip := net.ParseIP(host); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, host)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestInboxReadAhead checks the bound of the client's read-ahead: frames are taken in while
// fewer than readAhead bytes are held, and the reader waits, so that the server waits too,
// once readAhead bytes are held, until printed frames are released.
func TestInboxReadAhead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		in := newInbox()
		quit := make(chan struct{})
		put := func(n int, err error) bool { // puts one frame of n bytes
			b := make([]byte, n)
			return in.put([][]byte{b}, b, err, quit)
		}
		if !put(readAhead-1, nil) {
			t.Fatal("put returned false")
		}
		returned := make(chan bool, 1)
		go func() { returned <- put(1, nil) }() // returns once the first frame is released
		synctest.Wait()
		select {
		case <-returned:
			t.Fatalf("put returned while %d bytes were held", readAhead)
		default:
		}
		frames, chunks, err := in.take()
		if len(frames) != 2 || len(chunks) != 2 || err != nil {
			t.Fatalf("take: %d frames, %d chunks, %v; want 2, 2 and nil", len(frames), len(chunks), err)
		}
		synctest.Wait()
		select {
		case <-returned:
			t.Fatal("put returned before the taken frames were released")
		default:
		}
		in.done(chunks[:1]) // 1 byte is still held
		if ok := <-returned; !ok {
			t.Fatal("put returned false")
		}
		in.done(chunks[1:])
		in.put(nil, nil, io.EOF, quit)
		if frames, _, err := in.take(); len(frames) != 0 || err != io.EOF {
			t.Fatalf("take: %d frames, %v; want none and EOF", len(frames), err)
		}

		// A reader waiting on a full inbox returns when the run is over.
		go func() { returned <- put(readAhead, nil) }() // returns once quit is closed
		synctest.Wait()
		close(quit)
		if ok := <-returned; ok {
			t.Fatal("put returned true after quit")
		}
	})
}
