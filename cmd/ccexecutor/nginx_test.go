package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// nginxReadTimeout replaces the proxy_read_timeout of contrib/nginx.conf in TestNginx: short,
// so that a run outlives it, and several times the instances' ping interval. nginxWindow is
// the instances' reattach window: long enough for a reattach, short enough for the clients of
// a killed instance to give up within runWait.
const (
	nginxReadTimeout = "2s"
	nginxPing        = "300ms"
	nginxWindow      = "3s"
)

// TestNginx puts two instances behind nginx configured by contrib/nginx.conf, with TLS, and
// runs sessions through it with the bundled client, as the README's "Scale out" advises: each
// session must get its exact output, a silent run must outlive proxy_read_timeout because the
// instances' Pings keep the connection busy, and killing one instance must fail only the
// sessions it held while new sessions go to the other. It is skipped when nginx is missing.
func TestNginx(t *testing.T) {
	nginx, err := exec.LookPath("nginx")
	if err != nil {
		nginx, err = exec.LookPath("/usr/sbin/nginx") // Debian's, often not on a user's PATH
	}
	if err != nil {
		t.Skip("nginx is not installed: skipping the test of contrib/nginx.conf through a real proxy (.ci/run installs nginx)")
	}
	dir := t.TempDir()
	certFile, keyFile, roots := writeCert(t, dir)
	port := freePort(t)
	proxyURL := "wss://127.0.0.1:" + port + "/ws/mcp"
	// Behind the proxy the instances see Host: localhost. ccexecutor run sends no Origin, as a
	// client that is not a browser, so the instances need no --allow-origin for it.
	a := startServe(t, serveEnv("INSTANCE=a"), "serve", "--addr", "127.0.0.1:0", "--ping-interval", nginxPing, "--instance", "a", "--reattach-window", nginxWindow)
	b := startServe(t, serveEnv("INSTANCE=b"), "serve", "--addr", "127.0.0.1:0", "--ping-interval", nginxPing, "--instance", "b", "--reattach-window", nginxWindow)
	startNginx(t, nginx, dir, port, certFile, keyFile, roots, a.addr, b.addr)
	env := runEnv()
	client := []string{"--url", proxyURL, "--cacert", certFile} // the test's own CA

	t.Run("100 sessions and a run longer than proxy_read_timeout", func(t *testing.T) {
		const sessions = 100
		jobs := make([]clientJob, sessions+1)
		for i := range sessions {
			jobs[i].command = fmt.Sprintf(`echo "$INSTANCE"; seq 1 100 | sed s/^/%d-/; echo %d-err >&2`, i, i)
		}
		long := &jobs[sessions]
		long.command = "sleep 3; echo slept" // silent for longer than nginxReadTimeout
		runJobs(env, client, jobs, 8)

		served := map[string]int{}
		for i, j := range jobs[:sessions] {
			if j.err != nil || j.code != 0 {
				t.Errorf("session %d: exit status %d, %v; stderr %q", i, j.code, j.err, j.stderr)
				continue
			}
			instance, rest, _ := strings.Cut(j.stdout, "\n")
			served[instance]++
			var want strings.Builder
			for n := 1; n <= 100; n++ {
				fmt.Fprintf(&want, "%d-%d\n", i, n)
			}
			if rest != want.String() || instance != "a" && instance != "b" {
				t.Errorf("session %d: stdout %q, want the instance's name, then %d-1 to %d-100", i, j.stdout, i, i)
			}
			if j.stderr != fmt.Sprintf("%d-err\n", i) {
				t.Errorf("session %d: stderr %q, want %q", i, j.stderr, fmt.Sprintf("%d-err\n", i))
			}
		}
		t.Logf("sessions served: %v", served)
		if served["a"] == 0 || served["b"] == 0 {
			t.Errorf("sessions served by each instance: %v, want both used", served)
		}
		if long.err != nil || long.code != 0 || long.stdout != "slept\n" {
			t.Errorf("a run silent for 3s, beyond proxy_read_timeout %s: exit status %d, %v, stdout %q, stderr %q",
				nginxReadTimeout, long.code, long.err, long.stdout, long.stderr)
		}
	})

	t.Run("reattaches go back to their instance", func(t *testing.T) {
		// Between the clients and nginx, a proxy resets each of the first connections after
		// 100 kB: each client reattaches through nginx, whose map must send it to the instance
		// that holds its session, the other refusing it.
		const sessions = 10
		plan := make([]cut, sessions)
		for i := range plan {
			plan[i] = cut{after: 100_000}
		}
		cp := newCutProxy(t, "127.0.0.1:"+port, plan...)
		cutClient := []string{"--url", "wss://" + cp.ln.Addr().String() + "/ws/mcp", "--cacert", certFile}
		jobs := make([]clientJob, sessions)
		for i := range jobs {
			jobs[i].command = fmt.Sprintf(`echo "$INSTANCE"; seq 1 20000 | sed s/^/%d-/`, i)
		}
		runJobs(env, cutClient, jobs, sessions)
		reattached := 0
		for i, j := range jobs {
			instance, rest, _ := strings.Cut(j.stdout, "\n")
			var want strings.Builder
			for n := 1; n <= 20000; n++ {
				fmt.Fprintf(&want, "%d-%d\n", i, n)
			}
			if j.err != nil || j.code != 0 || rest != want.String() || instance != "a" && instance != "b" {
				t.Errorf("session %d: exit status %d, %v, %d bytes of stdout, stderr %q; want 0 and its lines", i, j.code, j.err, len(j.stdout), j.stderr)
			}
			reattached += strings.Count(j.stderr, "reattached")
		}
		if cp.cutsMade() != sessions || reattached < sessions {
			t.Errorf("%d cuts made, %d reattaches; want %d of each at least", cp.cutsMade(), reattached, sessions)
		}
	})

	t.Run("an instance killed mid-way", func(t *testing.T) {
		// Sessions held until the file release exists, each saying which instance runs it.
		release := filepath.Join(dir, "release")
		// Creating it also ends the runs of the killed instance, whose groups no one ends.
		t.Cleanup(func() { os.WriteFile(release, nil, 0o644) })
		held := make([]*heldRun, 10)
		for i := range held {
			held[i] = startHeld(t, env, client, fmt.Sprintf(`echo "$INSTANCE"; while [ ! -e %s ]; do sleep 0.05; done; echo released`, release))
		}
		count := map[string]int{}
		for _, h := range held {
			h.instance = h.firstLine(t)
			count[h.instance]++
		}
		if count["a"] == 0 || count["b"] == 0 {
			t.Fatalf("held sessions by instance: %v, want both used", count)
		}
		a.cmd.Process.Kill()
		<-a.exited
		// The sessions a held fail as lost connections, once their clients have tried to
		// reattach for the window; b's go on.
		for _, h := range held {
			if h.instance != "a" {
				continue
			}
			code, stderr := h.finish(t)
			if code != exitLost || !strings.Contains(stderr, "connection lost") {
				t.Errorf("a session of the killed instance: exit status %d, stderr %q; want %d, connection lost", code, stderr, exitLost)
			}
		}
		// New sessions go to b, although a holds none now.
		jobs := make([]clientJob, 10)
		for i := range jobs {
			jobs[i].command = `echo "$INSTANCE"`
		}
		runJobs(env, client, jobs, 5)
		for i, j := range jobs {
			if j.err != nil || j.code != 0 || j.stdout != "b\n" {
				t.Errorf("new session %d after a was killed: exit status %d, %v, stdout %q, stderr %q; want b", i, j.code, j.err, j.stdout, j.stderr)
			}
		}
		if err := os.WriteFile(release, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, h := range held {
			if h.instance != "b" {
				continue
			}
			if code, stderr := h.finish(t); code != 0 || h.rest.String() != "released\n" {
				t.Errorf("a session of the surviving instance: exit status %d, stdout after the first line %q, stderr %q; want 0, released", code, h.rest.String(), stderr)
			}
		}
	})
}

// clientJob is one ccexecutor run through the proxy, and what it printed.
type clientJob struct {
	command        string
	stdout, stderr string
	code           int
	err            error // the client could not be run, or did not end within runWait
}

// runJobs runs the jobs' clients, parallel at most at once, and returns when all have ended.
func runJobs(env, client []string, jobs []clientJob, parallel int) {
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := range jobs {
		sem <- struct{}{}
		j := &jobs[i]
		wg.Go(func() { // returns once its client has exited, or was killed after runWait
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), runWait)
			defer cancel()
			cmd := exec.CommandContext(ctx, binPath, runArgs(client, j.command)...)
			cmd.Env = env
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			j.stdout, j.stderr, j.code = stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()
			var exit *exec.ExitError
			if ctx.Err() != nil {
				j.err = fmt.Errorf("did not end within %v", runWait)
			} else if err != nil && !errors.As(err, &exit) {
				j.err = err
			}
		})
	}
	wg.Wait()
}

