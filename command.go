package ccexecutor

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// execRequest is a checked execute request.
type execRequest struct {
	cmd     command
	timeout time.Duration
	line    string // the command as the client sent it
}

// execPolicy is what parseExecute needs of a Config, with the allowlist's programs resolved
// once, when the server starts.
type execPolicy struct {
	timeout    time.Duration     // the default stream timeout
	restricted bool              // Config.AllowedCommands is not empty
	programs   map[string]string // listed name → absolute path, or "" when it was not found
	env        map[string]bool   // the variables a request may set while restricted
}

// newExecPolicy resolves cfg's allowlist. It always returns a policy that can be enforced:
// a program that was not found, and an unsafe variable that was listed, are refused to every
// request. The error names the first of them.
func newExecPolicy(cfg *Config) (*execPolicy, error) {
	p := &execPolicy{timeout: cfg.StreamTimeout, restricted: len(cfg.AllowedCommands) > 0}
	if !p.restricted {
		return p, nil
	}
	var errs []error
	p.programs = make(map[string]string, len(cfg.AllowedCommands))
	for _, name := range cfg.AllowedCommands {
		// In the server's PATH, now: neither a request's PATH nor its cwd may change it.
		path, err := exec.LookPath(name)
		if err == nil {
			path, err = filepath.Abs(path)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("ccexecutor: allowed command %q not found: %w", name, err))
			path = ""
		}
		p.programs[name] = path
	}
	p.env = make(map[string]bool, len(cfg.AllowedEnv))
	for _, name := range cfg.AllowedEnv {
		if unsafeVar(name) {
			errs = append(errs, fmt.Errorf("ccexecutor: allowed variable %q is one that makes glibc load code or files (%s): it may never be set", name, strings.Join(unsafeVars, " ")))
			continue
		}
		p.env[name] = true
	}
	if len(errs) > 0 {
		return p, errs[0]
	}
	return p, nil
}

// CheckAllowlist reports whether c's allowlist holds as written: every program of
// AllowedCommands is found in the PATH of this process, and AllowedEnv names no variable that
// makes glibc load code or files (LD_*, GCONV_PATH, LOCPATH, ...). The error names the first
// program or variable that fails. NewServer does not fail on such a Config: it refuses every
// request for that program or variable. The ccexecutor binary refuses to start.
func (c Config) CheckAllowlist() error {
	_, err := newExecPolicy(&c)
	return err
}

// notAllowed is the -32002 refusal of req; the request it returns keeps only the command line,
// for the log.
func notAllowed(req execRequest, format string, args ...any) (execRequest, *rpcError) {
	return execRequest{line: req.line}, &rpcError{codeNotAllowed, fmt.Sprintf(format, args...)}
}

// parseExecute checks the params of execute and turns them into what to run.
func (p *execPolicy) parseExecute(params json.RawMessage) (execRequest, *rpcError) {
	m, rerr := paramsObject(params)
	if rerr != nil {
		return execRequest{}, rerr
	}
	req := execRequest{timeout: p.timeout}
	if json.Unmarshal(m["command"], &req.line) != nil || strings.TrimSpace(req.line) == "" {
		return execRequest{}, invalidParams("command must be a non-empty string")
	}
	if strings.IndexByte(req.line, 0) >= 0 {
		return execRequest{}, invalidParams("command must not contain NUL")
	}
	if raw := m["timeout"]; len(raw) > 0 && string(raw) != "null" {
		var secs float64
		if json.Unmarshal(raw, &secs) != nil || secs <= 0 || secs > math.MaxInt64/float64(time.Second) {
			return execRequest{}, invalidParams("timeout must be a positive number of seconds")
		}
		if req.timeout = time.Duration(secs * float64(time.Second)); req.timeout <= 0 {
			return execRequest{}, invalidParams("timeout must be a positive number of seconds")
		}
	}
	if raw := m["cwd"]; len(raw) > 0 && string(raw) != "null" {
		if json.Unmarshal(raw, &req.cmd.dir) != nil {
			return execRequest{}, invalidParams("cwd must be a string")
		}
		if fi, err := os.Stat(req.cmd.dir); err != nil || !fi.IsDir() {
			return execRequest{}, invalidParams(fmt.Sprintf("cwd %q is not a directory", req.cmd.dir))
		}
	}
	req.cmd.env = os.Environ()
	if raw := m["env"]; len(raw) > 0 && string(raw) != "null" {
		var env map[string]json.RawMessage
		if json.Unmarshal(raw, &env) != nil || raw[0] != '{' {
			return execRequest{}, invalidParams("env must be an object of strings")
		}
		for _, k := range slices.Sorted(maps.Keys(env)) { // the first refused name is always the same
			raw := env[k]
			var v string
			if json.Unmarshal(raw, &v) != nil || raw[0] != '"' {
				return execRequest{}, invalidParams(fmt.Sprintf("env value of %q must be a string", k))
			}
			if k == "" || strings.ContainsAny(k, "=\x00") || strings.IndexByte(v, 0) >= 0 {
				return execRequest{}, invalidParams(fmt.Sprintf("env entry %q is not a valid variable", k))
			}
			switch {
			case !p.restricted:
			case unsafeVar(k):
				return notAllowed(req, "Environment variable '%s' is not allowed: it can make programs load code or files the client chooses", k)
			case !p.env[k]:
				return notAllowed(req, "Environment variable '%s' is not allowed", k)
			}
			req.cmd.env = append(req.cmd.env, k+"="+v) // later entries win in os/exec
		}
	}
	if !p.restricted {
		req.cmd.args = []string{"/bin/sh", "-c", req.line}
		return req, nil
	}
	words, err := splitWords(req.line)
	if err != nil {
		return notAllowed(req, "%v", err) // names the syntax: the program may well be listed
	}
	path, ok := p.programs[words[0]]
	switch {
	case !ok:
		return notAllowed(req, "Command '%s' is not allowed", words[0])
	case path == "":
		return notAllowed(req, "Command '%s' is not allowed: it was not found when the server started", words[0])
	}
	words[0] = path
	req.cmd.args = words
	return req, nil
}

// unsafeVar reports whether name, in any case and with spaces around it, is one of unsafeVars.
func unsafeVar(name string) bool {
	name = strings.ToUpper(strings.TrimSpace(name))
	for _, u := range unsafeVars {
		if prefix, ok := strings.CutSuffix(u, "*"); ok && strings.HasPrefix(name, prefix) || name == u {
			return true
		}
	}
	return false
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
				return nil, errors.New("unterminated single quote is not allowed")
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
				return nil, errors.New("unterminated double quote is not allowed")
			}
			i = j
		case c == '\\':
			if i+1 == len(line) {
				return nil, errors.New("trailing backslash is not allowed")
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

// unsafeVars are the variables that glibc's loader and libc ignore in set-user-ID programs
// (its unsecvars.h, and the MALLOC_ aliases of its tunables), since each makes a program load
// code or read files that whoever sets it chooses. A trailing * stands for any suffix.
var unsafeVars = []string{
	"LD_*", "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
	"MALLOC_*", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
}
