package ccexecutor

import (
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// fdsPerRun is how many file descriptors a run may hold at once while it starts: two pipes,
// /dev/null for stdin, os/exec's pipe for start errors and the child's pidfd.
const fdsPerRun = 8

// fdReserve is how many file descriptors MaxConns leaves to the rest of the process: standard
// streams, the listener, the poller, logs, and the connections refused while at the limit.
const fdReserve = 64

// MaxConns returns how many connections the process can hold open while keeping a file
// descriptor for everything that the runs of maxSessions sessions need at once: the soft
// RLIMIT_NOFILE less fdReserve and fdsPerRun per session, and at least 1. Pass it to
// LimitListener.
func MaxConns(maxSessions int) int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<30 {
		return 1 << 30
	}
	return max(int(rl.Cur)-fdReserve-maxSessions*fdsPerRun, 1)
}

// LimitListener returns a listener that accepts connections from l and closes at once each
// one accepted while max of them are open, so that a flood of connections that hold no session
// (idle HTTP keep-alives, handshakes never finished) makes the server refuse new connections
// rather than run out of file descriptors and fail the runs of sessions it has admitted. Use
// MaxConns(cfg.MaxSessions) as max. A connection counts until it is closed, hijacked ones
// included.
func LimitListener(l net.Listener, max int) net.Listener {
	return &limitListener{Listener: l, max: int64(max)}
}

type limitListener struct {
	net.Listener
	max  int64
	open atomic.Int64 // connections accepted and not yet closed
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) <= l.max {
			return &limitedConn{Conn: c, l: l}, nil
		}
		l.open.Add(-1)
		c.Close()
	}
}

// limitedConn is a connection that counts against its listener's limit until it is closed.
type limitedConn struct {
	net.Conn
	l    *limitListener
	once sync.Once
}

// Close closes the connection and frees its place, once; first the place, so that a client
// that sees the connection closed can connect again at once.
func (c *limitedConn) Close() error {
	c.once.Do(func() { c.l.open.Add(-1) })
	return c.Conn.Close()
}

// CloseWrite shuts down the writing side of a TCP connection, as net/http asks of a connection
// before it closes it.
func (c *limitedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
