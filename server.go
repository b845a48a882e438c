// Package ccexecutor is a WebSocket server that runs shell commands for its clients and streams
// their output back line by line as JSON-RPC 2.0 notifications; the protocol is in PROTOCOL.md.
//
// # Reliability fixes
//
// The package is the reference implementation of the Python cc_executor service, and is built
// around the fixes of the six defects its review found. Each has a test that fails without it.
//
// FIX_001_RACE_CONDITION, session locking: the session map is touched only under the one mutex of
// registry (session.go), in add, remove, close and len; the check against the limit and the insert
// happen under the same lock. TestSessionLocking (executor_test.go) proves it under -race with
// concurrent sessions and a Shutdown among them.
//
// FIX_002_SESSION_LIMIT, session limit: registry.add refuses a session beyond Config.MaxSessions
// (config.go; default MaxSessions), and serveConn (server.go) then sends the -32001 error and a
// close frame with status 1008 without using a slot. TestSessionLimit (executor_test.go) proves
// it, with goroutines racing for the last slot.
//
// FIX_003_STREAM_TIMEOUT, stream timeout: withStreamTimeout (stream.go) bounds every run, and
// supervise (executor.go) ends the group when it expires; process.completed then says "stream
// timeout after <N>s". TestStreamTimeout (executor_test.go) proves it, with fake time and with a
// real process.
//
// FIX_004_CONTROL_FLOW, control flow: parseControl (control.go) gives an unknown or malformed
// control type a clear -32602 error, and session.control (control.go) signals the whole process
// group through process.signal (executor.go), never one PID. TestControlFlow (executor_test.go)
// proves it.
//
// FIX_005_PARTIAL_LINES, partial lines: readLines (stream.go) cuts a line longer than the line
// limit at a character boundary, appends "...\n" and discards the rest of the line without holding
// it. TestPartialLines (executor_test.go) proves it, including that memory stays bounded.
//
// FIX_006_CANCELLED_CLEANUP, cancellation cleanup: every end of a run, be it cancel, timeout,
// disconnect, shutdown or its own exit, goes through supervise (executor.go), which ends the whole
// group with SIGTERM, SIGCONT and SIGKILL after the kill grace, and through process.wait, which
// reaps the leader and returns once no member of the group is left (groupLeft, reap.go); the
// session joins every goroutine before it frees its slot. (With a reattach window a lost
// connection ends the run only once the window has passed, through the same path.)
// TestCancellationCleanup
// (executor_test.go) proves it, and runs itself again in a test binary that is no subreaper.
// With SetSubreaper, reapLoop (reap.go) also reaps, by PID, what a run leaves behind, in its group
// or out of it, and never a leader that exec.Cmd.Wait waits for: TestOrphansReaped (reap_test.go).
// process.wait never blocks in wait4(-pgid), which a member that leaves the group would never
// wake: TestGroupEndsAfterEscape (reap_test.go). Once the group is found empty, process.signal
// sends nothing, since the PGID may be reused: TestControlAfterGroupGone (control_test.go).
// pipeReader (drain.go) delivers what the group wrote however slowly the client reads:
// TestOutputDelivered (drain_test.go). A process group is not a container, though: a process that
// calls setsid leaves it. Where cgroup v2 is writable (Config.Cgroup, cgroup.go), each run
// therefore starts in a cgroup of its own, and the group supervise ends is that cgroup: SIGTERM
// and SIGCONT to each of its processes, cgroup.kill after the grace, and the run is over once
// cgroup.events says it is empty; PAUSE freezes it. TestContainment (containment_test.go) proves
// it for escapees of every kind and every end of a run, and TestContainmentLeftovers that a new
// server ends the runs a killed one left.
//
// # Layout
//
// Each file owns one concern and is named for it, and the files form layers: a file uses only
// names from files below it, so a reader can start at the bottom and never meet a name from above.
// From the bottom: config.go (Config and the defaults of its tunables); wsframe.go (RFC 6455
// frames, read and written); output.go (batches, and process.output encoded a piece at a time);
// jsonrpc.go (the JSON-RPC messages, their error codes, the parsing of a request, and Version);
// metrics.go, refusals.go and listener.go (the counters of /metrics, the refusal log,
// LimitListener); conn.go (the hijacked connection and its write path); reattach.go (a session's
// connections as attachments, and the replay a reattach is served from); stream.go (lines and the
// stream timeout); drain.go, reap.go and cgroup.go (reading a group's pipes, reaping,
// containment); executor.go (processes and how a run ends); command.go (the command an execute
// request becomes, with the allowlist); control.go (PAUSE, RESUME and CANCEL); run.go (a run, from
// execute to process.completed); session.go (the registry and everything a session does, its
// reader and writer included); server.go (the HTTP side, access checks, health, Shutdown). The
// only names a file takes from above are the session's: control.go and run.go hold methods of
// session, which call its send, and a session keeps a pointer to its Server for the configuration,
// counters and logs they share.
//
// # Using the module
//
// Until it is published, the module github.com/ccexecutor/ccexecutor is used from a checkout, with
// a replace directive in the go.mod of the program that imports it ("replace
// github.com/ccexecutor/ccexecutor => ../ccexecutor"), or as a vendored copy of it. A Server is an
// http.Handler; the package's example (Example_serveMux) mounts it in an http.ServeMux next to
// other handlers, serves it as the binary does, and shuts it down.
//
// # Concurrency
//
// The only mutex that spans sessions is registry.mu (session.go): it guards the session map and
// the closing flag, and is held for map and counter work only, never across I/O. Below it, the
// reaper's state is process-wide, as the children it reaps are (orphans in reap.go): orphans.mu
// guards the set of run leaders, for map work only, and orphans.forking is read-held by each start
// from the fork to the insert of its leader and write-held by a reaping round, which reads /proc
// and calls wait4 with WNOHANG under it, so a round never takes a new leader for an orphan.
// process.mu (executor.go) makes process.signal's check and kill one step against the close of the
// group's empty channel. Everything else is owned by one goroutine at a time and handed over on
// channels. Output is handed over in batches of frames (batch, output.go): each pump (run.go) owns
// two, fills one while the writer writes the other and gets it back once written, so a slow client
// slows the process through its pipe. What a session pins is bounded in encoded bytes: a batch is
// sent once it holds maxBatch bytes of frames, a line's JSON goes into it whole only up to
// maxInline bytes, and a longer one (up to six times the line, "\u0001" for a byte) is escaped by
// the writer escapeChunk bytes of the line at a time, from the pump's own line buffer, while that
// pump waits. So a session holds at most, per stream, the line being read (MaxLineBytes) and its
// read buffer and two batches of under maxBatch+maxInline bytes, and once the writer's piece of a
// long line: about 1.7 MiB at the default limits. With a reattach window add the replay:
// ReattachBuffer bytes of what was sent (encoded, but long lines as read), two batches and two
// 64 KiB chunks, and up to as much again of serve's messages waiting for room. (The rate limit
// of the refusal log, refusals.go, has a mutex of its own, held for its counters only; the line
// is logged after it is released. The metrics of /metrics, metrics.go, are atomics, which any
// goroutine adds to without a lock.)
//
// Each session owns these goroutines, joined before its slot is freed: serve (session.go), the
// handler's goroutine, which answers requests in order and owns the session's state; readLoop,
// which exits when a read fails (the client left, or serve set a read deadline in the past),
// after the client's close frame, or at a protocol error (frameReader, wsframe.go); writeLoop
// (session.go), the only writer of data frames, which exits when serve closes its queue, a write
// fails or a Ping goes unanswered (with a reattach window: when serve closes its queue, or when
// the session ends with no connection); and, while a command runs, runToEnd (run.go), which
// exits once the process group is reaped, with its three: process.wait, which with containment
// also waits (on inotify, no timer) until the run's cgroup is empty, then removes it; and one pump
// per output stream, which exit at end of file or at their pipe's deadline once the group is gone
// (see pipeReader; with containment no writer outlives the cgroup, so the pipes are read to end of
// file with no deadline). readLoop may also write, to answer a client's Ping; the connection's own
// lock (conn.mu, conn.go, which guards nothing but the order of writes) keeps those writes whole,
// and the writer holds it across the pieces of a frame. Every write has a deadline, WriteWait,
// renewed while the client makes progress: a write fails, and the client counts as gone, when it
// accepted fewer than minProgress bytes (128 KiB) in a WriteWait. The close frame that answers a
// client's close, or fails the connection, is sent by writeLoop like any other frame, as the
// session's last.
//
// With a reattach window (Config.ReattachWindow) a session outlives a lost connection, and each
// of its connections is an attachment (reattach.go) whose owner is the goroutine of the HTTP
// handler that upgraded it: the owner runs its readLoop, waits until the session releases it, and
// closes it. serve learns of a lost connection from its attachment's dead channel, detaches, and
// takes a reattach from another handler on its resume channel; it hands each connection to
// writeLoop, which alone writes to it, on attachc. A takeover first shortens the old connection's
// write deadline to takeoverWait (conn.setWait), so that a writer stuck on a cut connection lets
// go at once. writeLoop also owns the replay, the messages sent and not acknowledged, and writes
// nothing while the replay is full: what it takes then waits in order, a pump's batches while
// their pump waits for them, serve's up to ReattachBuffer bytes more, so that serve does not wait
// on a Pong that its reader holds behind a request (past that, the client counts as gone). A Pong
// reaches writeLoop through the attachment's acked counter, an atomic that readLoop raises, and a
// token on ackc. So the replay needs no lock, and a detached session's run waits on its pipe as a
// slow client's does. Once the session's context is done no reattach can come, and writeLoop
// holds nothing more.
//
// A session frees its slot only after all of them have returned, and closes the connection after
// that, so a client that sees the connection close may connect again at once. After a protocol
// error it first lingers (conn.linger): it half-closes and reads until the client closes its end,
// for at most WriteWait, so that its close frame is not lost to a reset. One more goroutine
// belongs to the process, not to a session: reapLoop, which SetSubreaper starts and which lives as
// long as the process, as the subreaper attribute does.
package ccexecutor

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/websocket"
)

