package ccexecutor

import (
	"bufio"
	"io"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// metrics are the server's counters, written on /metrics in the Prometheus text exposition
// format, version 0.0.4. Every field is updated with atomics alone, so that counting costs no
// lock, and output lines are counted by their pump and added in bulk (see streamCounter). The
// zero value is ready to use.
type metrics struct {
	admitted   atomic.Int64
	detached   atomic.Int64 // sessions without a connection now, waiting for a reattach
	detaches   atomic.Int64
	reattached atomic.Int64
	refused    [len(refuseReasons)]atomic.Int64
	started    atomic.Int64
	ended      [len(endCauses)][len(exitClasses)]atomic.Int64
	kills      atomic.Int64
	startFails atomic.Int64
	lines      [len(streams)]atomic.Int64
	bytes      [len(streams)]atomic.Int64
	truncated  [len(streams)]atomic.Int64
	dropped    [len(dropReasons)]atomic.Int64
	duration   histogram // of runs, from start to end
	firstOut   histogram // from a run's start to its first output line
}

// Label values of the labelled counters; the constants below index them.
var (
	refuseReasons = [...]string{"host", "origin", "token", "limit", "shutting_down", "resume"}
	endCauses     = [...]string{"exit", "canceled", "timeout", "disconnect", "shutdown"}
	exitClasses   = [...]string{"0", "nonzero", "signal"}
	streams       = [...]string{"stdout", "stderr"}
	dropReasons   = [...]string{"write_deadline", "ping"}
)

const (
	refuseHost = iota
	refuseOrigin
	refuseToken
	refuseLimit
	refuseShuttingDown
	refuseResume
)

const (
	endExit = iota
	endCanceled
	endTimeout
	endDisconnect
	endShutdown
)

const (
	dropWriteDeadline = iota
	dropPing
)

// refuse counts a request refused for reason, one of the refuse constants.
func (m *metrics) refuse(reason int) { m.refused[reason].Add(1) }

// detach counts a session that lost its connection (d = 1), or that ended without one (d = -1).
func (m *metrics) detach(d int64) {
	m.detached.Add(d)
	if d > 0 {
		m.detaches.Add(1)
	}
}

// reattach counts a reattach, of a detached session or a takeover of a live one.
func (m *metrics) reattach(detached bool) {
	m.reattached.Add(1)
	if detached {
		m.detached.Add(-1)
	}
}

// killed counts an escalation to SIGKILL; supervise calls it.
func (m *metrics) killed() { m.kills.Add(1) }

// drop counts a client dropped for reason, one of the drop constants.
func (m *metrics) drop(reason int) { m.dropped[reason].Add(1) }

// stream returns the counter of one output stream ("stdout" or "stderr") of a run, for its
// pump alone. first holds the run's start, in Unix nanoseconds, until a pump swaps it for 0 to
// observe the time to the run's first output line.
func (m *metrics) stream(stream string, first *atomic.Int64) streamCounter {
	i := 0
	if stream == "stderr" {
		i = 1
	}
	return streamCounter{m: m, i: i, first: first}
}

// flushLines is how many lines a streamCounter counts before it adds them to the metrics even
// though more are ready.
const flushLines = 1024

// A streamCounter counts the lines of one stream of one run. It is owned by the stream's pump
// and adds its counts to the shared metrics only when no further line is ready, every
// flushLines lines and at flush: so that a line costs no atomic operation while output floods.
type streamCounter struct {
	m                       *metrics
	i                       int           // index in streams
	first                   *atomic.Int64 // nil once this stream has had its first line
	lines, bytes, truncated int64         // counted and not yet added to m
}

// line counts a line sent, of which dropped bytes were cut; more says that the next line is
// ready.
func (c *streamCounter) line(line []byte, dropped int, more bool) {
	c.lines++
	c.bytes += int64(len(line))
	if dropped > 0 {
		c.truncated++
	}
	if c.first != nil {
		if t := c.first.Swap(0); t != 0 {
			c.m.firstOut.observe(time.Duration(time.Now().UnixNano() - t))
		}
		c.first = nil
	}
	if !more || c.lines >= flushLines {
		c.flush()
	}
}

// flush adds what c counted to the metrics.
func (c *streamCounter) flush() {
	if c.lines == 0 {
		return
	}
	c.m.lines[c.i].Add(c.lines)
	c.m.bytes[c.i].Add(c.bytes)
	if c.truncated > 0 {
		c.m.truncated[c.i].Add(c.truncated)
	}
	c.lines, c.bytes, c.truncated = 0, 0, 0
}

// runEnded counts the end of a run that lasted d, with its cause (an end constant) and its
// exit code: the status, or the negative number of the signal that ended it.
func (m *metrics) runEnded(cause, exit int, d time.Duration) {
	class := 0
	switch {
	case exit < 0:
		class = 2
	case exit > 0:
		class = 1
	}
	m.ended[cause][class].Add(1)
	m.duration.observe(d)
}

// bucketBounds are the upper bounds, in seconds, of the histograms' buckets: from a
// millisecond, for the first output of a quick command, to an hour, beyond the stream timeout.
var bucketBounds = [...]float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600}

