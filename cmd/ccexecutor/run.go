package main

import (
	"fmt"
	"os"
)

// runCommand is the run subcommand: not built yet.
func runCommand(args []string) int {
	fmt.Fprintln(os.Stderr, "ccexecutor: run is not built yet")
	return 2
}
