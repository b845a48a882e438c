package ccexecutor

import (
	"bytes"
	"encoding/json"
	"unicode/utf8"
)

// JSON-RPC error codes.
const (
	codeParse          = -32700
	codeInvalidRequest = -32600
	codeUnknownMethod  = -32601
	codeInvalidParams  = -32602
	codeInternal       = -32603
	codeNotAllowed     = -32002
	codeNoProcess      = -32003
)

// rpcError is the error member of a JSON-RPC response.
type rpcError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

func (e *rpcError) MarshalJSON() ([]byte, error) {
	return marshal(struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
		Data    any    `json:"data"`
	}{e.Code, e.Message, nil})
}

// marshal is json.Marshal without HTML escaping, so that ids and text go out as they came.
func marshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// textFrame encodes v as a text frame in a batch of its own.
func textFrame(v any) *batch {
	p, err := marshal(v)
	if err != nil {
		panic("ccexecutor: encoding a message: " + err.Error()) // only our own types get here
	}
	return &batch{frames: appendFrame(nil, opText, p), n: 1}
}

func response(id json.RawMessage, result any) *batch {
	return textFrame(struct {
		JSONRPC string          `json:"jsonrpc"`
		Result  any             `json:"result"`
		ID      json.RawMessage `json:"id,omitempty"`
	}{"2.0", result, id})
}

func errorResponse(id json.RawMessage, e *rpcError) *batch {
	return textFrame(struct {
		JSONRPC string          `json:"jsonrpc"`
		Error   *rpcError       `json:"error"`
		ID      json.RawMessage `json:"id,omitempty"`
	}{"2.0", e, id})
}

func notification(method string, params any) *batch {
	return textFrame(struct {
		JSONRPC string `json:"jsonrpc"`
		Method  string `json:"method"`
		Params  any    `json:"params"`
	}{"2.0", method, params})
}

// processEvent is a process.* notification; exit and cause are null when nil.
func processEvent(method, status string, pid int, exit *int, cause *string) *batch {
	return notification(method, struct {
		Status   string  `json:"status"`
		PID      int     `json:"pid"`
		PGID     int     `json:"pgid"`
		ExitCode *int    `json:"exit_code"`
		Error    *string `json:"error"`
	}{status, pid, pid, exit, cause})
}

// parseRequest splits a request frame into its id, method and params. The id is returned as
// sent when it is a string or a number, so that errors about the rest can still carry it.
func parseRequest(data []byte) (id json.RawMessage, method string, params json.RawMessage, rerr *rpcError) {
	if !utf8.Valid(data) {
		// JSON is UTF-8 (RFC 8259), as every text frame must be, our answers included.
		return nil, "", nil, &rpcError{codeParse, "Parse error"}
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		if !json.Valid(data) {
			return nil, "", nil, &rpcError{codeParse, "Parse error"}
		}
		return nil, "", nil, &rpcError{codeInvalidRequest, "Invalid Request: not a JSON object"}
	}
	if fields == nil {
		return nil, "", nil, &rpcError{codeInvalidRequest, "Invalid Request: not a JSON object"}
	}
	switch raw := fields["id"]; {
	case len(raw) == 0 || string(raw) == "null":
	case raw[0] == '"' || raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9':
		id = raw
	default:
		return nil, "", nil, &rpcError{codeInvalidRequest, "Invalid Request: id must be a string or a number"}
	}
	raw, ok := fields["method"]
	if !ok {
		return id, "", nil, &rpcError{codeInvalidRequest, "Invalid Request: missing method"}
	}
	if err := json.Unmarshal(raw, &method); err != nil || raw[0] != '"' {
		return id, "", nil, &rpcError{codeInvalidRequest, "Invalid Request: method must be a string"}
	}
	return id, method, fields["params"], nil
}

// paramsObject decodes params, which may be absent or null, into its members.
func paramsObject(params json.RawMessage) (map[string]json.RawMessage, *rpcError) {
	var m map[string]json.RawMessage
	if len(params) > 0 && (json.Unmarshal(params, &m) != nil || params[0] != '{' && string(params) != "null") {
		return nil, invalidParams("params must be an object")
	}
	return m, nil
}

func invalidParams(msg string) *rpcError {
	return &rpcError{codeInvalidParams, "Invalid params: " + msg}
}

// Version is the protocol version the server reports.
const Version = "1.0.0"
