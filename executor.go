package ccexecutor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// prSetChildSubreaper is prctl's PR_SET_CHILD_SUBREAPER, which package syscall does not define.
const prSetChildSubreaper = 36

// recheckMax is the longest wait looks away from a group whose members it cannot hear exit.
const recheckMax = 100 * time.Millisecond

// SetSubreaper makes the calling process a child subreaper (Linux, PR_SET_CHILD_SUBREAPER): a
// process that a run leaves behind, in its group or out of it (setsid), and whose parent exits
// is re-parented to this process instead of to init. It also starts the reaper, which reaps
// each such child soon after it exits, so that no zombie is left behind even where init does
// not reap. It affects the whole process, so the package never calls it by itself; the
// ccexecutor binary calls it at start. Without it a run still ends its whole group, SIGTERM
// then SIGKILL after the kill grace, but reaps only the group's leader: what the run leaves
// behind is init's to reap.
//
// The reaper reaps, by PID, every child of the process that has exited and is not the leader
// of a run in progress. A program that calls SetSubreaper must therefore not start children of
// its own and wait for them (exec.Cmd.Wait could find them reaped already).
func SetSubreaper() error {
	_, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0)
	if errno != 0 {
		return fmt.Errorf("ccexecutor: prctl(PR_SET_CHILD_SUBREAPER): %w", errno)
	}
	startReaper()
	return nil
}

// command is what one run executes.
type command struct {
	args []string // argv; args[0] is looked up in the server's PATH
	dir  string   // working directory; empty means the server's
	env  []string // the whole environment, "KEY=value"

	cgroups *cgroups // where the run's cgroup is created; nil to run in a process group only
}

// process is a command running as the leader of its own process group, and, when it is
// contained, in a cgroup of its own, which holds every process the command starts.
//
// Its lifecycle follows os/exec: start it, always call wait (in a goroutine of its own) and end
// (see supervise), and close the pipes only after the readers are done with them.
type process struct {
	pid    int      // the leader's PID, which is also the group's ID
	stdout *os.File // read end of the child's stdout
	stderr *os.File // read end of the child's stderr
	cmd    *exec.Cmd
	cg     *cgroup // the run's cgroup, or nil

	leader chan struct{} // closed by wait once the leader is reaped
	err    error         // why the leader could not be waited for, set before leader is closed, joined with why the run's cgroup could not be removed

	// kill is syscall.Kill; a test may fake it.
	kill func(pid int, sig syscall.Signal) error
	// recheck wakes wait after a signal, which may have changed the group without an exit.
	recheck chan struct{}

	mu    sync.Mutex    // makes signal's check of empty and its kill one step, see signal
	empty chan struct{} // closed by wait, under mu, once no member of the group is left to reap
}

// start starts c in a new process group, with stdin /dev/null and stdout and stderr on pipes.
// With c.cgroups, it starts it directly in a new cgroup (clone3 CLONE_INTO_CGROUP), so that no
// process of the run ever runs outside it.
func start(c command) (*process, error) {
	var cg *cgroup
	if c.cgroups != nil {
		var err error
		if cg, err = c.cgroups.create(); err != nil {
			return nil, err
		}
	}
	p, err := startIn(c, cg)
	if err != nil && cg != nil {
		cg.remove(time.Time{}) // empty: nothing started in it
	}
	return p, err
}

