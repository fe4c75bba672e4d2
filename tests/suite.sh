#!/usr/bin/env bash
# `make test`: the whole suite from a fresh clone, each step timed. What a cold run builds overlaps where the steps
# use different resources, so that a newcomer's `make test` and CI (.ci/run runs it) take the same path:
#
#   Go builds: control plane, real node (CPU-bound; 20+ minutes cold)  ======================================
#   host packages | virtualenv | images, their import into the real node  ==  ====  ======================
#   (downloads and disk)                                                                     then: ruff, pytest
#
# pytest runs two pytest-xdist workers, each with its own control plane: one runs the real-node scenarios (the longest
# group, first), the other the rest of the suite beside them (tests/conftest_cluster_plugin.py). PYTEST_ARGS adds
# pytest options (CI passes only its own). A warm run builds nothing and goes straight to the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORKERS=2  # the node scenarios beside the rest; on 2 cores more workers only add control planes
start=$(date +%s)

step() {
  local name="$1" t0
  shift
  t0=$(date +%s)
  "$@"
  echo "[suite] $name: $(($(date +%s) - t0)) s"
}

# The Go builds only need Go: they start first, in a process group of their own (ended if the rest fails), with
# their output kept and printed when they end.
go_log=$(mktemp)
set -m
(
  t0=$(date +%s)
  rc=0
  make -s controlplane-bin >"$go_log" 2>&1 || rc=$?
  echo "[suite] Go builds (control plane, real node), beside the steps below: $(($(date +%s) - t0)) s (exit $rc)" \
    >>"$go_log"
  exit "$rc"
) &
go_pid=$!
set +m
trap 'kill -- -"$go_pid" 2>/dev/null || true; rm -f "$go_log"' EXIT

step "host set-up (Debian packages, Docker daemon)" make -s host-setup
step "virtualenv" make -s venv
step "images (bases, operator, trainer) and their import into the real node" \
  "$PY" -m tests.controlplane.images --into-node

go_rc=0
wait "$go_pid" || go_rc=$?
cat "$go_log"
if ((go_rc != 0)); then
  echo "[suite] the Go builds failed (exit $go_rc): their output is above" >&2
  exit "$go_rc"
fi

step "ruff" .venv/bin/ruff check .
# shellcheck disable=SC2086 # PYTEST_ARGS is a list of options, split as make splits it
step "pytest ($WORKERS workers)" "$PY" -m pytest -n "$WORKERS" ${PYTEST_ARGS:-}
echo "[suite] make test: $(($(date +%s) - start)) s"
