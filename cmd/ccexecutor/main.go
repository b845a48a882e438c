// Command ccexecutor serves the ccexecutor WebSocket protocol, and is a client and a load tool
// for it.
//
//	ccexecutor [serve] [flags]         run the server (the default)
//	ccexecutor run [flags] -- COMMAND  run one command on a server, like running it locally
//	ccexecutor bench [flags]           measure a server, or one started in process
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ccexecutor/ccexecutor"
)

const usage = `Usage:
  ccexecutor [serve] [flags]          run the server (the default)
  ccexecutor run [flags] -- COMMAND   run a command on a server and stream its output
  ccexecutor bench [flags]            load-test a server, or one started in process

Run 'ccexecutor SUBCOMMAND -h' for the flags of each. Flags of serve:
`

func main() {
	args := os.Args[1:]
	sub := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	switch sub {
	case "serve":
		os.Exit(serve(args))
	case "run":
		os.Exit(runCommand(args))
	case "bench":
		os.Exit(bench(args))
	default:
		fmt.Fprintf(os.Stderr, "ccexecutor: unknown subcommand %q\n\n%s", sub, usage)
		os.Exit(2)
	}
}

// serve runs the server until SIGINT or SIGTERM, then shuts it down. It returns the exit code.
func serve(args []string) int {
	fs := flag.NewFlagSet("ccexecutor", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported in one line below
	cfg := ccexecutor.Config{
		MaxSessions: ccexecutor.MaxSessions, StreamTimeout: ccexecutor.StreamTimeout, MaxLineBytes: ccexecutor.MaxLineBytes,
		KillGrace: ccexecutor.KillGrace, MaxMessageBytes: ccexecutor.MaxMessageBytes, PingInterval: ccexecutor.PingInterval,
		WriteWait: ccexecutor.WriteWait, ReattachBuffer: ccexecutor.ReattachBuffer,
	}
	var (
		addr     = "127.0.0.1:8003"
		level    = logLevel(slog.LevelInfo)
		insecure = fs.Bool("insecure", false, "allow listening on a non-loopback address without a token (env INSECURE)")
		allowed  = fs.String("allowed-commands", "", "comma-separated programs that alone may run, without a shell (env ALLOWED_COMMANDS)")
		allowEnv = fs.String("allowed-env", "", "comma-separated variables a request's env may set while --allowed-commands is in force (env ALLOWED_ENV)")
		tokFile  = fs.String("token-file", "", "file holding the token clients must present; readable by its owner only (env CC_EXECUTOR_TOKEN_FILE)")
		origins  = fs.String("allow-origin", "", "comma-separated origins allowed besides the server's own (env ALLOWED_ORIGINS)")
	)
	// A flag's "(env NAME)" names the environment variable that sets it when the flag is not
	// given: see fromEnv.
	fs.Var(address{&addr}, "addr", "listen `address`, host:port (env ADDR; DEFAULT_PORT alone sets the port)")
	fs.Var(&level, "log-level", "log `level`: debug, info (the default), warn or error (env LOG_LEVEL)")
	fs.Var(positive{&cfg.MaxSessions}, "max-sessions", "`sessions` held at once (env MAX_SESSIONS)")
	fs.Var(seconds{&cfg.StreamTimeout}, "stream-timeout", "`time` a run may take, in seconds or as a Go duration (env STREAM_TIMEOUT)")
	fs.Var(positive{&cfg.MaxLineBytes}, "max-line-bytes", "longest output line sent whole, in `bytes` (env MAX_LINE_BYTES)")
	fs.Var(seconds{&cfg.KillGrace}, "kill-grace", "`time` between SIGTERM and SIGKILL (env KILL_GRACE)")
	fs.Var(positive{&cfg.MaxMessageBytes}, "max-message-bytes", "largest inbound message, all its fragments together, in `bytes` (env MAX_MESSAGE_BYTES)")
	fs.Var(seconds{&cfg.PingInterval}, "ping-interval", "write silence before a keep-alive Ping, a `time` (env PING_INTERVAL)")
	fs.Var(seconds{&cfg.WriteWait}, "write-wait", "`time` in which a client must accept 128 KiB of waiting output, or count as gone (env WRITE_WAIT)")
	fs.StringVar(&cfg.Token, "token", "", "`token` clients must present (env CC_EXECUTOR_TOKEN)")
	fs.StringVar(&cfg.Cgroup, "cgroup", ccexecutor.CgroupAuto, "contain each run in a cgroup v2: auto, off, or the `directory` of the parent cgroup to use (env CGROUP)")
	fs.Var(orZero{seconds{&cfg.ReattachWindow}}, "reattach-window", "`time` a session whose connection was lost waits for its client to reattach, its run going on; 0, the default, ends it at once (env REATTACH_WINDOW)")
	fs.Var(positive{&cfg.ReattachBuffer}, "reattach-buffer", "`bytes` of sent output kept for a reattach until the client acknowledges them; past them the run waits (env REATTACH_BUFFER)")
	fs.Func("instance", "`name` of this instance, which its resume tokens begin with, for a proxy to send a reattach back to it: letters, digits, - and _ (env CC_EXECUTOR_INSTANCE)", func(v string) error {
		if !instanceName.MatchString(v) {
			return errors.New("want 1 to 32 letters, digits, - or _")
		}
		cfg.Instance = v
		return nil
	})
	idle := idleTimeout
	fs.Var(seconds{&idle}, "idle-timeout", "`time` an idle HTTP keep-alive connection is kept open (env IDLE_TIMEOUT)")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(os.Stderr, usage)
			fs.SetOutput(os.Stderr)
			fs.PrintDefaults()
			return 0
		}
		fmt.Fprintf(os.Stderr, "ccexecutor: %v (see 'ccexecutor -h')\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "ccexecutor: unexpected argument %q: the flags after it would be ignored\n", fs.Arg(0))
		return 2
	}
	given := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if p, ok := os.LookupEnv("DEFAULT_PORT"); ok && !given["addr"] {
		if _, inEnv := os.LookupEnv("ADDR"); !inEnv {
			if err := fs.Set("addr", net.JoinHostPort("127.0.0.1", p)); err != nil {
				fmt.Fprintf(os.Stderr, "ccexecutor: invalid DEFAULT_PORT=%q: %v\n", p, err)
				return 2
			}
		}
	}
	if err := fromEnv(fs, given); err != nil {
		fmt.Fprintf(os.Stderr, "ccexecutor: %v\n", err)
		return 2
	}
	os.Unsetenv("CC_EXECUTOR_TOKEN") // commands inherit the server's environment; not the token
	if *tokFile != "" {
		if cfg.Token != "" {
			fmt.Fprintln(os.Stderr, "ccexecutor: --token-file and --token (or CC_EXECUTOR_TOKEN) both set: set one")
			return 2
		}
		var err error
		if cfg.Token, err = readToken(*tokFile); err != nil {
			fmt.Fprintf(os.Stderr, "ccexecutor: %v\n", err)
			return 2
		}
	}
	if err := check(cfg.Token, addr, *insecure); err != nil {
		fmt.Fprintf(os.Stderr, "ccexecutor: %v\n", err)
		return 2
	}
	cfg.AllowedCommands, cfg.AllowedOrigins, cfg.AllowedEnv = list(*allowed), list(*origins), list(*allowEnv)
	if err := cfg.CheckAllowlist(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.Level(level)}))

	if err := ccexecutor.SetSubreaper(); err != nil {
		cfg.Logger.Warn("members of a run's group that outlive their parent will not be reaped", "err", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ccexecutor: %v\n", err)
		return 1
	}
	// Refuse connections beyond what the descriptor limit leaves after the runs of every session.
	maxConns := ccexecutor.MaxConns(cfg.MaxSessions)
	if maxConns < 2*cfg.MaxSessions {
		cfg.Logger.Warn("the file descriptor limit (ulimit -n) leaves room for few connections", "max_connections", maxConns, "max_sessions", cfg.MaxSessions)
	}
	ln = ccexecutor.LimitListener(ln, maxConns)
	srv := ccexecutor.NewServer(cfg)
	if _, err := srv.Containment(); err != nil {
		ln.Close()
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: idle}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	where := dialable(addr, ln.Addr().(*net.TCPAddr))
	if where != ln.Addr().String() {
		cfg.Logger.Info("listening on all addresses", "addr", ln.Addr().String())
	}
	fmt.Printf("ccexecutor listening on ws://%s/ws/mcp\n", where)
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }() // returns once hs.Shutdown has closed the listener
	select {
	case err := <-served:
		fmt.Fprintf(os.Stderr, "ccexecutor: %v\n", err)
		return 1
	case <-ctx.Done():
	}
	cfg.Logger.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.KillGrace+time.Second)
	defer cancel()
	// The sessions hold the runs: end them at once, with the whole budget. Meanwhile
	// hs.Shutdown closes the listener, but it would wait for a connection that has not sent a
	// whole request; once the sessions are over, hs.Close drops those.
	httpDone := make(chan error, 1)
	go func() { httpDone <- hs.Shutdown(sctx) }() // returns once no request is in flight, or when sctx ends
	err = srv.Shutdown(sctx)
	hs.Close()
	<-httpDone
	<-served
	if err != nil {
		fmt.Fprintf(os.Stderr, "ccexecutor: shutdown: %v\n", err)
		return 1
	}
	return 0
}

