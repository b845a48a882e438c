package ccexecutor

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestReplay checks the replay a reattach is served from: messages are counted across batches,
// since cuts a batch at a message boundary, long lines included, ack forgets only whole batches,
// and a position outside what is held is refused.
func TestReplay(t *testing.T) {
	// Three batches: messages 1-3 (output lines a, b, c), 4 (a response), 5-6 (line d, then a
	// long line whose JSON the writer escapes as it writes).
	long := strings.Repeat("é\x01", maxInline/2)
	batches := func() []*batch {
		b1 := &batch{}
		for i, l := range []string{"a\n", "b\n", "c\n"} {
			b1.addOutput("stdout", []byte(l), 0, uint64(i+1))
		}
		b2 := response([]byte("7"), map[string]string{"status": "paused"})
		b3 := &batch{}
		b3.addOutput("stderr", []byte("d\n"), 0, 4)
		if !b3.addOutput("stdout", []byte(long), 0, 5) {
			t.Fatal("the long line was encoded whole")
		}
		return []*batch{b1, b2, b3}
	}
	// The messages as a client reads them, in order.
	var all [][]byte
	for _, b := range batches() {
		all = append(all, splitFrames(t, written(b))...)
	}
	if len(all) != 6 {
		t.Fatalf("%d messages in the batches, want 6", len(all))
	}

	for _, row := range []struct {
		name  string
		acked uint64 // acknowledged before the reattach
		from  uint64 // received, as the client says
		err   string // the refusal, or "" for a replay of messages from+1..6
	}{
		{"everything", 0, 0, ""},
		{"inside the first batch", 0, 2, ""},
		{"at a batch's end", 0, 3, ""},
		{"before the long line", 0, 5, ""},
		{"all received", 0, 6, ""},
		{"ack inside a batch keeps it", 2, 1, ""},
		{"ack of whole batches", 4, 4, ""},
		{"ack of whole batches, then less", 4, 3, "messages up to 4 were acknowledged and are no longer held"},
		{"received beyond sent", 0, 7, "received 7 but only 6 messages were sent"},
	} {
		t.Run(row.name, func(t *testing.T) {
			r := &replay{max: 1 << 20}
			for _, b := range batches() {
				r.add(b)
			}
			r.add(closeFrame(1000, "")) // no message: not counted, not held
			if r.sent != 6 {
				t.Fatalf("sent = %d, want 6", r.sent)
			}
			r.ack(row.acked)
			got, err := r.since(row.from)
			switch {
			case row.err != "":
				if err == nil || err.Error() != row.err {
					t.Fatalf("since(%d) = %v, want %q", row.from, err, row.err)
				}
				return
			case err != nil:
				t.Fatalf("since(%d): %v", row.from, err)
			}
			var frames [][]byte
			for _, b := range got {
				frames = append(frames, splitFrames(t, written(b))...)
			}
			want := all[row.from:]
			if len(frames) != len(want) {
				t.Fatalf("replayed %d messages, want %d", len(frames), len(want))
			}
			for i := range want {
				if !bytes.Equal(frames[i], want[i]) {
					t.Errorf("message %d: %.80q, want %.80q", int(row.from)+i+1, frames[i], want[i])
				}
			}
		})
	}
}

// TestReplayBound checks that the replay holds at most its size and a batch, and that its
// buffers kept for reuse count against that size.
func TestReplayBound(t *testing.T) {
	r := &replay{max: 100 << 10}
	line := bytes.Repeat([]byte("x"), 1000)
	for i := 0; !r.full(); i++ {
		b := &batch{}
		for range 30 {
			b.addOutput("stdout", line, 0, uint64(i+1))
		}
		r.add(b)
		if r.bytes > r.max+maxBatch+maxInline {
			t.Fatalf("%d bytes held, over %d and a batch", r.bytes, r.max)
		}
	}
	r.ack(r.sent)
	if r.bytes != 0 || len(r.held) != 0 {
		t.Fatalf("after acknowledging all: %d bytes in %d batches held", r.bytes, len(r.held))
	}
	if r.spared > r.max {
		t.Fatalf("%d bytes kept for reuse, over %d", r.spared, r.max)
	}
}

