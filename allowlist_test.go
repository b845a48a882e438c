package ccexecutor

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestAllowlist guards against the Python service's allowlist bypass: it checked the first
// word, then ran the whole text in a shell, so "echo x; anything" passed. With an allowlist,
// a command must either be refused with -32002 before any process starts, or run the listed
// program alone, with the rest as its literal arguments. Nor may the environment turn a listed
// program into another one: a request sets only the variables the operator listed, and never
// one that makes glibc load code or files the client chooses (GCONV_PATH, LD_PRELOAD, ...),
// listed or not.
func TestAllowlist(t *testing.T) {
	programs := []string{"echo", "id", "printf", "printenv"}
	ts := newTestServer(t, Config{AllowedCommands: programs, AllowedEnv: []string{"GREETING", "LC_ALL"}})
	full := newTestServer(t, Config{AllowedCommands: []string{"/usr/bin/id"}})
	// A server that lists every variable glibc deems unsafe: as a library user may, without
	// calling CheckAllowlist first. The request must still be refused.
	listed := newTestServer(t, Config{AllowedCommands: programs, AllowedEnv: append([]string{"LC_ALL", "PATH"}, unsafeVars...)})
	dir := t.TempDir()
	marker := filepath.Join(dir, "created")
	// A fake id earlier in a PATH the client passes: the server's PATH must decide what runs.
	fake := filepath.Join(dir, "id")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho pwned\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	gconv, noCompiler := gconvModule(t, marker)
	const refused = "refused"
	type row struct {
		name    string
		ts      *testServer
		command string
		env     map[string]string
		want    string // refused, or the output's first line (prefix for id)
		code    int    // the error code when refused; -32002 unless said
		msg     string // what the error message must hold; for -32002 "Command '<name>'" unless said
		skip    string // why the row cannot run here, if it cannot
	}
	syntax := func(name, command, syntax string) row {
		return row{name: name, command: command, want: refused, msg: "shell syntax " + syntax + " is not allowed"}
	}
	rows := []row{
		syntax("semicolon", "echo x; id", "';'"),
		syntax("and", "echo x && id", "'&'"),
		syntax("background", "echo x & id", "'&'"),
		syntax("pipe", "echo x | id", "'|'"),
		syntax("or", "echo x || id", "'|'"),
		syntax("command substitution", "echo $(id)", "'$'"),
		syntax("command substitution in double quotes", `echo "$(id)"`, "'$'"),
		syntax("backquotes", "echo `id`", "'`'"),
		syntax("backquotes in double quotes", "echo \"`id`\"", "'`'"),
		syntax("variable", "echo $HOME", "'$'"),
		syntax("redirect out", "echo x > "+marker, "'>'"),
		syntax("redirect in", "id < /etc/passwd", "'<'"),
		syntax("subshell", "(id)", "'('"),
		syntax("process substitution", "echo <(id)", "'<'"),
		syntax("newline", "echo x\nid", `'\n'`),
		syntax("newline only after a listed command", "id\n", `'\n'`),
		{name: "unlisted program", command: "sh -c id", want: refused, msg: "Command 'sh' is not allowed"},
		{name: "unlisted program, case", command: "ID", want: refused, msg: "Command 'ID' is not allowed"},
		{name: "assignment prefix", command: "LD_PRELOAD=/x.so id", want: refused},
		{name: "relative path", command: "./id", want: refused},
		{name: "full path when the name is listed", command: "/usr/bin/id", want: refused},
		{name: "name when the full path is listed", ts: full, command: "id", want: refused},
		{name: "empty word", command: "'' id", want: refused},
		{name: "unterminated quote", command: "echo 'x", want: refused, msg: "unterminated single quote is not allowed"},
		{name: "unterminated double quote", command: `echo "x`, want: refused, msg: "unterminated double quote is not allowed"},
		{name: "trailing backslash", command: `echo x\`, want: refused, msg: "trailing backslash is not allowed"},
		{name: "empty command", command: "", want: refused, code: -32602, msg: "Invalid params"},
		{name: "blank command", command: "  \t ", want: refused, code: -32602, msg: "Invalid params"},

		// The environment: only listed names, and never an unsafe one.
		{name: "unlisted variable", command: "echo x", env: map[string]string{"POSIXLY_CORRECT": "1"}, want: refused, msg: "Environment variable 'POSIXLY_CORRECT' is not allowed"},
		{name: "unlisted variable beside a listed one", command: "echo x", env: map[string]string{"GREETING": "hi", "BASH_ENV": "/x"}, want: refused, msg: "'BASH_ENV'"},
		{name: "LD_PRELOAD, unlisted", command: "echo x", env: map[string]string{"LD_PRELOAD": "/nonexistent.so"}, want: refused, msg: "'LD_PRELOAD'"},
		{name: "ld_preload, lower case", ts: listed, command: "echo x", env: map[string]string{"ld_preload": "/nonexistent.so"}, want: refused, msg: "'ld_preload'"},
		{name: "LD_PRELOAD padded", ts: listed, command: "echo x", env: map[string]string{" LD_PRELOAD": "/nonexistent.so"}, want: refused, msg: "' LD_PRELOAD'"},
		{name: "LD_PRELOAD padded after", ts: listed, command: "echo x", env: map[string]string{"LD_PRELOAD ": "/nonexistent.so"}, want: refused, msg: "'LD_PRELOAD '"},
		{
			name: "GCONV_PATH loads no code", ts: listed, skip: noCompiler,
			// printf converts \u00e9 to the locale's charset with iconv, which, in the C locale,
			// loads the modules that gconv-modules in GCONV_PATH names: without the check, the
			// shared object's constructor creates the marker.
			command: `printf \\u00e9`, env: map[string]string{"GCONV_PATH": gconv, "LC_ALL": "C"},
			want: refused, msg: "Environment variable 'GCONV_PATH' is not allowed",
		},
		{name: "listed variable", command: "printenv GREETING", env: map[string]string{"GREETING": "hello"}, want: "hello\n"},
		{name: "PATH from the client does not choose the program", command: "id", env: map[string]string{"PATH": dir}, want: refused, msg: "'PATH'"},
		{name: "PATH, listed, does not choose the program", ts: listed, command: "id", env: map[string]string{"PATH": dir}, want: "uid="},

		// The first word after unquoting is the program: 'i''d' is id, which is listed.
		{name: "listed program in pieces of quotes", command: "'i''d'", want: "uid="},
		{name: "quoted listed program", command: `"echo" hello`, want: "hello\n"},
		{name: "leading spaces", command: "   echo hi", want: "hi\n"},
		{name: "shell syntax in single quotes is an argument", command: "echo 'x; id'", want: "x; id\n"},
		{name: "shell syntax in double quotes is an argument", command: `echo "a|b>c"`, want: "a|b>c\n"},
		{name: "escaped semicolon is an argument", command: `echo x\;id`, want: "x;id\n"},
		{name: "dollar in single quotes is an argument", command: "echo '$(id)'", want: "$(id)\n"},
		{name: "glob is an argument", command: "echo /*", want: "/*\n"},
		{name: "comment is an argument", command: "echo x #y", want: "x #y\n"},
		{name: "full path when it is listed", ts: full, command: "/usr/bin/id", want: "uid="},
	}
	for _, name := range unsafeVars {
		name = strings.Replace(name, "*", "X", 1)
		rows = append(rows, row{
			name: name + ", listed", ts: listed, command: "echo x", env: map[string]string{name: dir}, want: refused,
			msg: "Environment variable '" + name + "' is not allowed: ",
		})
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			if row.skip != "" {
				t.Skip(row.skip)
			}
			s := ts
			if row.ts != nil {
				s = row.ts
			}
			c := dial(t, s.addr)
			c.connected()
			params := map[string]any{"command": row.command}
			if row.env != nil {
				params["env"] = row.env
			}
			r := c.call("execute", params)
			if row.want == refused {
				code := row.code
				if code == 0 {
					code = -32002
				}
				msg := row.msg
				if msg == "" {
					msg = "Command '"
				}
				switch {
				case r.Error == nil:
					done, _ := c.until("process.completed")
					t.Errorf("execute %q: %s, then %s; want error %d", row.command, r.raw, done.raw, code)
				case r.Error.Code != code || !strings.Contains(r.Error.Message, msg):
					t.Errorf("execute %q: %s, want error %d holding %q", row.command, r.raw, code, msg)
				case strings.HasPrefix(row.msg, "shell syntax") && strings.Contains(r.Error.Message, "Command '"):
					t.Errorf("message %q says a listed program is not allowed", r.Error.Message)
				default:
					assertNoRun(t, c)
				}
				if _, err := os.Stat(marker); err == nil {
					os.Remove(marker)
					t.Errorf("%s was created: the command ran code it should not have", marker)
				}
			} else {
				if r.Error != nil {
					t.Fatalf("execute %q: %s", row.command, r.raw)
				}
				done, before := c.until("process.completed")
				var out []string
				for _, m := range before {
					if m.Method == "process.output" {
						out = append(out, m.Params.Data)
					}
				}
				if len(out) != 1 || !strings.HasPrefix(out[0], row.want) || done.Params.Status != "completed" {
					t.Errorf("execute %q: output %q, %s; want one line %q", row.command, out, done.raw, row.want)
				}
			}
			c.close()
		})
	}
}

// gconvModule builds, with the C compiler, a shared object whose constructor creates marker,
// and returns a folder holding it and a gconv-modules file that makes iconv load it for the C
// locale's charset. When no compiler is found it returns why, for t.Skip.
func gconvModule(t *testing.T, marker string) (dir, skip string) {
	t.Helper()
	cc := ""
	for _, name := range []string{os.Getenv("CC"), "cc", "gcc", "clang"} {
		if p, err := exec.LookPath(name); name != "" && err == nil {
			cc = p
			break
		}
	}
	if cc == "" {
		return "", "no C compiler (cc, gcc or clang) to build the gconv module with"
	}
	dir = t.TempDir()
	src := fmt.Sprintf(`#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void pwn(void) {
	int fd = open(%q, O_CREAT | O_WRONLY, 0644);
	if (fd >= 0) close(fd);
}
int gconv(void) { return 0; }
int gconv_init(void) { return 1; } /* __GCONV_NOCONV: iconv_open fails, printf goes on */
`, marker)
	if err := os.WriteFile(filepath.Join(dir, "pwn.c"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	build := exec.Command(cc, "-shared", "-fPIC", "-o", filepath.Join(dir, "pwn.so"), filepath.Join(dir, "pwn.c"))
	build.Stdout, build.Stderr = &out, &out
	if err := runOwn(build); err != nil {
		t.Fatalf("%s: %v\n%s", cc, err, out.Bytes())
	}
	modules := "module INTERNAL ANSI_X3.4-1968// pwn 1\nmodule ANSI_X3.4-1968// INTERNAL pwn 1\n"
	if err := os.WriteFile(filepath.Join(dir, "gconv-modules"), []byte(modules), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, ""
}

// assertNoRun checks that no run is in progress on c and that no notification of one arrived:
// the next frame must be the -32003 answer to a PAUSE.
func assertNoRun(t *testing.T, c *client) {
	t.Helper()
	c.send([]byte(`{"jsonrpc":"2.0","method":"control","params":{"type":"PAUSE"},"id":"no-run"}`))
	m := c.next()
	if m.Method != "" || string(m.ID) != `"no-run"` || m.Error == nil || m.Error.Code != -32003 {
		t.Errorf("after a refused command: %s; want the -32003 answer to PAUSE, and no run", m.raw)
	}
}
