#!/usr/bin/env bash
# Builds kubetune's two images, Dockerfile.operator and Dockerfile.trainer, as ghcr.io/kubetune/operator:<version>
# and ghcr.io/kubetune/trainer:<version> (<version>: pyproject.toml's), on a Debian bookworm Python 3.11 base made
# here with debootstrap, so that no registry is needed (docs/images.md). .ci/setup --with-cluster runs it; the tests
# in tests/images run it again, which takes seconds when nothing changed.
#
#   bash tests/images/build.sh [--install] [--start-dockerd]
#
#   --install        apt-get install docker.io and debootstrap first (root, Debian); otherwise this installs nothing.
#   --start-dockerd  start dockerd if no daemon answers: no bridge, no iptables, no masquerading (nothing is routed
#                    beyond this machine); it keeps running after this script, logging to $KUBETUNE_DOCKERD_LOG.
#
# Each image is labelled with the hash of its inputs (Dockerfile, base, the files the build context holds); an
# image whose label matches is not built again. Docker's own layer cache keeps the dependencies' layer (torch and
# the CUDA libraries: several GB) across code changes. The host's CA bundle is given to pip as a build secret, for
# HTTPS proxies that intercept; it never lands in a layer.
#
# Environment: KUBETUNE_IMAGE_VERSION (default: pyproject.toml's version), KUBETUNE_BUILD_CA (default: Debian's
# bundle, when present), KUBETUNE_BASE_IMAGE (skip debootstrap, build on this Python 3.11 Debian image instead),
# KUBETUNE_IMAGES (default "operator trainer"), KUBETUNE_DOCKERD_LOG (default /var/log/kubetune-dockerd.log).
set -euo pipefail
cd "$(dirname "$0")/../.."

install=false
start_dockerd=false
for arg in "$@"; do
  case "$arg" in
    --install) install=true ;;
    --start-dockerd) start_dockerd=true ;;
    *) echo "usage: $0 [--install] [--start-dockerd]" >&2; exit 2 ;;
  esac
done

say() { echo "images: $*" >&2; }
fail() { say "$*"; exit 1; }

if [ "$install" = true ]; then
  missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      fail "--install needs root and apt-get to install ${missing[*]}"
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# BuildKit does the build (build secrets, bind mounts). A docker client from 23 on needs its buildx plugin for it;
# an older one (Debian bookworm's docker.io: 20.10) talks to the daemon's own BuildKit with DOCKER_BUILDKIT=1.
pick_docker() {
  local candidate version
  if docker buildx version >/dev/null 2>&1; then
    echo docker
    return
  fi
  for candidate in docker /usr/bin/docker; do
    version=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null) || continue
    if [ "${version%%.*}" -lt 23 ] 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  fail "no docker client that can use BuildKit: install docker's buildx plugin, or Debian's docker.io"
}

daemon_answers() { docker info >/dev/null 2>&1 || /usr/bin/docker info >/dev/null 2>&1; }

if ! daemon_answers; then
  [ "$start_dockerd" = true ] || fail "no docker daemon answers (start one, or pass --start-dockerd)"
  command -v dockerd >/dev/null 2>&1 || fail "dockerd is missing (pass --install, or apt-get install docker.io)"
  log=${KUBETUNE_DOCKERD_LOG:-/var/log/kubetune-dockerd.log}
  say "starting dockerd (log: $log)"
  setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false >"$log" 2>&1 </dev/null &
  for _ in $(seq 60); do
    daemon_answers && break
    sleep 1
  done
  daemon_answers || fail "dockerd did not answer within 60 s: $(tail -5 "$log")"
fi

DOCKER=$(pick_docker)
export DOCKER_BUILDKIT=1
LABEL=dev.kubetune.inputs
VERSION=${KUBETUNE_IMAGE_VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)}
[ -n "$VERSION" ] || fail "no version in pyproject.toml"

inputs_label() { "$DOCKER" image inspect --format "{{index .Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null || true; }

# --- the base: Debian bookworm (minbase) with its Python 3.11 and venv, standing in for python:3.11-slim-bookworm -
BASE_PACKAGES=python3,python3-venv,ca-certificates,libtcmalloc-minimal4
# docker import sets no environment: PATH and LANG as the official image has them (an unset PATH would leave the
# Dockerfiles' PATH=/opt/venv/bin:$PATH with an empty entry, the working directory).
BASE_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
if [ -n "${KUBETUNE_BASE_IMAGE:-}" ]; then
  BASE=$KUBETUNE_BASE_IMAGE
  base_hash=$("$DOCKER" image inspect --format '{{.Id}}' "$BASE")
else
  BASE=kubetune-base/python:3.11-bookworm
  base_hash=$(echo "debootstrap --variant=minbase --include=$BASE_PACKAGES bookworm ${BASE_ENV[*]}" | sha256sum | cut -c1-16)
  if [ "$(inputs_label "$BASE")" != "$base_hash" ]; then
    command -v debootstrap >/dev/null 2>&1 || fail "debootstrap is missing (pass --install, or apt-get install it)"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    say "making $BASE with debootstrap"
    start=$SECONDS
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" >"$rootfs.log" 2>&1 \
      || fail "debootstrap failed: $(tail -5 "$rootfs.log")"
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import "${BASE_ENV[@]/#/--change=ENV }" \
      --change 'CMD ["python3"]' --change "LABEL $LABEL=$base_hash" - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "$BASE made in $((SECONDS - start)) s"
  fi
fi

# --- the images -------------------------------------------------------------------------------------------------
# The build context is what .dockerignore lets through: pyproject.toml, constraints.txt, README.md and the three
# packages' folders (less bytecode and egg-info).
context_hash() {
  find pyproject.toml constraints.txt README.md .dockerignore operator trainer cli -type f \
    ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
CONTEXT_HASH=$(context_hash)

secret=()
ca=${KUBETUNE_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$ca" ] && secret=(--secret "id=ca,src=$ca")

for name in ${KUBETUNE_IMAGES:-operator trainer}; do
  dockerfile=Dockerfile.$name
  [ -f "$dockerfile" ] || fail "no $dockerfile"
  image=ghcr.io/kubetune/$name:$VERSION
  hash=$( (sha256sum "$dockerfile"; echo "$base_hash $CONTEXT_HASH") | sha256sum | cut -c1-16)
  if [ "$(inputs_label "$image")" = "$hash" ]; then
    say "$image is up to date ($hash)"
    continue
  fi
  say "building $image"
  start=$SECONDS
  "$DOCKER" build --network host --progress plain -f "$dockerfile" --build-arg "BASE_IMAGE=$BASE" \
    "${secret[@]}" --label "$LABEL=$hash" -t "$image" . >"${TMPDIR:-/tmp}/kubetune-build-$name.log" 2>&1 \
    || fail "building $image failed: $(tail -30 "${TMPDIR:-/tmp}/kubetune-build-$name.log")"
  say "$image built in $((SECONDS - start)) s"
done
# A rebuilt image leaves its predecessor untagged: remove those of ours (the layers they share with others stay).
"$DOCKER" image prune --force --filter "label=$LABEL" >/dev/null
# BuildKit keeps every superseded layer in its cache (the trainer's pip layer alone is ~6 GB): three rebuilds of
# the dependencies filled the development machine's disk. Keep what one rebuild of both images reuses.
"$DOCKER" builder prune --force --keep-storage 8gb >/dev/null 2>&1 || true
