package ccexecutor

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"runtime"
	"testing"
	"time"
)

// TestSlowClient guards against clients that stop reading while their command floods output:
// the server must not pile the output up in memory, must count such a client gone once a write
// has waited WriteWait, end its run's group and free its slot, and must not let the buffers of
// the output it could not send leak into the frames of another session.
func TestSlowClient(t *testing.T) {
	const long = "yes $(head -c 60000 /dev/zero | tr '\\0' x)" // lines of 60 kB: fast to pile up
	rows := []struct {
		name      string
		command   string
		clients   int // at once
		writeWait time.Duration
		heap      uint64 // the most the heap in use may grow by
	}{
		{"short lines", "yes", 1, 300 * time.Millisecond, 16 << 20},
		// A second to pile up 60 kB lines: a queue without bound grows by far more than the
		// limit in that time, even under the race detector.
		{"long lines", long, 1, time.Second, 16 << 20},
		// Lines near the line limit: what a session holds must be bounded in bytes, not only in
		// frames. Ten such clients grow the heap by 17-30 MB with two batches per stream, and
		// by 36-83 MB with a queue of sixteen batches per session.
		{"half-megabyte lines, ten clients", `x=$(head -c 500000 /dev/zero | tr '\0' x); while :; do echo "$x"; done`, 10, time.Second, 40 << 20},
		// Lines of control bytes at the line limit on both streams: each byte is six of JSON,
		// so what a session holds must be bounded in encoded bytes. Ten such clients grew the
		// heap by about 270 MB while a stream held its lines' whole JSON in two batches, and
		// by 13-35 MB since (the line buffers' growth included, which the next GC frees).
		{"half-megabyte lines of control bytes on both streams, ten clients", `x=$(head -c 524288 /dev/zero | tr '\0' '\1'); while :; do echo "$x"; echo "$x" >&2; done`, 10, time.Second, 64 << 20},
		// Several at once, so that frames of one session in the frames of another would show.
		{"six clients at once", "yes", 6, 300 * time.Millisecond, 48 << 20},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			if testing.Short() && row.clients*int(row.writeWait/time.Millisecond) > 5000 {
				t.Skip("the slowest row; it runs without -short")
			}
			logs := newLogWatch()
			ts := newTestServer(t, Config{
				WriteWait:   row.writeWait,
				KillGrace:   300 * time.Millisecond,
				MaxSessions: row.clients,
				Logger:      slog.New(logs),
			})
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			base, peak := ms.HeapInuse, ms.HeapInuse
			var clients []*client
			var pgids []int
			for range row.clients {
				c := dial(t, ts.addr)
				c.connected()
				pgid, _ := c.start(row.command, nil)
				clients, pgids = append(clients, c), append(pgids, pgid)
			}
			// From here on the clients read nothing.
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			deadline := time.NewTimer(10 * time.Second)
			defer deadline.Stop()
			for {
				n, changed := logs.count("session closed")
				if n == row.clients {
					break
				}
				select {
				case <-changed:
				case <-tick.C:
					runtime.ReadMemStats(&ms)
					peak = max(peak, ms.HeapInuse)
				case <-deadline.C:
					t.Fatalf("the sessions of clients that read nothing did not end within 10s; log: %q", logs.messages())
				}
			}
			t.Logf("heap in use grew by at most %.1f MB", float64(peak-base)/(1<<20))
			if peak > base+row.heap {
				t.Errorf("heap in use grew by %d MB while the clients read nothing, want under %d MB", (peak-base)>>20, row.heap>>20)
			}
			for _, cause := range logs.attrs("session closed", "cause") {
				if cause != errClientGone.Error() {
					t.Errorf("session closed with cause %q, want %q", cause, errClientGone)
				}
			}
			for _, pgid := range pgids {
				assertGroupGone(t, pgid)
			}
			if n := ts.sessions.len(); n != 0 {
				t.Errorf("sessions = %d, want 0", n)
			}
			// The connections were closed: what the kernel still holds drains, then they end.
			for _, c := range clients {
				c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.Copy(io.Discard, c.br); errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("the connection of a slow client is still open")
				}
			}
			// The slots are free again, and sessions work.
			for range row.clients {
				d := dial(t, ts.addr)
				d.connected()
				d.assertWorks()
				defer d.close()
			}
		})
	}
}
