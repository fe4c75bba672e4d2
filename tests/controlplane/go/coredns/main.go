// A CoreDNS build with only the plugins the test node's cluster DNS uses: kubernetes (Service and pod records),
// cache, errors, log, health and ready. No forward plugin is compiled in, so this DNS server cannot send a query
// anywhere else; names outside the zones it serves are refused.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/core/dnsserver"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