// heldRun is a ccexecutor run in progress through the proxy.
type heldRun struct {
	cmd      *exec.Cmd
	lines    *lineWriter
	stderr   bytes.Buffer
	exited   chan struct{} // closed once the client has exited and been waited for
	instance string        // the first line of stdout
	rest     bytes.Buffer  // stdout after the first line, once exited is closed
}

// startHeld starts "ccexecutor run --url url -- command"; it is killed at the end of the test
// if it is still running then.
func startHeld(t *testing.T, env, client []string, command string) *heldRun {
	t.Helper()
	h := &heldRun{exited: make(chan struct{}), lines: newLineWriter()}
	h.cmd = exec.Command(binPath, runArgs(client, command)...)
	h.cmd.Env = env
	h.cmd.Stdout, h.cmd.Stderr = h.lines, &h.stderr
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { h.cmd.Wait(); close(h.exited) }() // returns once the client has exited
	t.Cleanup(func() {
		h.cmd.Process.Kill()
		<-h.exited
	})
	return h
}

// firstLine waits for the first line of stdout and returns it without its newline.
func (h *heldRun) firstLine(t *testing.T) string {
	t.Helper()
	select {
	case line := <-h.lines.first:
		return strings.TrimSuffix(line, "\n")
	case <-h.exited:
		t.Fatalf("the client exited before its first line; stderr %q", h.stderr.String())
	case <-time.After(runWait):
		t.Fatalf("no first line within %v", runWait)
	}
	return ""
}

