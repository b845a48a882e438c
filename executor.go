package ccexecutor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// prSetChildSubreaper is prctl's PR_SET_CHILD_SUBREAPER, which package syscall does not define.
const prSetChildSubreaper = 36

// SetSubreaper makes the calling process a child subreaper (Linux, PR_SET_CHILD_SUBREAPER): a
// process that a run leaves behind, in its group or out of it (setsid), and whose parent exits
// is re-parented to this process instead of to init. It also starts the reaper, which reaps
// each such child soon after it exits, so that no zombie is left behind even where init does
// not reap. It affects the whole process, so the package never calls it by itself; the
// ccexecutor binary calls it at start. Without it a run still ends its whole group but reaps
// only the group's leader, and a member that outlived its parent gets SIGKILL without a grace
// period.
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
	err    error         // why the leader could not be waited for; set before leader is closed

	// kill is syscall.Kill; a test may fake it.
	kill func(pid int, sig syscall.Signal) error
	// recheck wakes wait after a signal, which may have changed the group without an exit.
	recheck chan struct{}

	mu    sync.Mutex    // makes signal's check of empty and its kill one step, see signal
	empty chan struct{} // closed by wait, under mu, once no member of the group is left to reap
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

// wait reaps the leader, then waits until no member of its group is a child of this process
// (see SetSubreaper): the reaper reaps them as they exit. It must run in its own goroutine for
// every started process; it returns only after the group has ended, which supervise ensures.
//
// It never blocks in wait4(-pgid): a member that is in the group when that call starts and
// then leaves it (setsid) makes it wait for good, since only an exit in the group wakes it.
// Instead it checks the children after each reaping round and after each signal to the group.
func (p *process) wait() {
	err := waitLeader(p.cmd)
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		p.err = fmt.Errorf("wait for %d: %w", p.pid, err)
	}
	close(p.leader)
	for {
		round := nextRound() // taken before the check, so that no round is missed
		if !childInGroup(p.pid) {
			break
		}
		select {
		case <-round:
		case <-p.recheck:
		}
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

// signal sends sig to every member of the group. Once wait has found the group empty it sends
// nothing and returns ESRCH, as kill does for a group that is gone: the PGID may then be
// reused by an unrelated group. The check and the kill are one step under mu, so the kill
// never follows the close of empty.
func (p *process) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.empty:
		return syscall.ESRCH
	default:
	}
	err := p.kill(-p.pid, sig)
	select {
	case p.recheck <- struct{}{}:
	default: // a recheck is pending already
	}
	return err
}

func (p *process) exited() <-chan struct{} { return p.leader }
func (p *process) reaped() <-chan struct{} { return p.empty }

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
// are ended the same way, so a run never leaves a process behind.
func supervise(ctx context.Context, g group, grace time.Duration) error {
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
	}
	<-g.reaped()
	return cause
}

// shellMeta holds the characters that make a command line more than one simple command.
const shellMeta = ";&|`$<>()\n"

// splitWords splits line into words by the quoting rules of sh(1): single quotes keep
// everything, double quotes keep everything but a backslash before one of $`"\ and newline, and
// a backslash outside quotes keeps the next character. It refuses a line that holds shell syntax
// outside single quotes, since a run without a shell could not do what such a line asks.
func splitWords(line string) ([]string, error) {
	var (
		words  []string
		word   strings.Builder
		inWord bool
	)
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == ' ' || c == '\t':
			if inWord {
				words = append(words, word.String())
				word.Reset()
				inWord = false
			}
			continue
		case c == '\'':
			j := strings.IndexByte(line[i+1:], '\'')
			if j < 0 {
				return nil, errors.New("unterminated single quote")
			}
			word.WriteString(line[i+1 : i+1+j])
			i += j + 1
		case c == '"':
			j := i + 1
			for ; j < len(line) && line[j] != '"'; j++ {
				switch {
				case line[j] == '\\' && j+1 < len(line) && strings.IndexByte("$`\"\\\n", line[j+1]) >= 0:
					j++
					word.WriteByte(line[j])
				case line[j] == '$' || line[j] == '`':
					return nil, fmt.Errorf("shell syntax %q is not allowed", line[j])
				default:
					word.WriteByte(line[j])
				}
			}
			if j == len(line) {
				return nil, errors.New("unterminated double quote")
			}
			i = j
		case c == '\\':
			if i+1 == len(line) {
				return nil, errors.New("trailing backslash")
			}
			i++
			word.WriteByte(line[i])
		case strings.IndexByte(shellMeta, c) >= 0:
			return nil, fmt.Errorf("shell syntax %q is not allowed", c)
		default:
			word.WriteByte(c)
		}
		inWord = true
	}
	if inWord {
		words = append(words, word.String())
	}
	return words, nil
}
