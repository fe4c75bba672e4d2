#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm),
# and promql-check (the Prometheus PromQL parser, for tests/helm/test_promql.py), from their published Go modules into
# a version-keyed cache outside the repository.
#
#   ${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/bin/<component>-<version>/<component>
#
# With --with-node it also builds the real node's programs (tests/controlplane/node.py): kubelet and kube-proxy from
# the same Kubernetes build module, CoreDNS from its module (go/coredns: only the plugins the node's DNS uses), and the
# pause program of the sandbox image (go/pause; its version is a hash of its source).
#
# With --with-kueue it also builds Kueue's controller manager (sigs.k8s.io/kueue/cmd/kueue) from the same Kubernetes
# build module, which requires it: one module graph, so the Kubernetes libraries both use are one version and compile
# once. Kueue's CRD manifests (shipped in its module) are copied beside the binary, into crds/.
#
# A component whose binary already exists is not rebuilt, so a warm run only checks files. Progress and timings go to
# stderr; stdout carries one "BIN <component> <path>" line per component for tests/controlplane/cluster.py.
# Only the Go module proxy is contacted (GOTOOLCHAIN=local: the installed Go is used, never downloaded).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}"
BIN_ROOT="$CACHE/bin"

# Single source of truth for the Kubernetes, etcd and Prometheus versions: the build modules' go.mod files.
# module_version GO_MOD MODULE -> the version GO_MOD requires (inside or outside a require block)
module_version() { awk -v m="$2" '{for (i = 1; i < NF; i++) if ($i == m && $(i + 1) ~ /^v/) {print $(i + 1); exit}}' "$1"; }
K8S_VERSION="$(module_version "$HERE/go/k8s/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(module_version "$HERE/go/etcd/go.mod" go.etcd.io/etcd/server/v3)"
PROMQL_VERSION="$(module_version "$HERE/go/promql/go.mod" github.com/prometheus/prometheus)"
COREDNS_VERSION="$(module_version "$HERE/go/coredns/go.mod" github.com/coredns/coredns)"
KUEUE_VERSION="$(module_version "$HERE/go/k8s/go.mod" sigs.k8s.io/kueue)"
PAUSE_VERSION="src-$(cat "$HERE/go/pause/go.mod" "$HERE/go/pause/main.go" | sha256sum | cut -c1-12)"
KWOK_VERSION="v0.8.0"
HELM_VERSION="v3.19.5"

if [[ -z "$K8S_VERSION" || -z "$ETCD_VERSION" || -z "$PROMQL_VERSION" || -z "$COREDNS_VERSION" || -z "$KUEUE_VERSION" ]]; then
  echo "build.sh: cannot read pinned versions from $HERE/go/*/go.mod" >&2
  exit 2
fi

