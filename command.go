package ccexecutor

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
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

// parseExecute checks the params of execute and turns them into what to run.
func parseExecute(cfg *Config, params json.RawMessage) (execRequest, *rpcError) {
	m, rerr := paramsObject(params)
	if rerr != nil {
		return execRequest{}, rerr
	}
	req := execRequest{timeout: cfg.StreamTimeout}
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
		for k, raw := range env {
			var v string
			if json.Unmarshal(raw, &v) != nil || raw[0] != '"' {
				return execRequest{}, invalidParams(fmt.Sprintf("env value of %q must be a string", k))
			}
			if k == "" || strings.ContainsAny(k, "=\x00") || strings.IndexByte(v, 0) >= 0 {
				return execRequest{}, invalidParams(fmt.Sprintf("env entry %q is not a valid variable", k))
			}
			if len(cfg.AllowedCommands) > 0 && strings.HasPrefix(k, "LD_") {
				return execRequest{}, invalidParams(fmt.Sprintf("env %q may not be set when commands are restricted", k))
			}
			req.cmd.env = append(req.cmd.env, k+"="+v) // later entries win in os/exec
		}
	}
	if len(cfg.AllowedCommands) == 0 {
		req.cmd.args = []string{"/bin/sh", "-c", req.line}
		return req, nil
	}
	words, err := splitWords(req.line)
	if err != nil {
		name, _, _ := strings.Cut(strings.TrimSpace(req.line), " ")
		return execRequest{}, &rpcError{codeNotAllowed, fmt.Sprintf("Command '%s' is not allowed: %v", name, err)}
	}
	if !slices.Contains(cfg.AllowedCommands, words[0]) {
		return execRequest{}, &rpcError{codeNotAllowed, fmt.Sprintf("Command '%s' is not allowed", words[0])}
	}
	req.cmd.args = words
	return req, nil
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
