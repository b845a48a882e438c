package ccexecutor

import (
	"fmt"
	"log/slog"
	"sync"
	"time"
	"unicode/utf8"
)

// Refusals are logged at warn, but not all of them: a flood of refused handshakes must not
// become a flood of log lines.
const (
	refusalBurst  = 5           // lines logged per reason in each refusalEvery; the rest are counted
	refusalEvery  = time.Second // the window refusalBurst counts in
	maxLoggedText = 1 << 10     // bytes of a client's text (a command line, a Host) logged; longer is cut, its length given
)

// rateLimiter lets at most burst events of each key through in each window of every, and
// counts the others. Its keys must come from a fixed set, such as the reasons of refusals:
// it keeps one counter per key for good.
type rateLimiter struct {
	burst int
	every time.Duration

	mu   sync.Mutex         // guards keys; held for map and counter work only
	keys map[string]*window // by key
}

// window counts the events of one key.
type window struct {
	start time.Time // when the current window began
	n     int       // events let through since start
	held  int       // events held back since the last one let through
}

// allow reports whether an event of key may go through now and, if so, how many events of key
// were held back since the last one that went through.
func (l *rateLimiter) allow(key string) (ok bool, held int) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.keys[key]
	if w == nil {
		if l.keys == nil {
			l.keys = make(map[string]*window)
		}
		w = &window{start: now}
		l.keys[key] = w
	}
	if now.Sub(w.start) >= l.every {
		w.start, w.n = now, 0
	}
	if w.n >= l.burst {
		w.held++
		return false, 0
	}
	w.n++
	held, w.held = w.held, 0
	return true, held
}

// refusalLog logs refusals at warn, at most refusalBurst lines per reason in each
// refusalEvery; the next line logged for a reason says how many were left out before it.
type refusalLog struct {
	log   *slog.Logger
	limit rateLimiter
}

func newRefusalLog(log *slog.Logger) *refusalLog {
	return &refusalLog{log: log, limit: rateLimiter{burst: refusalBurst, every: refusalEvery}}
}

// warn logs msg with the reason and args, unless too many refusals for reason were logged
// lately. reason must come from a fixed set: it is the key of the rate limit.
func (r *refusalLog) warn(msg, reason string, args ...any) {
	ok, held := r.limit.allow(reason)
	if !ok {
		return
	}
	args = append(args, "reason", reason)
	if held > 0 {
		args = append(args, "suppressed", held)
	}
	r.log.Warn(msg, args...)
}

// loggedText is text from a client, such as a command line, as it is logged: whole up to
// maxLoggedText bytes, else cut there, at a character boundary, with its length.
func loggedText(line string) string {
	if len(line) <= maxLoggedText {
		return line
	}
	cut := maxLoggedText
	for cut > 0 && !utf8.RuneStart(line[cut]) {
		cut--
	}
	return fmt.Sprintf("%s... (%d bytes)", line[:cut], len(line))
}
