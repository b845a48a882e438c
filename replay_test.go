package ccexecutor

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"regexp"
	"slices"
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

// TestReplayBound fills a replay until it is full, acknowledges everything, and does it again,
// with batches of several shapes one after another. The memory it holds, and keeps for reuse
// once everything is acknowledged, stays within its size, twice the batch that filled it and
// two chunks: the room that messages too large for what is left of a chunk leave counts as
// held, and spare chunks make way for a buffer larger than a chunk. The last row builds the worst
// case: the first chunk acknowledged but for its last message, a last chunk with one message,
// then a long line that fits in it.
func TestReplayBound(t *testing.T) {
	lines := func(n, size int) func() *batch {
		return func() *batch {
			b := &batch{}
			for i := range n {
				b.addOutput("stdout", bytes.Repeat([]byte("x"), size), 0, uint64(i+1))
			}
			return b
		}
	}
	message := func(size int) func() *batch {
		return func() *batch { return &batch{frames: appendFrame(nil, opText, bytes.Repeat([]byte("m"), size)), n: 1} }
	}
	for _, row := range []struct {
		name   string
		phases []func() *batch
	}{
		{"lines of 1 KB", []func() *batch{lines(30, 1000)}},
		{"messages just over half a chunk", []func() *batch{message(replayChunk/2 + 1)}},
		{"lines, then messages larger than a chunk", []func() *batch{lines(30, 1000), message(2 * replayChunk)}},
	} {
		t.Run(row.name, func(t *testing.T) {
			r := &replay{max: 1 << 20}
			for _, next := range row.phases {
				size := 0
				for !r.full() {
					b := next()
					size = len(b.frames)
					r.add(b)
				}
				limit := r.max + 2*size + 2*replayChunk
				if m := replayMem(r); m > limit {
					t.Fatalf("%d bytes of buffers for %d bytes held, over %d", m, r.bytes, limit)
				}
				r.ack(r.sent)
				if r.bytes != 0 || len(r.held) != 0 || len(r.bufs) != 0 {
					t.Fatalf("after acknowledging all: %d bytes in %d batches and %d buffers held", r.bytes, len(r.held), len(r.bufs))
				}
				if m := replayMem(r); m > limit {
					t.Fatalf("%d bytes kept for reuse, over %d", m, limit)
				}
			}
		})
	}
	// Sizes that are not a multiple of a chunk, where the room that nothing fills is largest.
	for _, size := range []int{70_000, 1<<20 + 2000} {
		t.Run(fmt.Sprintf("worst case/max=%d", size), func(t *testing.T) {
			r := &replay{max: size}
			small := message(396)
			for len(r.bufs) < 2 { // a first chunk whose messages are acknowledged, but for its last
				r.add(small())
				if len(r.bufs) < 2 {
					r.ack(r.sent - 1)
				}
			}
			for r.bytes+replayChunk+400 < r.max { // whole chunks, then one message in a new one
				for k := len(r.bufs); len(r.bufs) == k; {
					r.add(small())
				}
			}
			b := &batch{}
			if r.full() || !b.addOutput("stdout", bytes.Repeat([]byte("\x01"), 11_000), 0, 1) {
				t.Fatal("the replay is full, or the line was encoded whole")
			}
			r.add(b)
			limit := r.max + 2*(len(b.frames)+len(b.line)+len(b.tail)) + 2*replayChunk
			if m := replayMem(r); m > limit {
				t.Errorf("%d bytes of buffers, over %d", m, limit)
			}
		})
	}
}

// replayMem is the memory r's buffers take, spare chunks included.
func replayMem(r *replay) int {
	n := 0
	for _, b := range slices.Concat(r.bufs, r.spare) {
		n += cap(b)
	}
	return n
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

// TestReplayChunks feeds a replay batches of every shape, as a session might send them: many
// small messages, messages of a few KB that overflow a chunk, single messages larger than a
// chunk, and long lines. A client acknowledges some of what is held whenever the replay is
// full; after every batch a reattach from any position held must get exactly the messages
// after it, and the memory held stays within the bound.
func TestReplayChunks(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	r := &replay{max: 256 << 10}
	var all [][]byte // every message sent, in order
	biggest := 0     // the largest batch added
	for i := range 800 {
		b := &batch{}
		switch k := rng.IntN(100); {
		case k < 2: // a long line, which the writer escapes as it writes
			if !b.addOutput("stdout", bytes.Repeat([]byte("\x01"), maxInlineLine+1+rng.IntN(20000)), 0, uint64(i)) {
				t.Fatal("the long line was encoded whole")
			}
		case k < 6: // one message larger than a chunk
			b.frames, b.n = appendFrame(nil, opText, bytes.Repeat([]byte("r"), replayChunk+rng.IntN(3*replayChunk))), 1
		default: // up to 60 lines of up to 4 KB
			for range 1 + rng.IntN(60) {
				b.addOutput("stdout", bytes.Repeat([]byte("l"), rng.IntN(4096)), 0, uint64(i))
			}
		}
		for r.full() { // the writer takes nothing more until an acknowledgement frees room
			r.ack(r.dropped + 1 + rng.Uint64N(r.sent-r.dropped))
		}
		biggest = max(biggest, len(b.frames)+len(b.line)+len(b.tail))
		all = append(all, splitFrames(t, written(b))...)
		r.add(b)
		if r.sent != uint64(len(all)) {
			t.Fatalf("batch %d: sent = %d, want %d", i, r.sent, len(all))
		}
		if m, limit := replayMem(r), r.max+biggest+2*replayChunk; m > limit {
			t.Fatalf("batch %d: %d bytes of buffers, over %d", i, m, limit)
		}
		from := r.dropped + rng.Uint64N(r.sent-r.dropped+1)
		got, err := r.since(from)
		if err != nil {
			t.Fatalf("batch %d: since(%d) with %d..%d held: %v", i, from, r.dropped+1, r.sent, err)
		}
		var frames [][]byte
		for _, b := range got {
			frames = append(frames, splitFrames(t, written(b))...)
		}
		if want := all[from:]; !slices.EqualFunc(frames, want, bytes.Equal) {
			t.Fatalf("batch %d: since(%d) replayed %d messages, not the %d after it", i, from, len(frames), len(want))
		}
	}
	r.ack(r.sent)
	if r.bytes != 0 || len(r.held) != 0 || len(r.bufs) != 0 || replayMem(r) > r.max+biggest+2*replayChunk {
		t.Fatalf("after acknowledging all: %d bytes in %d batches and %d buffers held, %d bytes of buffers", r.bytes, len(r.held), len(r.bufs), replayMem(r))
	}
}

// TestReplayReuse checks that a replay whose client keeps up allocates nothing: the chunks of
// the messages acknowledged take the next ones.
func TestReplayReuse(t *testing.T) {
	r := &replay{max: 1 << 20}
	b := &batch{}
	for i := range 300 { // about 32 KB, a batch of a pump at full speed
		b.addOutput("stdout", []byte(strconv.Itoa(i)+" a line of output of typical length, 48 bytes\n"), 0, uint64(i))
	}
	round := func() { // a quarter of the buffer, as between two Pings, then its acknowledgement
		for r.bytes < r.max/4 {
			r.add(b)
		}
		r.ack(r.sent)
	}
	for range 4 {
		round()
	}
	if n := testing.AllocsPerRun(100, round); n != 0 {
		t.Errorf("%v allocations per quarter of the buffer sent and acknowledged, want 0", n)
	}
}
