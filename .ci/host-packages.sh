#!/usr/bin/env bash
# Debian packages the suite needs on the host, installed when missing (CI runs as root on a fresh machine):
#   prometheus  its `promtool check metrics` lints the operator's and the trainer's /metrics (tests/cli/test_metrics_lint.py)
#   zsh, fish   the generated completion scripts are loaded in the real shells (tests/cli/test_commands.py)
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
if ((${#need[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "missing host packages: ${need[*]} (apt-get install ${need[*]} as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # prometheus pulls in the server too; only promtool is used, so the service is never started.
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
