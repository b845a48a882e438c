package ccexecutor

import (
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// pipeReader reads one of a run's output pipes, so that output written before the group ended
// is always delivered, however slow the client, while a process that left the group cannot
// hold the run open by the pipe.
//
// While the group lives, a Read waits as long as it takes. Once it is gone (see drain), only a
// process outside the group can still write, and the pipe holds what the group wrote before.
// Those bytes are counted then, and until they are read each Read gets a fresh deadline of
// idle: the time the caller spends between Reads, waiting on the client, never counts against
// the pipe. What comes after them was written after the group ended, by a process outside it:
// it is read until idle has passed since then, or until EOF if that comes first.
type pipeReader struct {
	f *os.File

	mu     sync.Mutex    // guards the fields below; never held across a Read of f
	idle   time.Duration // 0 while the group lives or without a deadline; then the grace
	before int64         // bytes written before the group ended and not yet read
	last   bool          // the deadline for what came after is set: Read leaves it
}

func (r *pipeReader) Read(b []byte) (int, error) {
	r.mu.Lock()
	draining := r.idle > 0
	if draining && !r.last {
		r.f.SetReadDeadline(time.Now().Add(r.idle))
		r.last = r.before <= 0
	}
	r.mu.Unlock()
	n, err := r.f.Read(b)
	if draining { // else the bytes may have been taken before drain counted: count too many, not too few
		r.mu.Lock()
		r.before -= int64(n)
		r.mu.Unlock()
	}
	return n, err
}

// drain is called once the group is gone; from then on a Read fails with
// os.ErrDeadlineExceeded as the type says. An idle of 0 or less means no deadline, for when
// nothing outside the group can hold the pipe (containment: once the run's cgroup is empty,
// every writer is gone): the pipe is then read to EOF.
func (r *pipeReader) drain(idle time.Duration) {
	if idle <= 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.idle = idle
	r.before = unread(r.f)
	r.last = r.before <= 0
	r.f.SetReadDeadline(time.Now().Add(idle)) // for a Read that is waiting already
}

// stop is called, after drain, when the session ends (the server shuts down): then the
// pipe is not read at a slow client's pace any longer. The deadline that the last Read or drain set stays; a pipe
// drained without one (containment) gets one of grace from now.
func (r *pipeReader) stop(grace time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.idle <= 0 {
		r.idle = grace
		r.f.SetReadDeadline(time.Now().Add(grace))
	}
	r.last = true
}

// unread is the number of bytes in pipe f that no Read has taken yet (FIONREAD).
func unread(f *os.File) int64 {
	var n int32
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&n)))
		})
	}
	return int64(n)
}