// finish waits for the client to exit and returns its exit status and stderr.
func (h *heldRun) finish(t *testing.T) (int, string) {
	t.Helper()
	select {
	case <-h.exited:
	case <-time.After(runWait):
		t.Fatalf("the client did not end within %v", runWait)
	}
	h.rest.WriteString(h.lines.rest())
	return h.cmd.ProcessState.ExitCode(), h.stderr.String()
}

// lineWriter is a client's stdout: it hands the first line over on first, and keeps the rest.
type lineWriter struct {
	first chan string

	mu   sync.Mutex // guards the fields below: os/exec writes from its own goroutine
	buf  []byte
	sent bool
}

func newLineWriter() *lineWriter { return &lineWriter{first: make(chan string, 1)} }

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	if i := bytes.IndexByte(w.buf, '\n'); i >= 0 && !w.sent {
		w.first <- string(w.buf[:i+1]) // never blocks: it has room for the one line
		w.buf, w.sent = w.buf[i+1:], true
	}
	return len(p), nil
}

// rest returns what was written after the first line; call it once the client has exited.
func (w *lineWriter) rest() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.buf)
}

// writeCert writes a self-signed certificate for 127.0.0.1 and localhost and its key, and
// returns their files and a pool that trusts the certificate.
func writeCert(t *testing.T, dir string) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	certPEM, cert := testCert(t, "127.0.0.1", "localhost")
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	roots = x509.NewCertPool()
	roots.AppendCertsFromPEM(certPEM)
	return certFile, keyFile, roots
}

