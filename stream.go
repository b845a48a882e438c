package ccexecutor

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"strconv"
	"time"
	"unicode/utf8"
)

// truncMarker ends a line that was cut at the line limit.
const truncMarker = "...\n"

// readBufSize is the size of the buffer under the line reader. Lines longer than it are
// gathered from several reads, up to the line limit.
const readBufSize = 64 << 10

// readLines reads r to its end and calls emit once per line, in order. A line keeps its ending
// ("\n" or "\r\n"; none for a last line without one). A line longer than limit bytes is cut at
// the last UTF-8 character boundary at or before limit, truncMarker is appended, and dropped
// says how many bytes of the line were discarded; the rest of such a line is read and
// discarded without being held, so at most limit bytes of a line are ever in memory. more
// reports that the next line is already buffered, so that emit may batch its work.
//
// The slice passed to emit is valid only until emit returns. readLines returns nil at the end
// of r, the first error of r or of emit otherwise.
func readLines(r io.Reader, limit int, emit func(line []byte, dropped int, more bool) error) error {
	src := &countingReader{r: r}
	br := bufio.NewReaderSize(src, min(readBufSize, max(limit, 16)))
	consumed := func() int64 { return src.n - int64(br.Buffered()) }
	var line []byte
	for {
		line = line[:0]
		n := 0 // length of the line without its ending
		var ending int64
		for {
			before := consumed()
			chunk, isPrefix, err := br.ReadLine()
			if err != nil {
				if n == 0 {
					if err == io.EOF {
						return nil
					}
					return err
				}
				break // a line that filled the buffer, then the end: it has no ending
			}
			n += len(chunk)
			if room := limit - len(line); room > 0 {
				line = append(line, chunk[:min(room, len(chunk))]...)
			}
			if !isPrefix {
				ending = consumed() - before - int64(len(chunk)) // 0, 1 for "\n" or 2 for "\r\n"
				break
			}
		}
		dropped := 0
		if n > limit {
			line = cutRune(line)
			dropped = n - len(line)
			line = append(line, truncMarker...)
		} else {
			line = append(line, "\r\n"[2-ending:]...)
		}
		buffered, _ := br.Peek(br.Buffered())
		if err := emit(line, dropped, bytes.IndexByte(buffered, '\n') >= 0); err != nil {
			return err
		}
	}
}

// cutRune returns b without a partial UTF-8 character at its end.
func cutRune(b []byte) []byte {
	for i := len(b) - 1; i >= 0 && i >= len(b)-utf8.UTFMax; i-- {
		if utf8.RuneStart(b[i]) {
			if !utf8.FullRune(b[i:]) {
				return b[:i]
			}
			break
		}
	}
	return b
}

// countingReader counts the bytes read from r, so that readLines can tell how long the line
// ending was that bufio.Reader.ReadLine removed.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// streamTimeoutError is the cause of a run that outlived its stream timeout.
type streamTimeoutError struct{ d time.Duration }

func (e streamTimeoutError) Error() string {
	return "stream timeout after " + strconv.FormatFloat(e.d.Seconds(), 'f', -1, 64) + "s"
}

// withStreamTimeout returns a context that is done d after now, with a streamTimeoutError as
// its cause. The time counts whether or not the run is paused.
func withStreamTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, d, streamTimeoutError{d})
}
