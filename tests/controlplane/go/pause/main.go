// pause: the sandbox ("infra") container of every pod on the test node. It holds the pod's namespaces, reaps the
// zombies of a shared PID namespace and exits 0 on SIGTERM or SIGINT, like registry.k8s.io/pause, which cannot be
// pulled here. Static (CGO_ENABLED=0), so the image is this one file FROM scratch.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