// written is what the writer sends for b.
func written(b *batch) []byte {
	out := append(bytes.Clone(b.frames), appendEscaped(nil, b.line)...)
	if b.line != nil {
		out = append(out, b.tail...)
	}
	return out
}

// splitFrames splits whole unmasked frames.
func splitFrames(t *testing.T, b []byte) [][]byte {
	t.Helper()
	var out [][]byte
	for len(b) > 0 {
		rest := skipFrames(b, 1)
		if len(rest) > len(b) {
			t.Fatal("skipFrames grew")
		}
		out = append(out, b[:len(b)-len(rest)])
		b = rest
	}
	return out
}

// TestPongWithoutAck checks that a client whose Pongs acknowledge nothing is logged, once: with
// a reattach window its run would otherwise wait, once the buffer is full, with no sign why.
func TestPongWithoutAck(t *testing.T) {
	logs := newLogWatch()
	ts := newTestServer(t, Config{ReattachWindow: time.Minute, Logger: slog.New(logs)})
	c := dial(t, ts.addr)
	c.connected()
	const warning = "a Pong that does not echo the server's Ping: nothing is acknowledged, and the run will wait once the reattach buffer is full"
	for _, row := range []struct {
		pong []byte
		want int // warnings logged after it
	}{
		{binary.BigEndian.AppendUint64(nil, 0), 0}, // an acknowledgement
		{nil, 1},
		{[]byte("ping"), 1}, // logged once per connection
	} {
		c.writeFrame(0xA, row.pong)
		// Frames are read in order: once the request after the Pong is answered, the Pong
		// was handled.
		if m := c.call("nothing", nil); m.Error == nil {
			t.Fatalf("nothing: %s", m.raw)
		}
		if n, _ := logs.count(warning); n != row.want {
			t.Errorf("after a Pong of %q: %d warnings, want %d", row.pong, n, row.want)
		}
	}
}

// TestInstanceToken checks that a server with an Instance name puts it at the head of its
// resume tokens, which a proxy routes by, and that such a token reattaches.
func TestInstanceToken(t *testing.T) {
	ts := newTestServer(t, Config{ReattachWindow: time.Minute, Instance: "east-1"})
	connected := regexp.MustCompile(`"session_id":"([^"]+)".*"resume_token":"(east-1\.[0-9a-f]{32})"`)
	c := dial(t, ts.addr)
	first := connected.FindStringSubmatch(c.next().raw)
	if first == nil {
		t.Fatal("connected has no resume_token east-1.<32 hex digits>")
	}
	// A reattach, be it after the server noticed the loss or a takeover before it.
	query := url.Values{"session_id": {first[1]}, "resume": {first[2]}, "received": {"0"}}
	r, resp, err := dialTarget(t, ts.addr, "/ws/mcp?"+query.Encode(), nil, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("reattach: %v %v", resp, err)
	}
	got := r.next().raw
	if m := connected.FindStringSubmatch(got); m == nil || m[1] != first[1] || m[2] == first[2] {
		t.Fatalf("reattach: %s; want connected to session %s with a new east-1 token", got, first[1])
	}
}

// TestRefusedPositionsLogKey checks that reattaches refused for their position, whose messages
// have numbers in them, share one key of the refusal log's rate limit, which keeps every key
// for good: else each number would add one.
func TestRefusedPositionsLogKey(t *testing.T) {
	ts := newTestServer(t, Config{ReattachWindow: time.Minute})
	c := rattach(t, ts.addr)
	for i := range 20 {
		n := 1000 + i
		assertResumeRefused(t, ts.addr, c.id, c.token, strconv.Itoa(n), fmt.Sprintf("received %d but only 0 messages were sent", n))
	}
	ts.refused.limit.mu.Lock()
	defer ts.refused.limit.mu.Unlock()
	for key := range ts.refused.limit.keys {
		if strings.Contains(key, "received") {
			t.Errorf("refusal log key %q: want a key without the numbers", key)
		}
	}
	if _, ok := ts.refused.limit.keys["position not held"]; !ok {
		t.Errorf("refusal log keys %v: want position not held", ts.refused.limit.keys)
	}
}