// instanceName is what --instance accepts: a name that needs no escaping in a URL's query, nor
// in a regular expression of a proxy's configuration.
var instanceName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,32}$`)

// idleTimeout is how long an idle HTTP keep-alive connection is kept open by default.
const idleTimeout = 30 * time.Second

// envName finds the environment variable that usage names as "(env NAME".
var envName = regexp.MustCompile(`\(env ([A-Za-z_][A-Za-z0-9_]*)`)

// fromEnv sets each flag of fs that is not given, and whose usage names an environment
// variable, from that variable when it is set. A flag given wins: its variable is not even
// checked. An error names the variable.
func fromEnv(fs *flag.FlagSet, given map[string]bool) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		m := envName.FindStringSubmatch(f.Usage)
		if m == nil || given[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(m[1]); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("invalid %s=%q: %v", m[1], v, e)
			}
		}
	})
	return err
}

// check refuses to listen on addr, which is valid, without a token, unless insecure: on an
// address other machines can reach.
func check(token, addr string, insecure bool) error {
	host, _, _ := net.SplitHostPort(addr)
	ip := net.ParseIP(host)
	if token == "" && !insecure && host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("refusing to listen on %s without a token: anyone who can reach it could run commands as this user; set --token (or CC_EXECUTOR_TOKEN), or --insecure if a proxy in front of it authenticates", addr)
	}
	return nil
}

// readToken reads the token from path: its content, without a trailing newline. The file must
// be a regular file that neither group nor others may read or write.
func readToken(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("token file: %v", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("token file: %v", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("token file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("token file %s has mode %04o: group or others may read or change it; chmod 600 it", path, perm)
	}
	const maxToken = 64 << 10
	b, err := io.ReadAll(io.LimitReader(f, maxToken+1))
	switch {
	case err != nil:
		return "", fmt.Errorf("token file: %v", err)
	case len(b) > maxToken:
		return "", fmt.Errorf("token file %s is over %d bytes", path, maxToken)
	}
	tok := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if tok == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return tok, nil
}

// dialable is the address a client on this machine can connect to, for a listener on a that
// was asked for addr: loopback when addr's host is empty or unspecified (all addresses).
func dialable(addr string, a *net.TCPAddr) string {
	host, _, _ := net.SplitHostPort(addr)
	ip := net.ParseIP(host)
	switch {
	case host == "" || ip != nil && ip.Equal(net.IPv4zero):
		return net.JoinHostPort("127.0.0.1", strconv.Itoa(a.Port))
	case ip != nil && ip.IsUnspecified():
		return net.JoinHostPort("::1", strconv.Itoa(a.Port))
	}
	return a.String()
}

// list splits a comma-separated list, dropping empty items.
func list(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// seconds is a positive duration flag that takes a number of seconds or a Go duration.
type seconds struct{ d *time.Duration }

func (s seconds) String() string {
	if s.d == nil {
		return ""
	}
	return s.d.String()
}

// maxDuration is how the longest time.Duration is written in errors.
const maxDuration = "2562047h47m16s"

func (s seconds) Set(v string) error {
	d, err := time.ParseDuration(v)
	if err != nil {
		f, ferr := strconv.ParseFloat(v, 64)
		switch {
		case ferr == nil && math.IsNaN(f):
			return fmt.Errorf("not a number")
		case ferr == nil && f*float64(time.Second) >= math.MaxInt64:
			return fmt.Errorf("out of range: at most %s", maxDuration)
		case ferr == nil:
			d = time.Duration(f * float64(time.Second))
		case durationOverflows(v):
			return fmt.Errorf("out of range: at most %s", maxDuration)
		default:
			return fmt.Errorf("want seconds or a duration such as 1m30s")
		}
	}
	if d <= 0 {
		return fmt.Errorf("must be positive")
	}
	*s.d = d
	return nil
}

// orZero is a seconds flag that also takes 0, which turns off what it sets.
type orZero struct{ seconds }

// String is empty for 0, so that -h shows no default: the usage says what 0 does.
func (s orZero) String() string {
	if s.d == nil || *s.d == 0 {
		return ""
	}
	return s.seconds.String()
}

func (s orZero) Set(v string) error {
	if f, err := strconv.ParseFloat(v, 64); err == nil && f == 0 || v == "0s" {
		*s.d = 0
		return nil
	}
	return s.seconds.Set(v)
}

// durationOverflows reports whether v is written as a Go duration whose value is too large
// for time.Duration: time.ParseDuration gives the same error for that as for a typo.
func durationOverflows(v string) bool {
	units := map[string]float64{"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
	total := 0.0
	for v != "" {
		i := strings.IndexFunc(v, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
		if i <= 0 {
			return false
		}
		f, err := strconv.ParseFloat(v[:i], 64)
		if err != nil {
			return false
		}
		j := strings.IndexFunc(v[i:], func(r rune) bool { return r >= '0' && r <= '9' || r == '.' })
		if j < 0 {
			j = len(v) - i
		}
		u, ok := units[v[i:i+j]]
		if !ok {
			return false
		}
		total += f * u
		v = v[i+j:]
	}
	return total >= math.MaxInt64
}

// positive is a flag of a positive int.
type positive struct{ n *int }

func (p positive) String() string {
	if p.n == nil {
		return ""
	}
	return strconv.Itoa(*p.n)
}

func (p positive) Set(v string) error {
	n, err := strconv.ParseInt(v, 10, 0)
	switch {
	case errors.Is(err, strconv.ErrRange):
		return fmt.Errorf("out of range: at most %d", math.MaxInt)
	case err != nil:
		return fmt.Errorf("want a whole number")
	case n <= 0:
		return fmt.Errorf("must be positive")
	}
	*p.n = int(n)
	return nil
}

// logLevel is a flag of a slog level, by name.
type logLevel slog.Level

func (l *logLevel) String() string { return strings.ToLower(slog.Level(*l).String()) }

func (l *logLevel) Set(v string) error {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(v)); err != nil {
		return fmt.Errorf("want debug, info, warn or error")
	}
	*l = logLevel(lv)
	return nil
}

// address is a flag of a listen address, host:port.
type address struct{ a *string }

func (a address) String() string {
	if a.a == nil {
		return ""
	}
	return *a.a
}

func (a address) Set(v string) error {
	_, port, err := net.SplitHostPort(v)
	if err != nil {
		return fmt.Errorf("want host:port")
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("invalid port %q: want 0 to 65535", port)
	}
	*a.a = v
	return nil
}