// histogram counts observations in the buckets of bucketBounds, one counter per bucket (not
// cumulative: writeHistogram sums them), plus one for +Inf.
type histogram struct {
	counts [len(bucketBounds) + 1]atomic.Int64
	sum    atomic.Int64 // nanoseconds
}

func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(bucketBounds) && s > bucketBounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

// buildInfo is the ccexecutor_build_info labels.
type buildInfo struct{ version, goversion string }

// readBuildInfo returns the main module's version and the Go version the binary was built with.
func readBuildInfo() buildInfo {
	b := buildInfo{"unknown", runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		b.version = bi.Main.Version
	}
	return b
}

// metricsContentType is the Content-Type of the text exposition format.
const metricsContentType = "text/plain; version=0.0.4; charset=utf-8"

// write writes every metric to w in the text exposition format; active is the number of
// sessions held.
func (m *metrics) write(w io.Writer, active int, b buildInfo) error {
	e := expo{bufio.NewWriter(w)}
	e.family("ccexecutor_build_info", "gauge", "Always 1; the labels say which build is running.")
	e.sample("ccexecutor_build_info", []string{"version", b.version, "goversion", b.goversion}, 1)
	e.family("ccexecutor_sessions_active", "gauge", "Sessions held now, each using a slot of the session limit.")
	e.sample("ccexecutor_sessions_active", nil, int64(active))
	e.family("ccexecutor_sessions_admitted_total", "counter", "WebSocket sessions admitted.")
	e.sample("ccexecutor_sessions_admitted_total", nil, m.admitted.Load())
	e.family("ccexecutor_sessions_detached", "gauge", "Sessions held now that lost their connection and wait for their client to reattach.")
	e.sample("ccexecutor_sessions_detached", nil, m.detached.Load())
	e.family("ccexecutor_session_detaches_total", "counter", "Connections lost by a session that waited for a reattach.")
	e.sample("ccexecutor_session_detaches_total", nil, m.detaches.Load())
	e.family("ccexecutor_reattaches_total", "counter", "Connections reattached to their session.")
	e.sample("ccexecutor_reattaches_total", nil, m.reattached.Load())
	e.family("ccexecutor_refused_total", "counter", "Requests refused, by reason: host (any path), origin, token (WebSocket and /metrics), limit, shutting_down and resume (WebSocket).")
	for i, r := range refuseReasons {
		e.sample("ccexecutor_refused_total", []string{"reason", r}, m.refused[i].Load())
	}
	e.family("ccexecutor_runs_started_total", "counter", "Commands started.")
	e.sample("ccexecutor_runs_started_total", nil, m.started.Load())
	e.family("ccexecutor_runs_ended_total", "counter", "Runs ended, by cause and by class of exit code: 0, nonzero, or signal (ended by a signal).")
	for i, cause := range endCauses {
		for j, class := range exitClasses {
			e.sample("ccexecutor_runs_ended_total", []string{"cause", cause, "class", class}, m.ended[i][j].Load())
		}
	}
	e.family("ccexecutor_start_failures_total", "counter", "Commands that could not be started.")
	e.sample("ccexecutor_start_failures_total", nil, m.startFails.Load())
	e.family("ccexecutor_kill_escalations_total", "counter", "Process groups still alive after the kill grace, sent SIGKILL.")
	e.sample("ccexecutor_kill_escalations_total", nil, m.kills.Load())
	e.family("ccexecutor_output_lines_total", "counter", "Output lines sent, by stream.")
	for i, s := range streams {
		e.sample("ccexecutor_output_lines_total", []string{"stream", s}, m.lines[i].Load())
	}
	e.family("ccexecutor_output_bytes_total", "counter", "Bytes of output lines sent, by stream, after truncation.")
	for i, s := range streams {
		e.sample("ccexecutor_output_bytes_total", []string{"stream", s}, m.bytes[i].Load())
	}
	e.family("ccexecutor_output_truncated_lines_total", "counter", "Output lines cut at the line limit, by stream.")
	for i, s := range streams {
		e.sample("ccexecutor_output_truncated_lines_total", []string{"stream", s}, m.truncated[i].Load())
	}
	e.family("ccexecutor_clients_dropped_total", "counter", "Clients counted gone, by reason: a write outlived the write wait, or a Ping went unanswered.")
	for i, r := range dropReasons {
		e.sample("ccexecutor_clients_dropped_total", []string{"reason", r}, m.dropped[i].Load())
	}
	e.histogram("ccexecutor_run_duration_seconds", "Time from a run's start to its end.", &m.duration)
	e.histogram("ccexecutor_first_output_seconds", "Time from a run's start to its first output line.", &m.firstOut)
	return e.w.Flush()
}

