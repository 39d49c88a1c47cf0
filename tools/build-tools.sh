#!/usr/bin/env bash
# Builds the pinned control-plane binaries with Go through the module proxy into a cache folder
# outside the clone, keyed by the pinned versions, so fresh clones on the same machine reuse them.
# Idempotent: a binary already in the cache is not rebuilt. The bin folder is the last line printed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
. "$here/versions.env"
# shellcheck source=/dev/null
. "$here/lws.env"

key=$(sha256sum "$here/versions.env" | cut -c1-12)
cache_root=${LMI_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmi-operator/tools}
dest="$cache_root/$key"
bin="$dest/bin"
mkdir -p "$bin"

export GOMODCACHE=${GOMODCACHE_OVERRIDE:-$cache_root/gomod}
export GOCACHE=${GOCACHE_OVERRIDE:-$cache_root/gocache}
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
log() { printf '[tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

have() { for b in "$@"; do [ -x "$bin/$b" ] || return 1; done; }

# k8s.io/kubernetes needs its staging modules redirected; its own replace lines only apply when it
# is the main module, so a wrapper module repeats them with the published v0.X.Y versions.
# The kubelet and kube-proxy run the real node that CPU model pods start on (docs/e2e.md); kube-proxy
# routes Services, the in-cluster operator reaching the API server through `kubernetes` among them.
k8s_commands="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy"
build_kubernetes() {
  # shellcheck disable=SC2086
  have $k8s_commands && return 0
  log "building Kubernetes $KUBERNETES_VERSION ($k8s_commands); about 15 min on 2 cores when cold"
  local mod="$dest/src/kubernetes" staging="v0.${KUBERNETES_VERSION#v1.}"
  mkdir -p "$mod"
  local gomod
  gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module lmi.dev/tools/kubernetes"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/').0"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    # Exactly the modules its own go.mod redirects to ./staging (k8s.io/utils is a real v0.0.0-... one).
    grep -E '=> \./staging/' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}' | sort -u
    echo
    for c in $k8s_commands; do echo "tool k8s.io/kubernetes/cmd/$c"; done
  } > "$mod/go.mod"
  log "  go mod tidy (downloads the modules on first use)"
  (cd "$mod" && go mod tidy)
  local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w"
  for p in $pkg $cpkg; do
    ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  for c in $k8s_commands; do
    have "$c" && continue
    log "  go build $c"
    (cd "$mod" && go build -trimpath -ldflags "$ld" -o "$bin/$c.tmp" "k8s.io/kubernetes/cmd/$c") && mv "$bin/$c.tmp" "$bin/$c"
  done
}

# etcd's server module also points at sibling folders with replace lines: same wrapper trick.
build_etcd() {
  have etcd && return 0
  log "building etcd $ETCD_VERSION"
  local mod="$dest/src/etcd"
  mkdir -p "$mod"
  cat > "$mod/go.mod" <<GOMOD
module lmi.dev/tools/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION

tool go.etcd.io/etcd/server/v3
GOMOD
  (cd "$mod" && go mod tidy)
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3) && mv "$bin/etcd.tmp" "$bin/etcd"
}

build_kwok() {
  have kwok && return 0
  log "building kwok $KWOK_VERSION"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  # kwok v0.8.0 ships no built-in stages: collect the ones the local cluster needs.
  local src
  src=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  local stages="$dest/kwok-stages.yaml"
  : > "$stages.tmp"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    printf -- '---\n' >> "$stages.tmp"
    cat "$src/kustomize/stage/$f" >> "$stages.tmp"
  done
  mv "$stages.tmp" "$stages"
}

build_helm() {
  have helm && return 0
  log "building helm $HELM_VERSION"
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  GOBIN="$bin" go install -trimpath -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
    -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_kstatus() {
  # Rebuilt when tools/kstatus-check/main.go changed since the cached build.
  have kstatus-check && cmp -s "$here/kstatus-check/main.go" "$dest/src/kstatus/main.go" && return 0
  log "building kstatus-check (sigs.k8s.io/cli-utils $CLI_UTILS_VERSION)"
  local mod="$dest/src/kstatus"
  mkdir -p "$mod"
  cp "$here/kstatus-check/main.go" "$mod/main.go"
  cat > "$mod/go.mod" <<GOMOD
module lmi.dev/tools/kstatus-check

go 1.24

require sigs.k8s.io/cli-utils $CLI_UTILS_VERSION
GOMOD
  (cd "$mod" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$bin/kstatus-check.tmp" .) && mv "$bin/kstatus-check.tmp" "$bin/kstatus-check"
}

# LeaderWorkerSet's manager for multi-node replicas (docs/e2e.md). Its version is in lws.env, outside
# the cache key, so the binary and the module's manifests carry the version in their names instead.
build_lws() {
  local name="lws-manager-$LWS_VERSION" manifests="$dest/lws-$LWS_VERSION"
  have "$name" && [ -d "$manifests" ] && return 0
  log "building the LeaderWorkerSet manager $LWS_VERSION"
  # A wrapper module, as for etcd: `go install ...@version` asks the proxy for the module's version
  # list (deprecation check), which it does not serve here.
  local mod="$dest/src/lws"
  mkdir -p "$mod"
  cat > "$mod/go.mod" <<GOMOD
module lmi.dev/tools/lws

go 1.25

require sigs.k8s.io/lws $LWS_VERSION

tool sigs.k8s.io/lws/cmd
GOMOD
  (cd "$mod" && go mod tidy)
  local info src commit
  info=$(go mod download -json "sigs.k8s.io/lws@$LWS_VERSION")
  src=$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' <<< "$info")
  commit=$(sed -n 's/.*"Hash": "\(.*\)".*/\1/p' <<< "$info")
  # The module's own CRDs and webhook configurations (with the patches its kustomization applies),
  # so the local cluster installs exactly what this version ships.
  rm -rf "$manifests.tmp"
  mkdir -p "$manifests.tmp/crds" "$manifests.tmp/webhook"
  cp "$src"/config/crd/bases/*.yaml "$manifests.tmp/crds/"
  cp "$src"/config/webhook/{manifests,mutating-patch,validating-patch}.yaml "$manifests.tmp/webhook/"
  chmod -R u+w "$manifests.tmp"
  rm -rf "$manifests" && mv "$manifests.tmp" "$manifests"
  local ld="-s -w -X sigs.k8s.io/lws/pkg/version.GitVersion=$LWS_VERSION"
  ld+=" -X sigs.k8s.io/lws/pkg/version.GitCommit=$commit"
  (cd "$mod" && go build -trimpath -ldflags "$ld" -o "$bin/$name.tmp" sigs.k8s.io/lws/cmd) && mv "$bin/$name.tmp" "$bin/$name"
}

targets=${*:-etcd kwok kubernetes helm kstatus lws}
for t in $targets; do "build_$t"; done
log "all tools present in $bin"
echo "$bin"
