package ccexecutor

import (
	"encoding/json"
	"syscall"
)

// controlAction returns what a control type does: the signal it sends to the run's group, which
// a contained run gets as a freeze or a thaw instead (none for CANCEL, which ends the run
// through its context), and the state that the result and the notification report. ok is
// false for anything but the three types.
func controlAction(typ string) (sig syscall.Signal, status string, ok bool) {
	switch typ {
	case "PAUSE":
		return syscall.SIGSTOP, "paused", true
	case "RESUME":
		return syscall.SIGCONT, "resumed", true
	case "CANCEL":
		return 0, "canceled", true
	}
	return 0, "", false
}

// parseControl checks the params of a control request. The type must be one of the three, in
// upper case; anything else is an error that changes nothing.
func parseControl(params json.RawMessage) (string, *rpcError) {
	m, rerr := paramsObject(params)
	if rerr != nil {
		return "", rerr
	}
	raw, ok := m["type"]
	if !ok || string(raw) == "null" {
		return "", invalidParams("missing control type (PAUSE, RESUME or CANCEL)")
	}
	var typ string
	if json.Unmarshal(raw, &typ) != nil || raw[0] != '"' {
		return "", invalidParams("control type must be a string (PAUSE, RESUME or CANCEL)")
	}
	if _, _, ok := controlAction(typ); !ok {
		return "", &rpcError{codeInvalidParams, "Unknown control type: " + typ}
	}
	return typ, nil
}

// control answers a control request. PAUSE and RESUME freeze and thaw the run's cgroup, or
// signal its whole process group when it has none (see process.pause); CANCEL ends the run
// through its context, so that cancel goes through the same end of a run as every other cause
// (see supervise). The answer is queued before CANCEL takes effect, so the client
// always sees the result and process.canceled before process.completed.
func (s *session) control(id json.RawMessage, params json.RawMessage) {
	typ, rerr := parseControl(params)
	if rerr != nil {
		s.send(errorResponse(id, rerr))
		return
	}
	if s.run == nil {
		s.send(errorResponse(id, &rpcError{codeNoProcess, "No process is running"}))
		return
	}
	sig, status, _ := controlAction(typ)
	p := s.run.p
	// ESRCH means the group has already ended and its completion is on its way: there is
	// nothing left to pause or resume, which is success.
	if sig != 0 {
		if err := p.pause(sig == syscall.SIGSTOP, s.srv.cfg.KillGrace); err != nil && err != syscall.ESRCH {
			s.send(errorResponse(id, &rpcError{codeInternal, "Internal error: signal group: " + err.Error()}))
			return
		}
	}
	s.send(response(id, map[string]string{"status": status}))
	s.send(processEvent("process."+status, status, p.pid, nil, nil))
	if typ == "CANCEL" {
		s.run.cancel(errCanceled)
	}
	s.log("control", "type", typ, "pid", p.pid)
}
