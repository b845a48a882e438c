package ccexecutor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// prSetChildSubreaper is prctl's PR_SET_CHILD_SUBREAPER, which package syscall does not define.
const prSetChildSubreaper = 36

// SetSubreaper makes the calling process a child subreaper (Linux, PR_SET_CHILD_SUBREAPER): a
// member of a run's process group whose parent exits is re-parented to this process instead of
// to init, and the run then reaps it too, so that no zombie is left behind even where init does
// not reap. It affects the whole process, so the package never calls it by itself; the
// ccexecutor binary calls it at start. Without it a run still ends its whole group but reaps only
// the group's leader, and a member that outlived its parent gets SIGKILL without a grace period.
//
// Its limit: a process that leaves the run's group (setsid, setpgid) escapes the group's signals,
// and if it outlives its parent it becomes a child of this process that no run reaps, a zombie
// once it exits. Without a subreaper it would be init's, which may not reap it either.
func SetSubreaper() error {
	_, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0)
	if errno != 0 {
		return fmt.Errorf("ccexecutor: prctl(PR_SET_CHILD_SUBREAPER): %w", errno)
	}
	return nil
}

// command is what one run executes.
type command struct {
	args []string // argv; args[0] is looked up in the server's PATH
	dir  string   // working directory; empty means the server's
	env  []string // the whole environment, "KEY=value"
}

// process is a command running as the leader of its own process group.
//
// Its lifecycle follows os/exec: start it, always call wait (in a goroutine of its own) and end
// (see supervise), and close the pipes only after the readers are done with them.
type process struct {
	pid    int      // the leader's PID, which is also the group's ID
	stdout *os.File // read end of the child's stdout
	stderr *os.File // read end of the child's stderr
	cmd    *exec.Cmd

	leader chan struct{} // closed by wait once the leader is reaped
	empty  chan struct{} // closed by wait once no member of the group is left to reap
	err    error         // why the leader could not be waited for; set before leader is closed
}

// start starts c in a new process group, with stdin /dev/null and stdout and stderr on pipes.
func start(c command) (*process, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	growPipe(outR)
	growPipe(errR)
	cmd := exec.Command(c.args[0], c.args[1:]...)
	cmd.Dir, cmd.Env = c.dir, c.env
	// *os.File writers go to the child as they are: no copying goroutine, and Wait leaves the
	// read ends to us, so output can still be drained after the leader has exited.
	cmd.Stdout, cmd.Stderr = outW, errW
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("start %q: %w", c.args[0], err)
	}
	return &process{
		pid:    cmd.Process.Pid,
		stdout: outR,
		stderr: errR,
		cmd:    cmd,
		leader: make(chan struct{}),
		empty:  make(chan struct{}),
	}, nil
}

// growPipe asks for a 1 MiB pipe buffer (F_SETPIPE_SZ), so that a fast writer blocks less
// often; the kernel allocates the pages only as the pipe fills. Failing is harmless.
func growPipe(f *os.File) {
	const fSetPipeSz = 1031
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { syscall.Syscall(syscall.SYS_FCNTL, fd, fSetPipeSz, 1<<20) })
	}
}

// wait reaps the leader, then every member of its group that is a child of this process (see
// SetSubreaper), and returns once none is left. It must run in its own goroutine for every
// started process; it returns only after the group has ended, which supervise ensures.
func (p *process) wait() {
	err := p.cmd.Wait()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		p.err = fmt.Errorf("wait for %d: %w", p.pid, err)
	}
	close(p.leader)
	for {
		// The leader is reaped, so wait4 only finds members re-parented to us.
		_, err := syscall.Wait4(-p.pid, nil, 0, nil)
		if err != syscall.EINTR && err != nil {
			break // ECHILD: nothing of the group is left to reap
		}
	}
	close(p.empty)
}

// exitCode is the leader's exit status, or the negative number of the signal that ended it; -1
// when the leader could not be waited for. It is valid once the leader channel is closed.
func (p *process) exitCode() int {
	if p.cmd.ProcessState == nil {
		return -1
	}
	ws := p.cmd.ProcessState.Sys().(syscall.WaitStatus)
	switch {
	case ws.Signaled():
		return -int(ws.Signal())
	default:
		return ws.ExitStatus()
	}
}

func (p *process) signal(sig syscall.Signal) error { return syscall.Kill(-p.pid, sig) }
func (p *process) exited() <-chan struct{}         { return p.leader }
func (p *process) reaped() <-chan struct{}         { return p.empty }

// group is what supervise needs of a process group. *process implements it; tests use a fake
// to check the timers without real processes.
type group interface {
	signal(sig syscall.Signal) error // sends sig to every member; 0 tests whether any is left
	exited() <-chan struct{}         // closed once the leader has exited and been reaped
	reaped() <-chan struct{}         // closed once every member that can be reaped has been
}

// supervise waits until the group's leader exits or ctx is done, then ends the group: SIGTERM
// and SIGCONT to every member (a stopped process must run to act on SIGTERM), and SIGKILL once
// grace has passed if any member is left. It returns once the group is reaped, with ctx's cause
// if ctx ended the run, or nil if the leader exited by itself. Members that outlive the leader
// are ended the same way, so a run never leaves a process behind. It calls killed when it
// sends SIGKILL, so that the caller can count it.
func supervise(ctx context.Context, g group, grace time.Duration, killed func()) error {
	var cause error
	select {
	case <-g.exited():
	case <-ctx.Done():
		cause = context.Cause(ctx)
	}
	// ESRCH from these means the group is already gone; there is nothing else to learn.
	g.signal(syscall.SIGTERM)
	g.signal(syscall.SIGCONT)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-g.reaped():
	case <-t.C:
	}
	if g.signal(0) == nil {
		g.signal(syscall.SIGKILL)
		killed()
	}
	<-g.reaped()
	return cause
}