// freePort returns a port of 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// startNginx runs nginx in the foreground, as one process, with everything it writes in dir and
// contrib/nginx.conf as its http configuration, changed only in its ports, certificate and
// proxy_read_timeout. It returns once nginx answers /healthz through the proxy, and stops nginx
// at the end of the test.
func startNginx(t *testing.T, nginx, dir, port, certFile, keyFile string, roots *x509.CertPool, upstreams ...string) {
	t.Helper()
	conf, err := os.ReadFile("../../contrib/nginx.conf")
	if err != nil {
		t.Fatal(err)
	}
	site := string(conf)
	for _, r := range [][2]string{
		{"server 127.0.0.1:8003;", "server " + upstreams[0] + ";"},
		{"server 127.0.0.1:8004;", "server " + upstreams[1] + ";"},
		{"~^a\\.      127.0.0.1:8003;", "~^a\\.      " + upstreams[0] + ";"},
		{"~^b\\.      127.0.0.1:8004;", "~^b\\.      " + upstreams[1] + ";"},
		{"listen 443 ssl;", "listen 127.0.0.1:" + port + " ssl;"},
		{"/etc/ssl/ccexecutor/fullchain.pem", certFile},
		{"/etc/ssl/ccexecutor/privkey.pem", keyFile},
		{"proxy_read_timeout 60s;", "proxy_read_timeout " + nginxReadTimeout + ";"},
	} {
		if n := strings.Count(site, r[0]); n != 1 {
			t.Fatalf("contrib/nginx.conf holds %q %d times, want once: update TestNginx with it", r[0], n)
		}
		site = strings.Replace(site, r[0], r[1], 1)
	}
	sitePath := filepath.Join(dir, "ccexecutor.conf")
	if err := os.WriteFile(sitePath, []byte(site), 0o644); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, "tmp")
	main := fmt.Sprintf(`daemon off;
master_process off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %[2]s/body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    include %[3]s;
}
`, dir, tmp, sitePath)
	mainPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(mainPath, []byte(main), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	errorLog := filepath.Join(dir, "error.log")
	// No -e for the log of its start: nginx before 1.19.5 lacks it, and the configuration
	// sets the log it writes to.
	cmd := exec.Command(nginx, "-p", dir, "-c", mainPath)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }() // returns once nginx has exited
	logs := func() string {
		b, _ := os.ReadFile(errorLog)
		return out.String() + string(b)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM) // fast shutdown: closes the connections it holds
		select {
		case <-exited:
		case <-time.After(runWait):
			cmd.Process.Kill()
			<-exited
			t.Errorf("nginx did not stop within %v of SIGTERM", runWait)
		}
		if t.Failed() {
			t.Logf("nginx's output and error log:\n%s", logs())
		}
	})

	// Ready once /healthz answers through the proxy, which also shows that the instances
	// accept the Host it sends.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}, Timeout: runWait}
	defer hc.CloseIdleConnections()
	base := "https://127.0.0.1:" + port
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.Now().Add(runWait)
	for {
		resp, err := hc.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("GET /healthz through nginx: HTTP %s, want 200", resp.Status)
			}
			break
		}
		select {
		case <-exited:
			t.Fatalf("nginx exited: %v\n%s", cmd.ProcessState, logs())
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nginx did not answer within %v: %v\n%s", runWait, err, logs())
		}
	}
	// The counters of one instance through a balancer would mislead: the config hides them.
	resp, err := hc.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /metrics through nginx: HTTP %s, want 404", resp.Status)
	}
}

// runArgs are the arguments of ccexecutor run with the flags client, for command.
func runArgs(client []string, command string) []string {
	return append(append([]string{"run"}, client...), "--", command)
}