GO="${GO:-$(command -v go || true)}"
if [[ -z "$GO" && -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go; fi

# readonly: the committed go.mod/go.sum are the pin and a build never rewrites them.
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
# Two cores: more parallel compile jobs only add memory pressure. Overridable for bigger machines.
GO_PARALLEL="${FINETUNE_GO_PARALLEL:-$(nproc 2>/dev/null || echo 2)}"
BUILD_FLAGS=(-trimpath -p "$GO_PARALLEL")

log() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# bin_path COMPONENT VERSION -> path of the cached binary
bin_path() { printf '%s/%s-%s/%s' "$BIN_ROOT" "$1" "$2" "$1"; }

have() { [[ -x "$(bin_path "$1" "$2")" ]]; }

# install_from DIR COMPONENT VERSION: moves DIR/COMPONENT into the cache atomically (a killed build leaves no half file).
install_from() {
  local src="$1/$2" dest_dir
  dest_dir="$(dirname "$(bin_path "$2" "$3")")"
  mkdir -p "$dest_dir"
  mv -f "$src" "$dest_dir/.$2.tmp"
  mv -f "$dest_dir/.$2.tmp" "$dest_dir/$2"
}

require_go() {
  if [[ -z "$GO" || ! -x "$GO" ]]; then
    echo "build.sh: Go toolchain not found (GO='$GO'; set GO=/path/to/go or put go on PATH); cannot build the control plane" >&2
    exit 3
  fi
}

timed() {
  local name="$1" start end
  shift
  start=$(date +%s)
  log "building $name ..."
  "$@"
  end=$(date +%s)
  log "built $name in $((end - start)) s"
}

# build_k8s COMPONENT...: one `go build` for the missing ones (they share most packages; one link step each).
build_k8s() {
  local tmp module_time ver_major ver_minor ldflags pkg c
  tmp="$(mktemp -d "$BIN_ROOT/.k8s-build.XXXXXX")"
  module_time="$(cd "$HERE/go/k8s" && "$GO" list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
  ver_major="${K8S_VERSION#v}"; ver_major="${ver_major%%.*}"
  ver_minor="${K8S_VERSION#v*.}"; ver_minor="${ver_minor%%.*}"
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$ver_major -X $pkg.gitMinor=$ver_minor"
    ldflags+=" -X $pkg.gitCommit=module-$K8S_VERSION -X $pkg.gitTreeState=clean -X $pkg.buildDate=${module_time:-1970-01-01T00:00:00Z}"
  done
  local targets=()
  for c in "$@"; do
    have "$c" "$K8S_VERSION" || targets+=("k8s.io/kubernetes/cmd/$c")
  done
  (cd "$HERE/go/k8s" && "$GO" build "${BUILD_FLAGS[@]}" -ldflags "$ldflags" -o "$tmp/" "${targets[@]}")
  for pkg in "${targets[@]}"; do install_from "$tmp" "${pkg##*/}" "$K8S_VERSION"; done
  rm -rf "$tmp"
}

# build_kueue: Kueue's controller manager from the Kubernetes build module (its go.mod requires sigs.k8s.io/kueue), and
# the manifests its module ships (the CRDs, the webhook configurations) beside it: kueue-<version>/{kueue,crds/,webhook/}.
build_kueue() {
  local tmp mod dest ldflags
  tmp="$(mktemp -d "$BIN_ROOT/.kueue-build.XXXXXX")"
  ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
  ldflags+=" -X sigs.k8s.io/kueue/pkg/version.GitCommit=module-$KUEUE_VERSION -X sigs.k8s.io/kueue/pkg/version.BuildDate=1970-01-01"
  (cd "$HERE/go/k8s" && "$GO" build "${BUILD_FLAGS[@]}" -ldflags "$ldflags" -o "$tmp/kueue" sigs.k8s.io/kueue/cmd/kueue)
  mod="$(cd "$HERE/go/k8s" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)/config/components"
  dest="$(dirname "$(bin_path kueue "$KUEUE_VERSION")")"
  mkdir -p "$dest/crds" "$dest/webhook"
  install -m 0644 "$mod"/crd/bases/*.yaml "$dest/crds/"
  install -m 0644 "$mod/webhook/manifests.yaml" "$dest/webhook/"
  install_from "$tmp" kueue "$KUEUE_VERSION"
  rm -rf "$tmp"
}

# build_module DIR COMPONENT VERSION [LDFLAGS]: `go build` of the main package of the build module go/DIR: etcd,
# promql-check (a small program around github.com/prometheus/prometheus/promql/parser, about 30 s cold), CoreDNS with
# the plugins its main.go imports (about a minute cold), pause.
build_module() {
  local tmp
  tmp="$(mktemp -d "$BIN_ROOT/.$2-build.XXXXXX")"
  (cd "$HERE/go/$1" && "$GO" build "${BUILD_FLAGS[@]}" -ldflags "-s -w ${4:-}" -o "$tmp/$2" .)
  install_from "$tmp" "$2" "$3"
  rm -rf "$tmp"
}

build_kwok() {
  local tmp
  tmp="$(mktemp -d "$BIN_ROOT/.kwok-build.XXXXXX")"
  GOBIN="$tmp" "$GO" install "${BUILD_FLAGS[@]}" \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  install_from "$tmp" kwok "$KWOK_VERSION"
  rm -rf "$tmp"
}

build_helm() {
  local tmp k8s_minor ldflags
  tmp="$(mktemp -d "$BIN_ROOT/.helm-build.XXXXXX")"
  # helm's own Makefile derives the default "helm template" Kubernetes version from its client-go (v0.34 -> 1.34).
  k8s_minor="${K8S_VERSION#v*.}"; k8s_minor="${k8s_minor%%.*}"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"
  GOBIN="$tmp" "$GO" install "${BUILD_FLAGS[@]}" -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  install_from "$tmp" helm "$HELM_VERSION"
  rm -rf "$tmp"
}


# CoreDNS with the plugins main.go imports (about 1 minute cold).


main() {
  local with_node=0 with_kueue=0 arg
  for arg in "$@"; do
    case "$arg" in
      --with-node) with_node=1 ;;
      --with-kueue) with_kueue=1 ;;
      *) echo "usage: $0 [--with-node] [--with-kueue]" >&2; exit 2 ;;
    esac
  done
  local k8s_components=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local specs=("etcd $ETCD_VERSION" "kwok $KWOK_VERSION" "helm $HELM_VERSION")
  ((with_node)) && k8s_components+=(kubelet kube-proxy) && specs+=("coredns $COREDNS_VERSION")
  for c in "${k8s_components[@]}"; do specs+=("$c $K8S_VERSION"); done

  mkdir -p "$BIN_ROOT"
  # Two concurrent builders (two pytest sessions, make cluster + pytest) would otherwise race on the same cache.
  exec 9>"$BIN_ROOT/.build.lock"
  if command -v flock >/dev/null; then flock 9; fi

  local t0 missing=0 slow=0 spec k8s_missing=()
  t0=$(date +%s)
  for spec in "${specs[@]}"; do
    # shellcheck disable=SC2086
    have $spec || { missing=1; slow=1; }
  done
  have promql-check "$PROMQL_VERSION" || missing=1
  ((with_node)) && ! have pause "$PAUSE_VERSION" && missing=1
  ((with_kueue)) && ! have kueue "$KUEUE_VERSION" && missing=1
  if [[ $missing == 1 ]]; then
    require_go
    log "cache: $BIN_ROOT (go: $("$GO" version | awk '{print $3}'), parallel jobs: $GO_PARALLEL)"
    if [[ $slow == 1 ]]; then
      log "a cold build takes about 10 minutes on 2 cores (downloads and compiles); later runs reuse the cache"
    fi
  fi

  have etcd "$ETCD_VERSION" || timed "etcd $ETCD_VERSION" build_module etcd etcd "$ETCD_VERSION"
  for c in "${k8s_components[@]}"; do have "$c" "$K8S_VERSION" || k8s_missing+=("$c"); done
  if ((${#k8s_missing[@]})); then
    timed "${k8s_missing[*]} $K8S_VERSION" build_k8s "${k8s_missing[@]}"
  fi
  have kwok "$KWOK_VERSION" || timed "kwok $KWOK_VERSION" build_kwok
  have helm "$HELM_VERSION" || timed "helm $HELM_VERSION" build_helm
  have promql-check "$PROMQL_VERSION" ||
    timed "promql-check $PROMQL_VERSION" build_module promql promql-check "$PROMQL_VERSION"
  if ((with_node)); then
    have coredns "$COREDNS_VERSION" || timed "coredns $COREDNS_VERSION" build_module coredns coredns \
      "$COREDNS_VERSION" "-X github.com/coredns/coredns/coremain.GitCommit=module-$COREDNS_VERSION"
    have pause "$PAUSE_VERSION" || timed "pause $PAUSE_VERSION" build_module pause pause "$PAUSE_VERSION"
    specs+=("pause $PAUSE_VERSION")
  fi
  if ((with_kueue)); then
    have kueue "$KUEUE_VERSION" || timed "kueue $KUEUE_VERSION" build_kueue
    specs+=("kueue $KUEUE_VERSION")
  fi

  [[ $missing == 1 ]] && log "all components ready in $(($(date +%s) - t0)) s"
  for spec in "${specs[@]}" "promql-check $PROMQL_VERSION"; do
    # shellcheck disable=SC2086
    set -- $spec
    echo "BIN $1 $(bin_path "$1" "$2")"
  done
}

main "$@"
