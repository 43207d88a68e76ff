#!/usr/bin/env bash
# Builds, from the Go module proxy, the binaries of a test Kubernetes control
# plane: etcd, kube-apiserver, kube-scheduler, kube-controller-manager and
# kwok (fake nodes). Used by internal/kubeenv for the kubernetes backend's
# tests; nothing here is needed to run the orchestrator.
#
# The binaries go to $ORCH_KUBE_CACHE/<versions>/bin (default cache:
# ${XDG_CACHE_HOME:-~/.cache}/enginefleet/kube), which survives between runs: a second run finds
# the binaries and a matching stamp and does nothing. The scratch modules the
# build needs live beside bin/ (src/), never in the project's go.mod.
# Cold (empty Go caches) about 20 minutes on 2 cores; relinking with warm Go
# caches about a minute.
#
# Usage: scripts/kube.sh [build]   build if needed; prints the bin dir last
#        scripts/kube.sh bin       print the bin dir (builds nothing)
#        scripts/kube.sh check     exit 0 when the binaries are built, 1 if not
#        scripts/kube.sh clean     remove this version set from the cache
set -euo pipefail

ETCD_VERSION=v3.7.3
K8S_VERSION=v1.37.2 # k8s.io/kubernetes; its staging modules are v0.<minor>.<patch>
KWOK_VERSION=v0.8.0
GO=${GO:-go}
command -v "$GO" >/dev/null 2>&1 || GO=/usr/local/go/bin/go

cache=${ORCH_KUBE_CACHE:-${XDG_CACHE_HOME:-${HOME:?set HOME or ORCH_KUBE_CACHE}/.cache}/enginefleet/kube}
set_id="etcd-$ETCD_VERSION.k8s-$K8S_VERSION.kwok-$KWOK_VERSION"
root="$cache/$set_id"
bin="$root/bin"
stamp="$bin/.stamp"
binaries=(etcd kube-apiserver kube-scheduler kube-controller-manager kwok)

say() { echo "scripts/kube.sh: $*" >&2; }

built() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$set_id" ] || return 1
  local b
  for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

case "${1:-build}" in
bin) echo "$bin"; exit 0 ;;
check) built; exit ;;
clean) rm -rf "$root"; exit 0 ;;
build) ;;
*) echo "usage: $0 [build|bin|check|clean]" >&2; exit 2 ;;
esac

if built; then echo "$bin"; exit 0; fi

mkdir -p "$root/src" "$bin"
# Two test processes may ask for the control plane at once: one builds, the
# other waits for it and then finds the stamp.
exec 9>"$root/.lock"
if ! flock -n 9; then
  say "another build of $set_id is running; waiting for it"
  flock 9
fi
if built; then echo "$bin"; exit 0; fi
rm -f "$stamp"

export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
start=$SECONDS
# Scratch module: go.mod with module name $2 in dir $1 (kept between runs:
# go get is then a no-op against the module cache).
scratch() {
  mkdir -p "$1"
  [ -f "$1/go.mod" ] || (cd "$1" && "$GO" mod init "$2" >/dev/null 2>&1)
}
elapsed() { echo "$((SECONDS - start))s"; }

# etcd: the server module's root package is the etcd main.
if [ ! -x "$bin/etcd" ]; then
  say "etcd $ETCD_VERSION: resolving modules ($(elapsed))"
  scratch "$root/src/etcd" enginefleet.local/kube-etcd
  (cd "$root/src/etcd" && "$GO" get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2)
  say "etcd $ETCD_VERSION: building ($(elapsed))"
  (cd "$root/src/etcd" && "$GO" build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$bin/etcd.tmp" "$bin/etcd"
fi

# kube-apiserver, kube-scheduler, kube-controller-manager: k8s.io/kubernetes
# is not meant to be required as a module (its go.mod replaces every staging
# module k8s.io/X with ./staging/src/k8s.io/X); the scratch module replaces
# each with the published k8s.io/X v0.<minor>.<patch> instead.
kcmds=(kube-apiserver kube-scheduler kube-controller-manager)
need=
for c in "${kcmds[@]}"; do [ -x "$bin/$c" ] || need=1; done
if [ -n "$need" ]; then
  staging_version="v0.${K8S_VERSION#v1.}"
  dir="$root/src/kubernetes"
  say "kubernetes $K8S_VERSION: resolving modules, staging at $staging_version ($(elapsed))"
  scratch "$dir" enginefleet.local/kube-control-plane
  gomod=$(cd "$dir" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || { say "could not download k8s.io/kubernetes@$K8S_VERSION's go.mod"; exit 1; }
  edits=(-require="k8s.io/kubernetes@$K8S_VERSION")
  while read -r mod; do
    case "$mod" in k8s.io/sample-*) continue ;; esac
    edits+=(-replace="$mod=$mod@$staging_version")
  done < <(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod")
  [ ${#edits[@]} -gt 10 ] || { say "found no staging modules in $gomod"; exit 1; }
  (cd "$dir" && "$GO" mod edit "${edits[@]}")
  pkgs=()
  for c in "${kcmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  (cd "$dir" && "$GO" get "${pkgs[@]}" >&2)
  say "kubernetes $K8S_VERSION: building ${kcmds[*]} ($(elapsed); the long part)"
  minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  rm -rf "$bin/.k8s.tmp" && mkdir -p "$bin/.k8s.tmp"
  (cd "$dir" && "$GO" build -trimpath -ldflags "$ldflags" -o "$bin/.k8s.tmp/" "${pkgs[@]}")
  for c in "${kcmds[@]}"; do mv "$bin/.k8s.tmp/$c" "$bin/$c"; done
  rmdir "$bin/.k8s.tmp"
fi

# kwok: its own scratch module (it pins its own client-go release).
if [ ! -x "$bin/kwok" ]; then
  say "kwok $KWOK_VERSION: resolving modules ($(elapsed))"
  scratch "$root/src/kwok" enginefleet.local/kube-kwok
  (cd "$root/src/kwok" && "$GO" get "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2)
  say "kwok $KWOK_VERSION: building ($(elapsed))"
  (cd "$root/src/kwok" && "$GO" build -trimpath -ldflags "-s -w" -o "$bin/kwok.tmp" sigs.k8s.io/kwok/cmd/kwok)
  mv "$bin/kwok.tmp" "$bin/kwok"
fi

echo "$set_id" >"$stamp"
say "done in $(elapsed): $bin"
echo "$bin"