// expo writes the text exposition format. Write errors are kept by the bufio.Writer and
// reported by Flush.
type expo struct{ w *bufio.Writer }

func (e expo) family(name, typ, help string) {
	e.w.WriteString("# HELP " + name + " " + helpEscaper.Replace(help) + "\n")
	e.w.WriteString("# TYPE " + name + " " + typ + "\n")
}

// sample writes one sample; labels are name, value pairs.
func (e expo) sample(name string, labels []string, v int64) {
	e.w.WriteString(name)
	for i := 0; i < len(labels); i += 2 {
		if i == 0 {
			e.w.WriteByte('{')
		} else {
			e.w.WriteByte(',')
		}
		e.w.WriteString(labels[i] + `="` + labelEscaper.Replace(labels[i+1]) + `"`)
		if i+2 == len(labels) {
			e.w.WriteByte('}')
		}
	}
	e.w.WriteString(" " + strconv.FormatInt(v, 10) + "\n")
}

// histogram writes h with cumulative buckets, the last one +Inf, then its sum and count. The
// count is the +Inf bucket's, read once, so the two always agree.
func (e expo) histogram(name, help string, h *histogram) {
	e.family(name, "histogram", help)
	var cum int64
	for i := range h.counts {
		cum += h.counts[i].Load()
		le := "+Inf"
		if i < len(bucketBounds) {
			le = strconv.FormatFloat(bucketBounds[i], 'g', -1, 64)
		}
		e.sample(name+"_bucket", []string{"le", le}, cum)
	}
	e.w.WriteString(name + "_sum " + strconv.FormatFloat(time.Duration(h.sum.Load()).Seconds(), 'g', -1, 64) + "\n")
	e.sample(name+"_count", nil, cum)
}

// The escapes of the format: a label value escapes backslash, double quote and newline; a
// HELP text backslash and newline.
var (
	labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
)
