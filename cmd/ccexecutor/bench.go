package main

import (
	"fmt"
	"os"
)

// bench is the bench subcommand: not built yet.
func bench(args []string) int {
	fmt.Fprintln(os.Stderr, "ccexecutor: bench is not built yet")
	return 2
}
