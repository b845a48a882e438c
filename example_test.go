package ccexecutor_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

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

// Mount the server in an http.ServeMux next to handlers of your own, serve it as the binary
// does (an IdleTimeout, and LimitListener so that idle connections cannot use up the file
// descriptors its runs need), and shut it down: first the Server, which ends every run and
// session (they are hijacked, so http.Server.Shutdown does not see them), then the http.Server.
func Example_serveMux() {
	cfg := ccexecutor.Config{MaxSessions: 10, Logger: slog.New(slog.DiscardHandler)}
	srv := ccexecutor.NewServer(cfg)

	mux := http.NewServeMux()
	mux.Handle("/ws/mcp", srv)
	mux.Handle("GET /health", srv)
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from the host program\n")
	})
	hs := &http.Server{Handler: mux, IdleTimeout: time.Minute}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	served := make(chan error, 1)
	// Returns once hs.Shutdown below closes the listener; joined by the receive from served.
	go func() { served <- hs.Serve(ccexecutor.LimitListener(ln, ccexecutor.MaxConns(cfg.MaxSessions))) }()
	base := "http://" + ln.Addr().String()

	resp, err := http.Get(base + "/hello")
	if err != nil {
		fmt.Println(err)
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Print(string(body))

	ws, err := websocket.Dial("ws://"+ln.Addr().String()+"/ws/mcp", "", base)
	if err != nil {
		fmt.Println(err)
		return
	}
	websocket.Message.Send(ws, `{"jsonrpc":"2.0","method":"execute","params":{"command":"echo hi"},"id":1}`)
	for {
		var m struct {
			Method string
			Params struct{ Data, Status string }
		}
		if err := websocket.JSON.Receive(ws, &m); err != nil {
			fmt.Println(err)
			return
		}
		if m.Method == "process.output" {
			fmt.Printf("output: %q\n", m.Params.Data)
		}
		if m.Method == "process.completed" {
			fmt.Println("completed:", m.Params.Status)
			break
		}
	}
	ws.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fmt.Println("server shut down:", srv.Shutdown(ctx))
	fmt.Println("http server shut down:", hs.Shutdown(ctx))
	fmt.Println("serve returned:", <-served)
	// Output:
	// hello from the host program
	// output: "hi\n"
	// completed: completed
	// server shut down: <nil>
	// http server shut down: <nil>
	// serve returned: http: Server closed
}
