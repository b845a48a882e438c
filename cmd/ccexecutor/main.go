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
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
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
	fs.Usage = func() { fmt.Fprint(fs.Output(), usage); fs.PrintDefaults() }
	var (
		cfg      ccexecutor.Config
		addr     = fs.String("addr", "127.0.0.1:8003", "listen address, host:port (env ADDR; DEFAULT_PORT alone sets the port)")
		level    = fs.String("log-level", "info", "log level: debug, info, warn or error (env LOG_LEVEL)")
		insecure = fs.Bool("insecure", false, "allow listening on a non-loopback address without a token (env INSECURE)")
		allowed  = fs.String("allowed-commands", "", "comma-separated programs that alone may run, without a shell (env ALLOWED_COMMANDS)")
		origins  = fs.String("allow-origin", "", "comma-separated origins allowed besides the server's own (env ALLOWED_ORIGINS)")
	)
	fs.IntVar(&cfg.MaxSessions, "max-sessions", ccexecutor.MaxSessions, "sessions held at once (env MAX_SESSIONS)")
	fs.Var(seconds{&cfg.StreamTimeout}, "stream-timeout", "time a run may take, in seconds or as a Go duration (env STREAM_TIMEOUT) (default 5m0s)")
	fs.IntVar(&cfg.MaxLineBytes, "max-line-bytes", ccexecutor.MaxLineBytes, "longest output line sent whole (env MAX_LINE_BYTES)")
	fs.Var(seconds{&cfg.KillGrace}, "kill-grace", "time between SIGTERM and SIGKILL (env KILL_GRACE) (default 5s)")
	fs.IntVar(&cfg.MaxMessageBytes, "max-message-bytes", ccexecutor.MaxMessageBytes, "largest inbound frame (env MAX_MESSAGE_BYTES)")
	fs.Var(seconds{&cfg.PingInterval}, "ping-interval", "write silence before a keep-alive Ping (env PING_INTERVAL) (default 20s)")
	fs.Var(seconds{&cfg.WriteWait}, "write-wait", "time in which a client must accept 128 KiB of waiting output (env WRITE_WAIT) (default 10s)")
	fs.StringVar(&cfg.Token, "token", "", "token clients must present (env CC_EXECUTOR_TOKEN)")
	idle := idleTimeout
	fs.Var(seconds{&idle}, "idle-timeout", "time an idle HTTP keep-alive connection is kept open (env IDLE_TIMEOUT)")
	cfg.StreamTimeout, cfg.KillGrace = ccexecutor.StreamTimeout, ccexecutor.KillGrace
	cfg.PingInterval, cfg.WriteWait = ccexecutor.PingInterval, ccexecutor.WriteWait

	if p, ok := os.LookupEnv("DEFAULT_PORT"); ok {
		fs.Set("addr", net.JoinHostPort("127.0.0.1", p))
	}
	for name, env := range map[string]string{
		"addr": "ADDR", "log-level": "LOG_LEVEL", "insecure": "INSECURE", "allowed-commands": "ALLOWED_COMMANDS",
		"allow-origin": "ALLOWED_ORIGINS", "max-sessions": "MAX_SESSIONS", "stream-timeout": "STREAM_TIMEOUT",
		"max-line-bytes": "MAX_LINE_BYTES", "kill-grace": "KILL_GRACE", "max-message-bytes": "MAX_MESSAGE_BYTES",
		"ping-interval": "PING_INTERVAL", "write-wait": "WRITE_WAIT", "token": "CC_EXECUTOR_TOKEN",
		"idle-timeout": "IDLE_TIMEOUT",
	} {
		if v, ok := os.LookupEnv(env); ok {
			if err := fs.Set(name, v); err != nil {
				fmt.Fprintf(os.Stderr, "ccexecutor: invalid %s=%q: %v\n", env, v, err)
				return 2
			}
		}
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "ccexecutor: unexpected argument %q: the flags after it would be ignored\n", fs.Arg(0))
		return 2
	}
	os.Unsetenv("CC_EXECUTOR_TOKEN") // commands inherit the server's environment; not the token
	if err := check(&cfg, *addr, *insecure, *level); err != nil {
		fmt.Fprintf(os.Stderr, "ccexecutor: %v\n", err)
		return 2
	}
	cfg.AllowedCommands, cfg.AllowedOrigins = list(*allowed), list(*origins)
	var lv slog.Level
	lv.UnmarshalText([]byte(*level))
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv}))

	if err := ccexecutor.SetSubreaper(); err != nil {
		cfg.Logger.Warn("members of a run's group that outlive their parent will not be reaped", "err", err)
	}
	ln, err := net.Listen("tcp", *addr)
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
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: idle}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	fmt.Printf("ccexecutor listening on ws://%s/ws/mcp\n", ln.Addr())
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

// idleTimeout is how long an idle HTTP keep-alive connection is kept open by default.
const idleTimeout = 30 * time.Second

// check refuses a configuration the server should not start with.
func check(cfg *ccexecutor.Config, addr string, insecure bool, level string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("invalid address %q: %v", addr, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("invalid port %q in address %q", port, addr)
	}
	for name, v := range map[string]int{"max-sessions": cfg.MaxSessions, "max-line-bytes": cfg.MaxLineBytes, "max-message-bytes": cfg.MaxMessageBytes} {
		if v <= 0 {
			return fmt.Errorf("--%s must be positive, got %d", name, v)
		}
	}
	if err := new(slog.Level).UnmarshalText([]byte(level)); err != nil {
		return fmt.Errorf("invalid --log-level %q", level)
	}
	ip := net.ParseIP(host)
	if cfg.Token == "" && !insecure && host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("refusing to listen on %s without a token: anyone who can reach it could run commands as this user; set --token (or CC_EXECUTOR_TOKEN), or --insecure if a proxy in front of it authenticates", addr)
	}
	return nil
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

func (s seconds) Set(v string) error {
	d, err := time.ParseDuration(v)
	if err != nil {
		f, ferr := strconv.ParseFloat(v, 64)
		if ferr != nil {
			return fmt.Errorf("want seconds or a duration such as 1m30s")
		}
		d = time.Duration(f * float64(time.Second))
	}
	if d <= 0 {
		return fmt.Errorf("must be positive")
	}
	*s.d = d
	return nil
}
