// The test node's pause (sandbox) program; no dependencies.
module finetune-operator/tests/controlplane/go/pause

go 1.24.0
