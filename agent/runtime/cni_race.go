//go:build race

package runtime

import deadlock "github.com/sasha-s/go-deadlock"

// In race builds go-cni swaps its mutex for go-deadlock's, which tells
// goroutines apart with petermattis/goid. On this Go release goid reads 0
// for every goroutine, so two goroutines holding go-cni's read lock at once
// (two containers attached concurrently) look like one goroutine locking
// recursively, and go-deadlock exits the process. Its detection is turned
// off; the race detector still runs.
func init() { deadlock.Opts.Disable = true }
