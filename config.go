package ccexecutor

import (
	"log/slog"
	"time"
)

// Defaults of the tunables; a Config can override each of them.
const (
	MaxSessions     = 100              // sessions held at once; one more is refused with close code 1008
	StreamTimeout   = 5 * time.Minute  // how long a run may take before its group is ended
	MaxLineBytes    = 512 << 10        // longest output line sent whole; longer lines are cut
	KillGrace       = 5 * time.Second  // time between SIGTERM and SIGKILL when a group is ended
	WriteWait       = 10 * time.Second // time in which a client must accept 128 KiB of waiting output, or count as gone
	MaxMessageBytes = 1 << 20          // largest inbound message, all fragments together; a larger one gets -32600
	PingInterval    = 20 * time.Second // write silence after which the server sends a Ping
	ReattachBuffer  = 1 << 20          // bytes of sent messages kept for a reattach until a Pong acknowledges them
)

// Config configures a Server. A zero field takes its default.
type Config struct {
	MaxSessions     int           // default MaxSessions
	StreamTimeout   time.Duration // default StreamTimeout
	MaxLineBytes    int           // default MaxLineBytes
	KillGrace       time.Duration // default KillGrace
	WriteWait       time.Duration // default WriteWait
	MaxMessageBytes int           // default MaxMessageBytes
	PingInterval    time.Duration // default PingInterval

	// ReattachWindow, when positive, lets a client whose connection was lost reattach to its
	// session within this time, the run going on meanwhile (PROTOCOL.md, Reattach). Zero, the
	// default, ends a session when its connection is lost.
	ReattachWindow time.Duration
	ReattachBuffer int // default ReattachBuffer; used only with a ReattachWindow
	// Instance, when not empty, names this server in its resume tokens, which then begin with
	// it and a dot: so a proxy in front of several servers can send a reattach back to the one
	// that holds its session (contrib/nginx.conf).
	Instance string

	// AllowedCommands, when not empty, are the only programs execute may run: a command is then
	// split into words and run without a shell, and one holding shell syntax is refused.
	AllowedCommands []string
	// AllowedEnv are the only variables a request's env may set while AllowedCommands is not
	// empty; even when listed, those that make glibc load code or files (LD_*, GCONV_PATH, ...)
	// are refused. See CheckAllowlist.
	AllowedEnv []string
	// AllowedOrigins are the origins, besides the server's own host, whose pages may connect.
	AllowedOrigins []string
	// Token, when not empty, must be presented as "Authorization: Bearer <token>" or as the
	// query parameter token=<token> by every WebSocket handshake.
	Token string
	// Logger receives a line per session opened and closed and per run started and ended.
	// Nil means slog.Default().
	Logger *slog.Logger
	// Cgroup says how runs are contained. CgroupAuto (or empty) starts each run in a cgroup v2
	// of its own under the server's cgroup when the hierarchy is writable, and in a process
	// group only otherwise; CgroupOff uses process groups only; anything else is the directory
	// of the parent cgroup to use (such as /sys/fs/cgroup/ccexecutor), and if it cannot be used
	// no run starts (see Server.Containment).
	Cgroup string
}
