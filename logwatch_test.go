package ccexecutor

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// logWatch is a slog.Handler that keeps what a Server logs, so that a test can wait for an
// event such as "session closed" instead of sleeping or polling.
type logWatch struct {
	mu      sync.Mutex
	recs    []slog.Record
	changed chan struct{} // closed and replaced at every record
}

func newLogWatch() *logWatch { return &logWatch{changed: make(chan struct{})} }

func (w *logWatch) Enabled(context.Context, slog.Level) bool { return true }

func (w *logWatch) WithAttrs([]slog.Attr) slog.Handler { return w }

func (w *logWatch) WithGroup(string) slog.Handler { return w }

func (w *logWatch) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.recs = append(w.recs, r.Clone())
	close(w.changed)
	w.changed = make(chan struct{})
	return nil
}

// count returns how many times msg was logged, and a channel closed at the next record.
func (w *logWatch) count(msg string) (int, <-chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, r := range w.recs {
		if r.Message == msg {
			n++
		}
	}
	return n, w.changed
}

// wait waits until msg has been logged n times, and fails the test if that takes longer than d.
func (w *logWatch) wait(t *testing.T, msg string, n int, d time.Duration) {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		got, changed := w.count(msg)
		if got >= n {
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Fatalf("%q was not logged %d times within %v; log: %q", msg, n, d, w.messages())
		}
	}
}

// messages returns what was logged, a string per record.
func (w *logWatch) messages() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, r := range w.recs {
		var b strings.Builder
		b.WriteString(r.Message)
		r.Attrs(func(a slog.Attr) bool {
			if a.Key != "session" {
				fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
			}
			return true
		})
		out = append(out, b.String())
	}
	return out
}

// attrs returns the attribute key of every record msg, as text.
func (w *logWatch) attrs(msg, key string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var vals []string
	for _, r := range w.recs {
		if r.Message == msg {
			r.Attrs(func(a slog.Attr) bool {
				if a.Key == key {
					vals = append(vals, fmt.Sprint(a.Value.Any()))
				}
				return true
			})
		}
	}
	return vals
}
