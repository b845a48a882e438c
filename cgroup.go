package ccexecutor

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Containment in cgroup v2. A process group is not a container: a command that calls setsid
// leaves it. A cgroup is: a process cannot leave it without write access to the hierarchy, its
// children are born in it, and the kernel can freeze or kill all of it at once (cgroup.freeze,
// cgroup.kill) and say when it is empty (cgroup.events). Each run starts directly in a cgroup of
// its own (clone3 CLONE_INTO_CGROUP), created under the parent that cgroups names.

// cgroup2Magic is statfs's f_type of a cgroup v2 file system (CGROUP2_SUPER_MAGIC).
const cgroup2Magic = 0x63677270

// runPrefix starts the name of every run cgroup: runPrefix + "<PID>-<start time>-<server>-<n>",
// the PID and start time of the server's process, a random name of the Server, and a count.
// The process in the name lets a later server tell the leftovers of a dead one from live runs.
const runPrefix = "ccexecutor-run-"

// Values of Config.Cgroup besides a path.
const (
	CgroupAuto = "auto" // contain runs in cgroups when the hierarchy allows it (the default)
	CgroupOff  = "off"  // process groups only
)

// cgroups creates the run cgroups of one server under one parent cgroup.
type cgroups struct {
	dir   string       // the parent cgroup's directory
	err   error        // why dir cannot be used; every run then fails to start
	owner string       // runPrefix + "<pid>-<start time>-<server>-": this server's names
	n     atomic.Int64 // run cgroups named so far
}

// openCgroups decides from setting (Config.Cgroup) how runs are contained. It returns nil for
// process groups, with the reason why. For a setting that names a parent cgroup, it returns
// cgroups even when that parent cannot be used, with err set, so that no run starts outside it.
func openCgroups(setting string) (cg *cgroups, why string) {
	if setting == CgroupOff {
		return nil, "turned off by configuration"
	}
	owner, err := ownerName(os.Getpid())
	if err != nil {
		return failed(setting, err)
	}
	var dir string
	if setting != "" && setting != CgroupAuto {
		dir = setting
	} else {
		mount, root, err := cgroup2Mount()
		if err != nil {
			return nil, err.Error()
		}
		own, err := ownCgroup()
		if err != nil {
			return nil, err.Error()
		}
		rel, ok := strings.CutPrefix(own, root)
		if !ok && root != "/" {
			return nil, fmt.Sprintf("this process's cgroup %s is outside the mounted hierarchy %s", own, root)
		}
		dir = filepath.Join(mount, rel)
	}
	cg = &cgroups{dir: dir, owner: owner}
	if err := cg.probe(); err != nil {
		return failed(setting, err)
	}
	return cg, "runs start in cgroups under " + dir
}

// failed is openCgroups's answer when containment cannot be used: auto falls back to process
// groups; a named parent fails every run.
func failed(setting string, err error) (*cgroups, string) {
	if setting == "" || setting == CgroupAuto {
		return nil, err.Error()
	}
	return &cgroups{dir: setting, err: fmt.Errorf("ccexecutor: cgroup %s: %w", setting, err)}, err.Error()
}

// probe checks that run cgroups can be created under cg.dir and killed.
func (cg *cgroups) probe() error {
	var st syscall.Statfs_t
	if err := syscall.Statfs(cg.dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", cg.dir, err)
	}
	if st.Type != cgroup2Magic {
		return fmt.Errorf("%s is not on a cgroup v2 file system", cg.dir)
	}
	c, err := cg.create()
	if err != nil {
		return err
	}
	defer c.remove(time.Time{})
	if _, err := os.Stat(filepath.Join(c.dir, "cgroup.kill")); err != nil {
		return fmt.Errorf("no cgroup.kill (Linux 5.14 or later is needed): %w", err)
	}
	return nil
}

