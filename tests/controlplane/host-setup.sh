#!/usr/bin/env bash
# Host set-up for the suite: the Debian packages the real node and the images run (tests/controlplane/node.py,
# tests/controlplane/images.py), promtool (Debian's `prometheus`: it lints /metrics, tests/monitoring), zsh and fish
# (the completion scripts load in the real shells, tests/cli), and a Docker daemon to build the images with. Idempotent; a warm run only checks (well under 1 s).
#
#   bash tests/controlplane/host-setup.sh            # packages, then a Docker daemon
#   bash tests/controlplane/host-setup.sh packages   # only the packages
#   bash tests/controlplane/host-setup.sh docker     # only the Docker daemon
#
# Packages come from the machine's own apt sources (apt-get update first; root needed only when one is missing).
# A Docker daemon that already answers is used as it is and never stopped. Otherwise one is started by hand (no
# systemd here), detached, logging to $CACHE/dockerd.log, and left running for later runs. It is started without a
# bridge and without iptables rules: the images are built with --network host and nothing else runs in it, so it leaves
# the machine's network as it found it.
set -euo pipefail

CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}"
PACKAGES=(docker.io mmdebstrap containernetworking-plugins iptables iproute2 conntrack socat ca-certificates openssl
  prometheus zsh fish)

log() { printf '[host-setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

missing_packages() {
  local pkg status
  for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == ii* ]] || printf '%s\n' "$pkg"
  done
}

ensure_packages() {
  if ! command -v dpkg-query >/dev/null; then
    log "not a Debian system (no dpkg-query): install ${PACKAGES[*]} by hand"
    return 0
  fi
  local missing start
  mapfile -t missing < <(missing_packages)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "host-setup: missing Debian packages ${missing[*]}; run this script as root (it runs apt-get install)" >&2
    exit 4
  fi
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.apt.lock"
  flock 8
  mapfile -t missing < <(missing_packages)  # another run may have installed them while this one waited
  [[ ${#missing[@]} -eq 0 ]] && return 0
  start=$(date +%s)
  log "installing ${missing[*]} (apt-get update first) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  log "installed ${missing[*]} in $(($(date +%s) - start)) s"
}

docker_cli() {
  # Debian's client matches Debian's daemon; another client on PATH (a newer static one) may lack the legacy builder.
  if [[ -x /usr/bin/docker ]]; then echo /usr/bin/docker; else command -v docker; fi
}

docker_answers() { "$(docker_cli)" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

ensure_docker() {
  command -v dockerd >/dev/null || { echo "host-setup: dockerd not installed (Debian package docker.io)" >&2; exit 5; }
  docker_answers && return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "host-setup: no Docker daemon answers and only root can start one" >&2
    exit 5
  fi
  mkdir -p "$CACHE"
  exec 7>"$CACHE/.dockerd.lock"
  flock 7
  docker_answers && return 0
  local start log_file deadline
  start=$(date +%s)
  log_file="$CACHE/dockerd.log"
  log "no Docker daemon answers: starting dockerd (log $log_file) ..."
  # setsid + nohup: the daemon outlives this script and the test session, like a system service would.
  setsid nohup dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    >>"$log_file" 2>&1 </dev/null &
  deadline=$((start + 60))
  until docker_answers; do
    if (($(date +%s) > deadline)); then
      echo "host-setup: dockerd did not answer within 60 s; last lines of $log_file:" >&2
      tail -n 30 "$log_file" >&2
      exit 5
    fi
    sleep 0.5
  done
  log "dockerd up in $(($(date +%s) - start)) s"
}

case "${1:-all}" in
  packages) ensure_packages ;;
  docker) ensure_docker ;;
  all) ensure_packages; ensure_docker ;;
  *) echo "usage: $0 [all|packages|docker]" >&2; exit 2 ;;
esac
