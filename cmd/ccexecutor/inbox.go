package main

import (
	"sync"
)

// An inbox holds the frames read from the server until the runner has printed them, up to
// readAhead bytes: the reader goroutine goes on reading, and answering Pings, while stdout
// is blocked (a pager, a slow pipe), and only a consumer that falls readAhead behind makes the
// server wait. Frames come in chunks, the memory they were read into, which go back to the
// reader once printed.
type inbox struct {
	ready chan struct{} // holds a token while frames or the error wait to be taken
	room  chan struct{} // holds a token after taken frames were printed
	free  chan []byte   // printed chunks, for the reader to read into again

	mu     sync.Mutex
	frames [][]byte // read, not yet taken
	chunks [][]byte // the chunks of frames
	held   int      // bytes of the chunks read and not yet printed: frames', and those taken
	err    error    // why reading ended: the last thing put
}

func newInbox() *inbox {
	return &inbox{ready: make(chan struct{}, 1), room: make(chan struct{}, 1), free: make(chan []byte, 4)}
}

// put adds frames, which lie in chunk, and the error that ended reading if err is not nil, and
// then waits while readAhead bytes are held. It returns false if quit was closed meanwhile.
func (in *inbox) put(frames [][]byte, chunk []byte, err error, quit <-chan struct{}) bool {
	in.mu.Lock()
	in.frames = append(in.frames, frames...)
	in.chunks = append(in.chunks, chunk)
	in.held += len(chunk)
	if err != nil {
		in.err = err
	}
	in.mu.Unlock()
	select {
	case in.ready <- struct{}{}:
	default:
	}
	for {
		in.mu.Lock()
		full := in.held >= readAhead
		in.mu.Unlock()
		if !full {
			return true
		}
		select {
		case <-in.room:
		case <-quit:
			return false
		}
	}
}

// take returns the frames waiting and their chunks, and the error that ended reading once
// they are all taken (once: the next connection's reading may follow). The chunks count as
// held until they are given to done.
func (in *inbox) take() (frames, chunks [][]byte, err error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	frames, chunks = in.frames, in.chunks
	in.frames, in.chunks = nil, nil
	if len(frames) > 0 {
		return frames, chunks, nil
	}
	err = in.err
	in.err = nil
	return nil, chunks, err
}

// done releases taken chunks, printed.
func (in *inbox) done(chunks [][]byte) {
	n := 0
	for _, c := range chunks {
		n += len(c)
		if cap(c) == readChunk {
			select {
			case in.free <- c[:0]:
			default:
			}
		}
	}
	in.mu.Lock()
	in.held -= n
	in.mu.Unlock()
	select {
	case in.room <- struct{}{}:
	default:
	}
}

// chunk returns memory to read frames into: a printed chunk, or a new one.
func (in *inbox) chunk() []byte {
	select {
	case c := <-in.free:
		return c
	default:
		return make([]byte, 0, readChunk)
	}
}
