package ccexecutor

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"slices"
	"sync"
	"syscall"
	"testing"
)

// TestControlAfterGroupGone guards against signalling a group that is gone: once process.wait
// has found the group empty, its PGID may be reused by an unrelated group (seen while an
// escaped process held the pipes through a long kill grace). From then on PAUSE and RESUME
// must signal nothing and answer as for a finished run, with success that changes nothing.
// The process here is real but for kill, which records what it would have sent.
func TestControlAfterGroupGone(t *testing.T) {
	const pgid = 4242 // never signalled: kill is fake
	rows := []struct {
		typ, status string
		gone        bool
		want        []syscall.Signal // what reaches kill
	}{
		{"PAUSE", "paused", false, []syscall.Signal{syscall.SIGSTOP}},
		{"RESUME", "resumed", false, []syscall.Signal{syscall.SIGCONT}},
		{"PAUSE", "paused", true, nil},
		{"RESUME", "resumed", true, nil},
	}
	for _, row := range rows {
		name := row.typ + "/group alive"
		if row.gone {
			name = row.typ + "/group gone"
		}
		t.Run(name, func(t *testing.T) {
			var mu sync.Mutex
			var sent []syscall.Signal
			p := &process{
				pid:     pgid,
				leader:  make(chan struct{}),
				recheck: make(chan struct{}, 1),
				empty:   make(chan struct{}),
				kill: func(pid int, sig syscall.Signal) error {
					mu.Lock()
					defer mu.Unlock()
					if pid != -pgid {
						t.Errorf("kill(%d, %v), want the group -%d", pid, sig, pgid)
					}
					sent = append(sent, sig)
					return nil
				},
			}
			if row.gone {
				close(p.leader)
				p.mu.Lock() // as process.wait closes it
				close(p.empty)
				p.mu.Unlock()
			}
			s := &session{
				srv:    &Server{},
				out:    make(chan *batch, queueLen),
				failed: make(chan struct{}),
				log:    func(string, ...any) {},
			}
			_, cancel := context.WithCancelCause(t.Context())
			defer cancel(nil)
			s.run = &run{p: p, cancel: cancel}
			s.control(json.RawMessage(`1`), json.RawMessage(`{"type":"`+row.typ+`"}`))

			mu.Lock()
			if !slices.Equal(sent, row.want) {
				t.Errorf("signals sent: %v, want %v", sent, row.want)
			}
			mu.Unlock()
			close(s.out)
			var got []string
			for b := range s.out {
				got = append(got, framePayloads(t, b.frames)...)
			}
			want := []string{
				`{"jsonrpc":"2.0","result":{"status":"` + row.status + `"},"id":1}`,
				`{"jsonrpc":"2.0","method":"process.` + row.status + `","params":{"status":"` + row.status + `","pid":4242,"pgid":4242,"exit_code":null,"error":null}}`,
			}
			if !slices.Equal(got, want) {
				t.Errorf("frames:\n%q\nwant\n%q", got, want)
			}
		})
	}
}

// framePayloads splits the server's unmasked, unfragmented frames into their payloads.
func framePayloads(t *testing.T, b []byte) []string {
	t.Helper()
	var payloads []string
	for len(b) > 0 {
		if len(b) < 2 {
			t.Fatalf("truncated frame header %x", b)
		}
		n, head := uint64(b[1]&0x7f), 2
		switch n {
		case 126:
			n, head = uint64(binary.BigEndian.Uint16(b[2:])), 4
		case 127:
			n, head = binary.BigEndian.Uint64(b[2:]), 10
		}
		if uint64(len(b)-head) < n {
			t.Fatalf("truncated frame of %d bytes", n)
		}
		payloads = append(payloads, string(b[head:uint64(head)+n]))
		b = b[uint64(head)+n:]
	}
	return payloads
}