// cgroup2Mount finds the cgroup v2 hierarchy in /proc/self/mountinfo: where it is mounted, and
// which of its cgroups is the root of that mount.
func cgroup2Mount() (mount, root string, err error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", "", err
	}
	for line := range strings.Lines(string(b)) {
		// ID parentID major:minor root mountpoint options [optional...] - fstype source ...
		pre, post, ok := strings.Cut(line, " - ")
		f := strings.Fields(pre)
		if ok && len(f) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
			return unescapeMount(f[4]), unescapeMount(f[3]), nil
		}
	}
	return "", "", errors.New("no cgroup v2 hierarchy is mounted")
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space, and so on).
func unescapeMount(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ownCgroup is this process's cgroup in the v2 hierarchy: the "0::" line of /proc/self/cgroup.
func ownCgroup() (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for line := range strings.Lines(string(b)) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			return p, nil
		}
	}
	return "", errors.New("this process is in no cgroup v2")
}

// ownerName is the start of the names of the run cgroups of a new server in process pid.
func ownerName(pid int) (string, error) {
	start, err := startTime(pid)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s%d-%d-%s-", runPrefix, pid, start, rand.Text()[:8]), nil
}

// startTime is when process pid started, in clock ticks since boot: with the PID, it names a
// process for as long as the machine runs.
func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name is in parentheses and may hold anything; starttime is the 20th field
	// after it.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// sweep ends and removes the run cgroups under cg.dir that a server no longer running left
// behind, as one killed with SIGKILL does, and returns how many it found. It waits up to wait
// for each to be empty.
func (cg *cgroups) sweep(wait time.Duration) (int, error) {
	entries, err := os.ReadDir(cg.dir)
	if err != nil {
		return 0, err
	}
	found := 0
	var errs []error
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), runPrefix) || ownerAlive(e.Name()) {
			continue
		}
		found++
		c := &cgroup{dir: filepath.Join(cg.dir, e.Name())}
		c.signal(syscall.SIGKILL)
		errs = append(errs, c.remove(time.Now().Add(wait)))
	}
	return found, errors.Join(errs...)
}

// ownerAlive reports whether the server that named run cgroup name still runs. It also counts
// a name it cannot parse as alive, so that sweep leaves it alone.
func ownerAlive(name string) bool {
	f := strings.Split(strings.TrimPrefix(name, runPrefix), "-")
	if len(f) != 4 {
		return true
	}
	pid, err1 := strconv.Atoi(f[0])
	start, err2 := strconv.ParseUint(f[1], 10, 64)
	if err1 != nil || err2 != nil {
		return true
	}
	now, err := startTime(pid)
	return err == nil && now == start
}

// create makes a new run cgroup.
func (cg *cgroups) create() (*cgroup, error) {
	if cg.err != nil {
		return nil, cg.err
	}
	dir := filepath.Join(cg.dir, cg.owner+strconv.FormatInt(cg.n.Add(1), 10))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	return &cgroup{dir: dir}, nil
}

// A cgroup is the cgroup of one run.
type cgroup struct {
	dir string
}

// signal sends sig to every process of c and its descendants, as supervise needs it: SIGKILL
// through cgroup.kill, which no fork can outrun; SIGCONT after thawing c, which a PAUSE froze,
// so that the SIGTERM before it can act; 0 to test whether any process is left. It returns
// ESRCH when no process is left.
func (c *cgroup) signal(sig syscall.Signal) error {
	switch sig {
	case syscall.SIGKILL:
		return c.write("cgroup.kill", "1")
	case 0:
		populated, _, err := c.events()
		if err == nil && !populated {
			err = syscall.ESRCH
		}
		return err
	case syscall.SIGCONT:
		if err := c.write("cgroup.freeze", "0"); err != nil {
			return err
		}
	}
	// Like systemd: a process that forks after its parent's PID was read misses the signal,
	// which is why SIGKILL, after the grace, goes through cgroup.kill.
	sent := 0
	err := filepath.WalkDir(c.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return gone(err)
		}
		b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return gone(err)
		}
		for _, pid := range procsPIDs(b) {
			if syscall.Kill(pid, sig) == nil {
				sent++
			}
		}
		return nil
	})
	if err == nil && sent == 0 {
		err = syscall.ESRCH
	}
	return err
}