// startIn is start with the cgroup, if any, made.
func startIn(c command, cg *cgroup) (*process, error) {
	attr := &syscall.SysProcAttr{Setpgid: true}
	if cg != nil {
		d, err := os.Open(cg.dir)
		if err != nil {
			return nil, fmt.Errorf("open cgroup: %w", err)
		}
		defer d.Close() // needed only by clone3
		attr.UseCgroupFD, attr.CgroupFD = true, int(d.Fd())
	}
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
	cmd.SysProcAttr = attr
	err = startLeader(cmd)
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("start %q: %w", c.args[0], err)
	}
	return &process{
		pid:     cmd.Process.Pid,
		stdout:  outR,
		stderr:  errR,
		cmd:     cmd,
		cg:      cg,
		leader:  make(chan struct{}),
		kill:    syscall.Kill,
		recheck: make(chan struct{}, 1),
		empty:   make(chan struct{}),
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

// wait reaps the leader, then waits until no member of its group is left (see groupLeft),
// with the reaper reaping those that are this process's children (see SetSubreaper); and, when
// the run is contained, until its cgroup is empty and removed. It must run in its own goroutine
// for every started process; it returns only after the group (the cgroup) has ended, which
// supervise ensures.
//
// It never blocks in wait4(-pgid): a member that is in the group when that call starts and
// then leaves it (setsid) makes it wait for good, since only an exit in the group wakes it.
// Instead it looks at the group again after each reaping round, after each signal to the
// group, and, since members that are not its children exit without a word to this process,
// after a delay that grows from 1 ms to recheckMax.
func (p *process) wait() {
	err := waitLeader(p.cmd)
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		p.err = fmt.Errorf("wait for %d: %w", p.pid, err)
	}
	close(p.leader)
	for delay := time.Millisecond; ; delay = min(2*delay, recheckMax) {
		round := nextRound() // taken before the check, so that no round is missed
		if !groupLeft(p.pid) {
			break
		}
		t := time.NewTimer(delay)
		select {
		case <-round:
		case <-p.recheck:
		case <-t.C:
		}
		t.Stop()
	}
	if p.cg != nil {
		p.err = errors.Join(p.err, p.cg.remove(time.Time{}))
	}
	p.mu.Lock()
	close(p.empty)
	p.mu.Unlock()
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

// signal sends sig to every process of the run: of its cgroup when it is contained (see
// cgroup.signal), else of its process group. Once wait has found the run gone it sends nothing
// and returns ESRCH, as kill does for a group that is gone: the PGID may then be reused by an
// unrelated group. The check and the kill are one step under mu, so the kill never follows the
// close of empty.
func (p *process) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.empty:
		return syscall.ESRCH
	default:
	}
	var err error
	if p.cg != nil {
		err = p.cg.signal(sig)
	} else {
		err = p.kill(-p.pid, sig)
	}
	select {
	case p.recheck <- struct{}{}:
	default: // a recheck is pending already
	}
	return err
}

func (p *process) exited() <-chan struct{} { return p.leader }
func (p *process) reaped() <-chan struct{} { return p.empty }

// contained reports whether the run has a cgroup. Once such a run has been reaped, no process
// that could hold its pipes is left, so they reach end of file.
func (p *process) contained() bool { return p.cg != nil }

// pause stops every process of the run (on) or lets them go on. A contained run is frozen
// (cgroup.freeze), escaped processes included, and sees no signal; pause then waits up to wait
// for the kernel to report it frozen. Otherwise the group gets SIGSTOP or SIGCONT.
func (p *process) pause(on bool, wait time.Duration) error {
	if p.cg != nil {
		return p.cg.freeze(on, wait)
	}
	if on {
		return p.signal(syscall.SIGSTOP)
	}
	return p.signal(syscall.SIGCONT)
}

// group is what supervise needs of a run's processes: its process group, or its cgroup.
// *process implements it; tests use a fake to check the timers without real processes.
type group interface {
	signal(sig syscall.Signal) error // sends sig to every member; 0 tests whether any is left
	exited() <-chan struct{}         // closed once the leader has exited and been reaped
	reaped() <-chan struct{}         // closed once every member that can be reaped has been and the cgroup is empty
}

// supervise waits until the group's leader exits or ctx is done, then ends the group: SIGTERM
// and SIGCONT to every member (a stopped or frozen process must run to act on SIGTERM), and
// SIGKILL once grace has passed if any member is left. For a contained run the members are the
// processes of its cgroup, escaped ones included, and the SIGKILL is cgroup.kill. It returns
// once the group is reaped, with ctx's cause if ctx ended the run, or nil if the leader exited
// by itself. Members that outlive the leader are ended the same way, so a run never leaves a
// process behind. It calls killed when it sends SIGKILL, so that the caller can count it.
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

// Causes that end a run other than its own exit. Their text is the error of process.completed.
var (
	errCanceled   = errors.New("canceled")
	errShutdown   = errors.New("server shutting down")
	errClientGone = errors.New("client disconnected")
)