// A Server is the ccexecutor service as an http.Handler: WebSocket sessions on /ws/mcp and /ws,
// health on /health and /healthz. It is safe for concurrent use.
type Server struct {
	cfg     Config
	log     *slog.Logger
	mux     *http.ServeMux
	started time.Time
	exec    *execPolicy // what execute may run; see CheckAllowlist
	refused *refusalLog // logs refused handshakes and commands, a few a second per reason

	ctx    context.Context         // the parent of every session's context
	cancel context.CancelCauseFunc // Shutdown cancels ctx with errShutdown

	sessions registry

	cgroups     *cgroups // where runs' cgroups are made; nil for process groups only
	containment string   // "cgroup" or "process-group", for /health

	metrics metrics   // counted as things happen, written on /metrics
	build   buildInfo // the labels of ccexecutor_build_info
}

// NewServer returns a Server with the configuration cfg. It resolves the programs of
// cfg.AllowedCommands in the PATH of this process, once: call cfg.CheckAllowlist first to
// refuse an allowlist that does not hold as written.
func NewServer(cfg Config) *Server {
	orDefault(&cfg.MaxSessions, MaxSessions)
	orDefault(&cfg.StreamTimeout, StreamTimeout)
	orDefault(&cfg.MaxLineBytes, MaxLineBytes)
	orDefault(&cfg.KillGrace, KillGrace)
	orDefault(&cfg.WriteWait, WriteWait)
	orDefault(&cfg.MaxMessageBytes, MaxMessageBytes)
	orDefault(&cfg.PingInterval, PingInterval)
	orDefault(&cfg.ReattachBuffer, ReattachBuffer)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{
		cfg:      cfg,
		log:      cfg.Logger,
		refused:  newRefusalLog(cfg.Logger),
		mux:      http.NewServeMux(),
		started:  time.Now(),
		build:    readBuildInfo(),
		sessions: registry{max: cfg.MaxSessions, sessions: map[*session]struct{}{}, drained: make(chan struct{})},
	}
	s.exec, _ = newExecPolicy(&cfg) // what fails is refused to every request; see CheckAllowlist
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	s.contain()
	s.mux.HandleFunc("GET /health", s.health)
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	s.mux.HandleFunc("GET /metrics", s.serveMetrics)
	s.mux.HandleFunc("/ws/mcp", s.serveWebSocket)
	s.mux.HandleFunc("/ws", s.serveWebSocket)
	return s
}