// procsPIDs returns the PIDs that a cgroup.procs file lists, and only those that name one
// process. The kernel writes 0 for a process it cannot name in the reader's PID namespace, and
// kill(0, sig) would signal the caller's own process group: the server itself.
func procsPIDs(procs []byte) []int {
	var pids []int
	for f := range strings.FieldsSeq(string(procs)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids
}

// freeze freezes c (cgroup.freeze) and waits up to wait for the kernel to report it frozen, or
// thaws it. A frozen process sees no signal and runs no code until it is thawed.
func (c *cgroup) freeze(on bool, wait time.Duration) error {
	if !on {
		return c.write("cgroup.freeze", "0")
	}
	if err := c.write("cgroup.freeze", "1"); err != nil {
		return err
	}
	err := c.watch(time.Now().Add(wait), func(_, frozen bool) bool { return frozen })
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("cgroup %s not frozen within %v", c.dir, wait)
	}
	return err
}

// remove waits until no process is left in c, then removes it and its descendants. Someone
// must end the processes: supervise does, for a run. It gives up at deadline, unless that is
// zero.
func (c *cgroup) remove(deadline time.Time) error {
	err := c.watch(deadline, func(populated, _ bool) bool { return !populated })
	if errors.Is(err, syscall.ESRCH) {
		return nil // removed already
	} else if err != nil {
		return err
	}
	var dirs []string
	filepath.WalkDir(c.dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- { // children before their parent
		if err := syscall.Rmdir(dirs[i]); err != nil && err != syscall.ENOENT {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
		}
	}
	return errors.Join(errs...)
}

// watch returns once cgroup.events satisfies done, or with an error at deadline (none if zero).
// The kernel reports a change of cgroup.events as a modification of the file, which inotify
// sees, so watch sleeps until then.
func (c *cgroup) watch(deadline time.Time, done func(populated, frozen bool) bool) error {
	// Most often there is nothing to wait for; an inotify instance costs a few milliseconds to
	// close (the kernel waits for a grace period), so look first.
	if populated, frozen, err := c.events(); err != nil || done(populated, frozen) {
		return err
	}
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	f := os.NewFile(uintptr(fd), "inotify") // non-blocking, so that reads park in the poller
	defer f.Close()
	if _, err := syscall.InotifyAddWatch(fd, filepath.Join(c.dir, "cgroup.events"), syscall.IN_MODIFY); err != nil {
		return fmt.Errorf("watch cgroup.events: %w", gone(err))
	}
	f.SetReadDeadline(deadline)
	buf := make([]byte, 4096)
	for {
		// Read after the watch is in place, so that no change goes unnoticed.
		populated, frozen, err := c.events()
		if err != nil || done(populated, frozen) {
			return err
		}
		if _, err := f.Read(buf); err != nil {
			return fmt.Errorf("cgroup %s: %w", c.dir, err)
		}
	}
}

// events reads cgroup.events.
func (c *cgroup) events() (populated, frozen bool, err error) {
	b, err := os.ReadFile(filepath.Join(c.dir, "cgroup.events"))
	if err != nil {
		return false, false, gone(err)
	}
	for line := range strings.Lines(string(b)) {
		switch strings.TrimSpace(line) {
		case "populated 1":
			populated = true
		case "frozen 1":
			frozen = true
		}
	}
	return populated, frozen, nil
}

// write writes one of c's control files.
func (c *cgroup) write(file, value string) error {
	return gone(os.WriteFile(filepath.Join(c.dir, file), []byte(value), 0))
}

// gone turns the error of a cgroup that no longer exists into ESRCH, as for a process group:
// the run is over, and its cgroup has been removed.
func gone(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return syscall.ESRCH
	}
	return err
}
