package ccexecutor_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"strings"

	"github.com/ccexecutor/ccexecutor"
	"golang.org/x/net/websocket"
)

// A Server is an http.Handler: mount it, connect over WebSocket, run a command and read its
// notifications until process.completed.
func ExampleNewServer() {
	srv := ccexecutor.NewServer(ccexecutor.Config{Logger: slog.New(slog.DiscardHandler)})
	hs := httptest.NewServer(srv)
	defer hs.Close()
	defer srv.Shutdown(context.Background())

	// x/net/websocket always sends an Origin; the server's own is accepted.
	ws, err := websocket.Dial("ws"+strings.TrimPrefix(hs.URL, "http")+"/ws/mcp", "", hs.URL)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ws.Close()
	websocket.Message.Send(ws, `{"jsonrpc":"2.0","method":"execute","params":{"command":"echo hello; echo world >&2; exit 3"},"id":1}`)
	for {
		var m struct {
			Method string
			Result *struct{ Status string }
			Params struct {
				Type, Data, Status string
				ExitCode           *int `json:"exit_code"`
			}
		}
		if err := websocket.JSON.Receive(ws, &m); err != nil {
			fmt.Println(err)
			return
		}
		switch m.Method {
		case "":
			fmt.Println("result:", m.Result.Status)
		case "process.output":
			fmt.Printf("%s: %q\n", m.Params.Type, m.Params.Data)
		case "process.completed":
			fmt.Println(m.Method, m.Params.Status, *m.Params.ExitCode)
			return
		default:
			fmt.Println(m.Method)
		}
	}
	// Unordered output:
	// connected
	// result: started
	// process.started
	// stdout: "hello\n"
	// stderr: "world\n"
	// process.completed failed 3
}
