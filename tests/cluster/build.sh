#!/usr/bin/env bash
# Builds the real Kubernetes control plane that tests/cluster runs, from the Go module proxy, once per version.
# Output: <cache>/<component>-<version>/bin/, where <cache> is $KUBETUNE_TESTBINS or, by default, kubetune-testbins
# in the user's cache directory (outside the checkout, so a fresh clone reuses it). A component whose folder holds
# a .done marker is not built again, so a second run takes seconds. Versions: tests/cluster/versions.env.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
TESTBINS=${KUBETUNE_TESTBINS:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune-testbins}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
command -v go >/dev/null 2>&1 || { echo "build.sh: the Go toolchain (go >= 1.26) is needed to build the control plane" >&2; exit 2; }
jobs=$(nproc)

log() { printf '[build-testbins %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# done_or_build NAME VERSION FUNCTION: runs FUNCTION with $out set unless $out/.done exists.
done_or_build() {
  local name=$1 version=$2 fn=$3
  out="$TESTBINS/$name-$version"
  if [ -f "$out/.done" ]; then return 0; fi
  rm -rf "$out"; mkdir -p "$out/bin" "$out/src"
  local start=$SECONDS
  log "building $name $version"
  "$fn"
  echo "built in $((SECONDS - start)) s" > "$out/.done"
  log "$name $version built in $((SECONDS - start)) s"
}

build_kubernetes() {
  # k8s.io/kubernetes requires its staging modules at v0.0.0 with "=> ./staging/src/..." replaces, which the module
  # proxy cannot follow: a wrapper module requires it and replaces each staging module with the matching v0.MINOR.PATCH.
  local minor=${K8S_VERSION#*.}; minor=${minor%%.*}
  local patch=${K8S_VERSION##*.}
  local staging="v0.${minor}.${patch}" src="$out/src"
  local gomod
  gomod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@v${K8S_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local goline godebug
  goline=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod" | head -1)
  godebug=$(sed -n 's/^godebug \(.*\)/\1/p' "$gomod" | head -1)
  {
    printf 'module example.invalid/k8s-testbins\n\ngo %s\n\n' "$goline"
    [ -z "$godebug" ] || printf 'godebug %s\n\n' "$godebug"
    printf 'tool (\n'
    for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do printf '\tk8s.io/kubernetes/cmd/%s\n' "$c"; done
    printf ')\n\nrequire k8s.io/kubernetes v%s\n\nreplace (\n' "$K8S_VERSION"
    sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*#\1#p' "$gomod" | sort -u |
      while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$staging"; done
    printf ')\n'
  } > "$src/go.mod"
  (cd "$src" && go mod tidy)
  # Kueue parses the server version at start-up, so stamp it as a release build does.
  local v="v${K8S_VERSION}" ldf="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=${minor} -X $p.gitTreeState=clean"
    ldf+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$src" && go build -p "$jobs" -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldf" -o "$out/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  # server/v3's go.mod has relative replaces, so `go install` refuses it; a wrapper module does not.
  local src="$out/src"
  printf 'module example.invalid/etcd-testbin\n\ngo 1.26.0\n\ntool go.etcd.io/etcd/server/v3\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' \
    "$ETCD_VERSION" > "$src/go.mod"
  (cd "$src" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd" go.etcd.io/etcd/server/v3)
}

build_kwok() {
  GOBIN="$out/bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v${KWOK_VERSION}"
  # kwok's own stages (node-initialize, pod-ready, ...) travel with the binary's version.
  cp -r "$(go env GOMODCACHE)/sigs.k8s.io/kwok@v${KWOK_VERSION}/kustomize/stage" "$out/stage"
  chmod -R u+w "$out/stage"
}

build_kueue() {
  GOBIN="$out/bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kueue/cmd/kueue@v${KUEUE_VERSION}"
  cp -r "$(go env GOMODCACHE)/sigs.k8s.io/kueue@v${KUEUE_VERSION}/config/components/crd/bases" "$out/crds"
  chmod -R u+w "$out/crds"
}

build_node() {
  # The kubelet from the Kubernetes wrapper module built above (its go.mod, one more command), runc with seccomp
  # (Debian's runc 1.1 fails on these machines; without the tag every sandbox fails "seccomp not supported"), and
  # the CNI plugins the node's bridge network uses.
  local src="$out/src"
  cp "$TESTBINS/kubernetes-$K8S_VERSION/src/go.mod" "$TESTBINS/kubernetes-$K8S_VERSION/src/go.sum" "$src/"
  local minor=${K8S_VERSION#*.}; minor=${minor%%.*}
  local p ldf="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=v${K8S_VERSION} -X $p.gitMajor=1 -X $p.gitMinor=${minor} -X $p.gitTreeState=clean"
  done
  (cd "$src" && go build -p "$jobs" -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldf" -o "$out/bin/" \
    k8s.io/kubernetes/cmd/kubelet)
  CGO_ENABLED=1 GOBIN="$out/bin" go install -trimpath -tags seccomp "github.com/opencontainers/runc@v${RUNC_VERSION}"
  GOBIN="$out/bin/cni" go install -trimpath -ldflags "-s -w" \
    "github.com/containernetworking/plugins/plugins/main/bridge@v${CNI_PLUGINS_VERSION}" \
    "github.com/containernetworking/plugins/plugins/ipam/host-local@v${CNI_PLUGINS_VERSION}" \
    "github.com/containernetworking/plugins/plugins/main/loopback@v${CNI_PLUGINS_VERSION}"
}

build_coredns() {
  # Cluster DNS for the real node's pods (a multi-node run's peers find each other by name through the headless
  # Service): CoreDNS with its default plugins, the kubernetes one among them.
  GOBIN="$out/bin" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@v${COREDNS_VERSION}"
}

mkdir -p "$TESTBINS"
done_or_build etcd "$ETCD_VERSION" build_etcd
done_or_build kwok "$KWOK_VERSION" build_kwok
done_or_build kueue "$KUEUE_VERSION" build_kueue
done_or_build kubernetes "$K8S_VERSION" build_kubernetes
# runc needs cgo and libseccomp's headers: without them the real node is not built (its tests say so), the rest is.
if pkg-config --exists libseccomp 2>/dev/null && command -v gcc >/dev/null 2>&1; then
  done_or_build node "$K8S_VERSION-runc$RUNC_VERSION-cni$CNI_PLUGINS_VERSION" build_node
  done_or_build coredns "$COREDNS_VERSION" build_coredns
else
  log "not building the real node: runc needs gcc, pkg-config and libseccomp-dev"
fi
log "ready in $TESTBINS"
