package ccexecutor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckAllowlist guards against an allowlist that does not hold as written: a listed
// program that is not where the server looks, or a listed variable that lets the client choose
// code for the loader or libc to load, must stop the server before it serves (the binary exits
// with status 2), with the name in the error.
func TestCheckAllowlist(t *testing.T) {
	rows := []struct {
		name string
		cfg  Config
		want string // in the error; "" for none
	}{
		{name: "no allowlist", cfg: Config{AllowedEnv: []string{"LD_PRELOAD"}}}, // unused without one
		{name: "programs found", cfg: Config{AllowedCommands: []string{"echo", "/usr/bin/id"}, AllowedEnv: []string{"LANG", "TZ"}}},
		{name: "program not found", cfg: Config{AllowedCommands: []string{"echo", "ccexecutor-no-such-program"}}, want: `allowed command "ccexecutor-no-such-program" not found`},
		{name: "path not found", cfg: Config{AllowedCommands: []string{"/nonexistent/id"}}, want: `allowed command "/nonexistent/id" not found`},
		{name: "lower case look-alike", cfg: Config{AllowedCommands: []string{"echo"}, AllowedEnv: []string{"ld_preload"}}, want: `allowed variable "ld_preload"`},
		{name: "padded look-alike", cfg: Config{AllowedCommands: []string{"echo"}, AllowedEnv: []string{" LD_PRELOAD"}}, want: `allowed variable " LD_PRELOAD"`},
	}
	for _, name := range unsafeVars {
		name = strings.Replace(name, "*", "AUDIT", 1)
		rows = append(rows, struct {
			name string
			cfg  Config
			want string
		}{name: name, cfg: Config{AllowedCommands: []string{"echo"}, AllowedEnv: []string{"LANG", name}}, want: `allowed variable "` + name + `"`})
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			err := row.cfg.CheckAllowlist()
			switch {
			case row.want == "" && err != nil:
				t.Errorf("CheckAllowlist: %v, want nil", err)
			case row.want != "" && (err == nil || !strings.Contains(err.Error(), row.want)):
				t.Errorf("CheckAllowlist: %v, want an error holding %q", err, row.want)
			case err != nil && !strings.HasPrefix(err.Error(), "ccexecutor: "):
				t.Errorf("error %q does not start with ccexecutor: ", err)
			}
		})
	}
}

// TestProgramsResolvedAtStart guards against a listed program that is looked up when a request
// runs: then whatever can change the server's PATH, or the directory the name resolves in,
// chooses what runs. A program is resolved in the server's PATH once, when it starts; one that
// was not found then is refused, even if it appears later.
func TestProgramsResolvedAtStart(t *testing.T) {
	ts := newTestServer(t, Config{AllowedCommands: []string{"id", "ccexecutor-later"}})
	dir := t.TempDir()
	for _, name := range []string{"id", "ccexecutor-later"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\necho pwned\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	c := dial(t, ts.addr)
	c.connected()
	out, done := c.run("id", nil)
	if len(out) != 1 || !strings.HasPrefix(out[0].Data, "uid=") || done.Status != "completed" {
		t.Errorf("id after PATH changed: output %+v, %+v; want the id found at start", out, done)
	}
	r := c.call("execute", map[string]any{"command": "ccexecutor-later"})
	if r.Error == nil || r.Error.Code != -32002 || !strings.Contains(r.Error.Message, "not found when the server started") {
		t.Errorf("a listed program not found at start: %s, want -32002", r.raw)
	}
	c.close()
}
