package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ccexecutor/ccexecutor"
)

// TestBench runs the load tool against its in-process server and checks that the report
// counts exactly what the commands printed, and counts failures as errors.
func TestBench(t *testing.T) {
	url, stop, err := startServer(ccexecutor.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	for _, tc := range []struct {
		command          string
		sessions, runs   int
		runsOK           int
		lines, bytes     int64
		errors           int
		errorMentionsRun string
	}{
		// seq 1 1000 prints 9 one-digit, 90 two-digit, 900 three-digit lines and "1000".
		{"seq 1 1000", 3, 2, 6, 6 * 1000, 6 * (9*2 + 90*3 + 900*4 + 5), 0, ""},
		{"printf 'a\\tb\"c\\nno newline'", 1, 2, 2, 2 * 2, 2 * 16, 0, ""},
		{"echo out; echo err >&2", 2, 1, 2, 2 * 2, 2 * 8, 0, ""},
		{"seq 1 5; exit 3", 1, 3, 0, 5, 10, 1, "run 1: run failed"},
	} {
		t.Run(tc.command, func(t *testing.T) {
			rep, err := runBench(benchOptions{url: url, command: tc.command, sessions: tc.sessions, runs: tc.runs, timeout: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Runs != tc.runsOK || rep.Lines != tc.lines || rep.Bytes != tc.bytes || rep.Errors != tc.errors {
				t.Errorf("runs %d, lines %d, bytes %d, errors %d %q; want %d, %d, %d, %d",
					rep.Runs, rep.Lines, rep.Bytes, rep.Errors, rep.ErrorSample, tc.runsOK, tc.lines, tc.bytes, tc.errors)
			}
			if tc.errors > 0 && (len(rep.ErrorSample) == 0 || !strings.Contains(rep.ErrorSample[0], tc.errorMentionsRun)) {
				t.Errorf("errors %q, want one about %q", rep.ErrorSample, tc.errorMentionsRun)
			}
			if tc.errors == 0 && (rep.TTFOP50Ms <= 0 || rep.TTFOP99Ms < rep.TTFOP50Ms || rep.WallS <= 0) {
				t.Errorf("times not measured: %+v", rep)
			}
		})
	}
}

// TestBenchSeqCheck checks that a seq's output is checked number by number.
func TestBenchSeqCheck(t *testing.T) {
	for _, tc := range []struct {
		command string
		want    int
	}{
		{"seq 1 200000", 200000},
		{"seq 7", 7},
		{"seq 2 9", -1},
		{"seq 1 5; echo 6", -1},
		{"echo 1", -1},
	} {
		if got := seqCount(tc.command); got != tc.want {
			t.Errorf("seqCount(%q) = %d, want %d", tc.command, got, tc.want)
		}
	}
	url, stop, err := startServer(ccexecutor.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	// Looks like seq 1 3 to the checker, but prints 1 3 2.
	c, err := dial(url, time.Now().Add(time.Minute), true)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	var s runStats
	err = c.run(1, "printf '1\\n3\\n2\\n'", 3, &s)
	if err == nil || !strings.Contains(err.Error(), `stdout line 2 is "3\n"`) {
		t.Errorf("out-of-order output: err = %v, want it reported", err)
	}
}

// TestBenchAnswersPings runs a command that is silent for several ping intervals: the server
// drops a client that does not answer its Pings, so the run only completes if bench answers.
func TestBenchAnswersPings(t *testing.T) {
	url, stop, err := startServer(ccexecutor.Config{PingInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	rep, err := runBench(benchOptions{url: url, command: "sleep 0.2; echo done", sessions: 1, runs: 1, timeout: time.Minute})
	if err != nil || rep.Runs != 1 || rep.Errors != 0 {
		t.Fatalf("report %+v, err %v", rep, err)
	}
}

// TestBenchNoRead floods a client that never reads: the report must show the server's memory
// and that the server dropped the session, here after a short write deadline.
func TestBenchNoRead(t *testing.T) {
	url, stop, err := startServer(ccexecutor.Config{WriteWait: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	rep, err := runBench(benchOptions{url: url, command: "yes", sessions: 1, timeout: time.Minute, noRead: 3 * time.Second, serverPID: os.Getpid()})
	if err != nil || rep.Errors != 0 || rep.EndedAfterS <= 0 || rep.RSSKB <= 0 || rep.HWMKB < rep.RSSKB {
		t.Fatalf("report %+v, err %v", rep, err)
	}
}

// outputFrame is a process.output as the server encodes it.
func outputFrame(stream, data string) []byte {
	b, _ := json.Marshal(data)
	return fmt.Appendf(nil, `{"jsonrpc":"2.0","method":"process.output","params":{"type":"%s","data":%s,"truncated":false}}`, stream, b)
}

// TestDecodeOutput checks the scanner against encoding/json on the escapes that matter.
func TestDecodeOutput(t *testing.T) {
	for _, data := range []string{
		"", "1\n", "plain", "x\n", `"quoted"` + "\n", `back\slash`, "\\n literal\n", "tab\tcr\r\n",
		"\x00\x1f ctl", "ünïcödé ✓ \U0001F600\n", "\uFFFD", "<html>&amp;</html>\n", "\n\n", `\`,
	} {
		for _, stream := range []string{"stdout", "stderr"} {
			got, stderr, err := decodeOutput(outputFrame(stream, data), []byte("keep:"))
			if err != nil || string(got) != "keep:"+data || stderr != (stream == "stderr") {
				t.Errorf("decodeOutput(%s %q) = %q, %v, %v", stream, data, got, stderr, err)
			}
		}
	}
	for _, bad := range []string{`{"method":"process.output"}`, `{"method":"process.output","params":{"data":"abc`} {
		if _, _, err := decodeOutput([]byte(bad), nil); err == nil {
			t.Errorf("decodeOutput(%s): no error", bad)
		}
	}
}

// BenchmarkDecodeOutput compares the client's scanner with decoding the same frame with
// encoding/json into the smallest struct that holds what the client needs.
func BenchmarkDecodeOutput(b *testing.B) {
	for _, data := range []string{"123456\n", strings.Repeat("a", 4096) + "\n", `{"k": "v"}` + "\n"} {
		p := outputFrame("stdout", data)
		b.Run(fmt.Sprintf("scanner/%dB", len(data)), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(p)))
			var line []byte
			for b.Loop() {
				if kind(p) != msgOutput {
					b.Fatal("not output")
				}
				line, _, _ = decodeOutput(p, line[:0])
			}
		})
		b.Run(fmt.Sprintf("unmarshal/%dB", len(data)), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				var m struct {
					Method string
					Params struct{ Type, Data string }
				}
				if err := json.Unmarshal(p, &m); err != nil || m.Method != "process.output" {
					b.Fatal(err)
				}
			}
		})
	}
}