// contain decides how runs are contained, logs it, and ends and removes what runs of a server
// killed before it could end them left behind.
func (s *Server) contain() {
	cg, why := openCgroups(s.cfg.Cgroup)
	s.cgroups, s.containment = cg, "process-group"
	switch {
	case cg == nil:
		s.log.Info("containment: process groups; a process that calls setsid escapes them", "why", why)
	case cg.err != nil:
		s.log.Error("containment: no run can start", "err", cg.err)
	default:
		s.containment = "cgroup"
		s.log.Info("containment: cgroup v2", "why", why)
		n, err := cg.sweep(s.cfg.KillGrace)
		if n > 0 || err != nil {
			s.log.Warn("containment: ended the runs a previous server left behind", "cgroups", n, "err", err)
		}
	}
}

// Containment reports how the server contains its runs: "cgroup" or "process-group". When
// Config.Cgroup names a parent cgroup that cannot be used, it returns the error, and every
// execute fails.
func (s *Server) Containment() (string, error) {
	if s.cgroups != nil && s.cgroups.err != nil {
		return "", s.cgroups.err
	}
	return s.containment, nil
}

func orDefault[T int | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !hostAllowed(r) {
		const reason = "forbidden: host is not a loopback name"
		s.refused.warn("request refused", reason, "remote", r.RemoteAddr, "status", http.StatusForbidden, "host", loggedText(r.Host))
		s.metrics.refuse(refuseHost)
		http.Error(w, reason, http.StatusForbidden)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// hostAllowed reports whether r may be served: on a loopback listener, only requests for a
// loopback name are, so that a web page whose name was rebound to 127.0.0.1 cannot reach it.
func hostAllowed(r *http.Request) bool {
	local, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	return !ok || !isLoopback(hostOf(local.String())) || isLoopback(hostOf(r.Host))
}

// Shutdown stops admitting sessions, ends every run with the cause "server shutting down",
// sends each client its process.completed and a close frame with status 1001, and waits for
// every session to end. It returns ctx.Err() if ctx is done first. It does not close listeners:
// shut the http.Server down as well.
func (s *Server) Shutdown(ctx context.Context) error {
	drained := s.sessions.close()
	s.cancel(errShutdown)
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	h := map[string]any{
		"status":          "healthy",
		"service":         "ccexecutor",
		"version":         Version,
		"active_sessions": s.sessions.len(),
		"max_sessions":    s.cfg.MaxSessions,
		"uptime_seconds":  math.Round(time.Since(s.started).Seconds()*1000) / 1000,
		"containment":     s.containment,
	}
	if s.cfg.ReattachWindow > 0 {
		h["detached_sessions"] = s.metrics.detached.Load()
	}
	writeJSON(w, http.StatusOK, h)
}

// serveMetrics writes the metrics in the Prometheus text format. When a token is set, it is
// required here too: the counters say what the server is doing.
func (s *Server) serveMetrics(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Token != "" && !tokenMatches(r, s.cfg.Token) {
		s.refused.warn("request refused", "unauthorized", "remote", r.RemoteAddr, "status", http.StatusUnauthorized)
		s.metrics.refuse(refuseToken)
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	w.Header().Set("Content-Type", metricsContentType)
	s.metrics.write(w, s.sessions.len(), s.build)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// serveWebSocket checks access, then upgrades the connection and serves its session.
func (s *Server) serveWebSocket(w http.ResponseWriter, r *http.Request) {
	if code, msg := s.checkAccess(r); code != 0 {
		s.refused.warn("handshake refused", msg, "remote", r.RemoteAddr, "status", code)
		http.Error(w, msg, code)
		return
	}
	if s.ctx.Err() != nil {
		const reason = "server shutting down"
		s.refused.warn("handshake refused", reason, "remote", r.RemoteAddr, "status", http.StatusServiceUnavailable)
		s.metrics.refuse(refuseShuttingDown)
		http.Error(w, reason, http.StatusServiceUnavailable)
		return
	}
	h := &hijacker{ResponseWriter: w, wait: s.cfg.WriteWait}
	websocket.Server{Handler: func(ws *websocket.Conn) { s.serveConn(ws, h.conn) }}.ServeHTTP(h, r)
}

// checkAccess applies the protocol's access rules to a handshake. It returns 0 to let it through,
// or the HTTP status and message to refuse it with; the messages are a fixed set.
// The Host check is in ServeHTTP, for every path.
func (s *Server) checkAccess(r *http.Request) (int, string) {
	switch origins := r.Header.Values("Origin"); {
	case len(origins) > 1:
		s.metrics.refuse(refuseOrigin)
		return http.StatusForbidden, "forbidden: more than one Origin"
	case len(origins) == 1 && !s.originAllowed(origins[0], r.Host):
		s.metrics.refuse(refuseOrigin)
		return http.StatusForbidden, "forbidden: origin not allowed"
	}
	if s.cfg.Token != "" && !tokenMatches(r, s.cfg.Token) {
		s.metrics.refuse(refuseToken)
		return http.StatusUnauthorized, "unauthorized"
	}
	return 0, ""
}

// originAllowed reports whether a handshake's Origin may connect: it must be an http or https
// origin, and its host must be the host the client connected to, or it must be on the allowed
// list.
func (s *Server) originAllowed(origin, host string) bool {
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" || u.Scheme != "http" && u.Scheme != "https" {
		return false // includes "null", sent by sandboxed pages and file: URLs
	}
	if strings.EqualFold(u.Host, host) {
		return true
	}
	for _, a := range s.cfg.AllowedOrigins {
		if strings.EqualFold(strings.TrimSuffix(a, "/"), origin) || strings.EqualFold(a, u.Host) {
			return true
		}
	}
	return false
}

// tokenMatches reports, in time independent of the token and of its length, whether r
// presents token.
func tokenMatches(r *http.Request, token string) bool {
	got := r.URL.Query().Get("token")
	if scheme, t, ok := strings.Cut(r.Header.Get("Authorization"), " "); ok && strings.EqualFold(scheme, "Bearer") {
		got = t
	}
	a, b := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(token))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// hostOf returns the host of a host[:port], without brackets.
func hostOf(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return strings.Trim(hostport, "[]")
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// serveConn serves one upgraded connection as a session, or refuses it when none can be admitted.
// A handshake that presents a resume token reattaches the connection to its session instead.
func (s *Server) serveConn(ws *websocket.Conn, c *conn) {
	remote := ws.Request().RemoteAddr
	if q := ws.Request().URL.Query(); q.Has("resume") {
		s.reattach(c, remote, q)
		return
	}
	ss := s.newSession(remote)
	defer ss.cancel(nil)
	switch err := s.sessions.add(ss); err {
	case nil:
		s.metrics.admitted.Add(1)
	case errLimit:
		s.metrics.refuse(refuseLimit)
		b := appendFrame(nil, opText, []byte(`{"jsonrpc":"2.0","error":{"code":-32001,"message":"Session limit exceeded","data":null}}`))
		c.Write(appendFrame(b, opClose, closePayload(1008, "Session limit exceeded")))
		s.refused.warn("session refused", "session limit exceeded", "remote", remote, "close_code", 1008)
		c.linger(s.cfg.WriteWait) // a request the client sent at once must not turn the close into a reset
		return
	default:
		s.metrics.refuse(refuseShuttingDown)
		c.Write(appendFrame(nil, opClose, closePayload(1001, "Server shutting down")))
		s.refused.warn("session refused", "server shutting down", "remote", remote, "close_code", 1001)
		c.linger(s.cfg.WriteWait)
		return
	}
	ss.log("session opened", "remote", remote)
	s.serveSession(ss, newAttachment(c, remote))
}

// newSession returns a session for a client at remote, not yet admitted.
func (s *Server) newSession(remote string) *session {
	ss := &session{
		id:      newUUID(),
		srv:     s,
		remote:  remote,
		in:      make(chan inFrame),
		out:     make(chan *batch, queueLen),
		attachc: make(chan attachOrder),
		resume:  make(chan *attachment),
		failed:  make(chan struct{}),
		ended:   make(chan runResult, 1),
		flushed: make(chan struct{}),
	}
	// Before add, which makes ss reachable by a reattach that reads ctx.
	ss.ctx, ss.cancel = context.WithCancelCause(s.ctx)
	ss.log = func(msg string, args ...any) { s.log.Info(msg, append([]any{"session", ss.id}, args...)...) }
	return ss
}

// serveSession serves ss, admitted, on its first connection, a, until the session ends, then
// frees its slot and closes its connection.
func (s *Server) serveSession(ss *session, a *attachment) {
	go s.own(ss, a) // returns once the session releases a, below or when it leaves it
	ss.serve(a)
	ss.cancel(nil)
	// Free the slot before closing the connection, so that a client that sees the connection
	// close can connect again at once.
	s.sessions.remove(ss)
	last := ss.att
	if last != nil {
		last.release()
		<-last.closed
	}
	a.release() // a no-op unless the session ended with no connection
	<-a.closed
	ss.log("session closed", "cause", context.Cause(ss.ctx))
}

// own runs the reader of a, one of the connections of ss, then waits until the session
// releases it, and closes it; after a protocol error, it lingers first (conn.linger).
func (s *Server) own(ss *session, a *attachment) {
	ss.readLoop(a)
	<-a.released
	if a.broken.Load() {
		a.conn.linger(s.cfg.WriteWait)
	}
	a.conn.Close()
	close(a.closed)
}

// reattach serves a handshake that presents a resume token: it attaches the connection to its
// session, or refuses it with -32004 and close status 1008.
func (s *Server) reattach(c *conn, remote string, q url.Values) {
	// refuse refuses the reattach for reason; the log's rate limit counts it under key, or
	// under reason when key is empty: its keys must be a fixed set.
	refuse := func(reason, key string) {
		s.metrics.refuse(refuseResume)
		msg, _ := marshal("Resume refused: " + reason)
		b := appendFrame(nil, opText, []byte(`{"jsonrpc":"2.0","error":{"code":-32004,"message":`+string(msg)+`,"data":null}}`))
		c.Write(appendFrame(b, opClose, closePayload(1008, "Resume refused")))
		if key == "" {
			key = reason
		}
		s.refused.warn("reattach refused", key, "remote", remote, "close_code", 1008, "detail", reason)
		c.linger(s.cfg.WriteWait)
	}
	if s.cfg.ReattachWindow <= 0 {
		refuse("reattach is not enabled", "")
		return
	}
	a := newAttachment(c, remote)
	a.token = q.Get("resume")
	if r := q.Get("received"); r != "" {
		var err error
		if a.received, err = strconv.ParseUint(r, 10, 64); err != nil {
			refuse("invalid received", "")
			return
		}
	}
	ss := s.sessions.lookup(q.Get("session_id"))
	if ss == nil {
		refuse(errUnknownResume.Error(), "")
		return
	}
	select {
	case ss.resume <- a: // serve answers on a.reply
	case <-ss.ctx.Done():
		refuse(errUnknownResume.Error(), "")
		return
	}
	if err := <-a.reply; err != nil {
		key := ""
		if _, ok := err.(*positionError); ok {
			key = "position not held" // its message has numbers in it
		}
		refuse(err.Error(), key)
		return
	}
	s.own(ss, a)
}

func newUUID() string {
	var u [16]byte
	rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // RFC 4122 variant
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:])
}
