#!/usr/bin/env bash
# Builds Flotilla's container images on a machine with no image registry.
#
#   1. flotilla-base:bookworm     a Debian bookworm root filesystem made here with
#                                 debootstrap (minbase + python3, ca-certificates,
#                                 tini) and `docker import`ed. Nothing is pulled.
#   2. flotilla-worker:<version>  FROM the base, plus target/release/flotilla-worker
#      flotilla-master:<version>  FROM the base, plus target/release/flotilla (and the
#                                 worker binary, so `--runtime process` works in it)
#      (each also tagged :dev)
#
# Idempotent: every image carries a label with a hash of its inputs, and a step whose
# image already has the right hash is skipped, so a run with nothing changed takes
# about a second. The base's hash covers only its recipe (suite, variant, package list,
# BASE_RECIPE_VERSION below), not the day: pass --rebuild-base to pick up Debian's
# latest security updates.
#
# Usage: docker/build-images.sh [--base-only] [--rebuild-base] [--rebuild] [-h]
# Env:   FLOTILLA_BIN_DIR       where the prebuilt binaries are (default target/release)
#        FLOTILLA_ROOTFS_CACHE  cache folder (default target/docker-rootfs)
#        FLOTILLA_DEBIAN_MIRROR Debian mirror (default http://deb.debian.org/debian)
#        FLOTILLA_VERSION       image tag (default: [workspace.package] version in Cargo.toml)
set -euo pipefail

# Bump when anything that shapes the base image's content changes (packages, cleanup,
# users, image config): the new hash makes the next run debootstrap again.
readonly BASE_RECIPE_VERSION=1
readonly SUITE=bookworm
readonly VARIANT=minbase
readonly BASE_PACKAGES=(python3 ca-certificates tini)
readonly BASE_IMAGE=flotilla-base:bookworm
readonly WORKER_UID=10001
readonly LABEL_BASE=dev.flotilla.base.recipe
readonly LABEL_APP=dev.flotilla.inputs

DOCKER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$DOCKER_DIR/.." && pwd)
BIN_DIR=${FLOTILLA_BIN_DIR:-$REPO_ROOT/target/release}
CACHE_DIR=${FLOTILLA_ROOTFS_CACHE:-$REPO_ROOT/target/docker-rootfs}
MIRROR=${FLOTILLA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The images are plain FROM + COPY builds of local images: the classic builder does
# them without a registry and without buildx, on every engine from 20.10 on.
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}

base_only=0 rebuild_base=0 rebuild_apps=0
for arg in "$@"; do
  case $arg in
    --base-only) base_only=1 ;;
    --rebuild-base) rebuild_base=1; rebuild_apps=1 ;;
    --rebuild) rebuild_apps=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown option '$arg' (valid: --base-only, --rebuild-base, --rebuild, --help)" >&2; exit 2 ;;
  esac
done

log() { printf 'build-images: %s\n' "$*" >&2; }
die() { printf 'build-images: error: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
label_of() { # image label -> value, empty when the image or label is absent
  docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true
}

t_total=$(now)

if [[ -n ${FLOTILLA_VERSION:-} ]]; then
  VERSION=$FLOTILLA_VERSION
else
  VERSION=$(awk '/^\[workspace\.package\]/ { p = 1; next } /^\[/ { p = 0 }
                 p && $1 == "version" { gsub(/["[:space:]]/, "", $3); print $3; exit }' \
                 "$REPO_ROOT/Cargo.toml" 2>/dev/null || true)
  VERSION=${VERSION:-0.1.0}
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap builds a root filesystem)"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is dockerd running? is DOCKER_HOST right?)"

# Before anything slow: with no binaries the run could only half succeed.
if [[ $base_only -eq 0 ]]; then
  missing=()
  for b in flotilla flotilla-worker; do
    [[ -x $BIN_DIR/$b ]] || missing+=("$BIN_DIR/$b")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    die "missing prebuilt binaries: ${missing[*]}
  build them first:   cargo build --release -p flotilla -p flotilla-worker
  or point FLOTILLA_BIN_DIR at a folder holding flotilla and flotilla-worker,
  or run with --base-only to build just $BASE_IMAGE"
  fi
fi

mkdir -p "$CACHE_DIR"
# One build at a time (tests may call this script concurrently).
exec 9>"$CACHE_DIR/.lock"
flock 9

# ---------------------------------------------------------------- base image
base_hash=$(printf '%s\n' "recipe=$BASE_RECIPE_VERSION" "suite=$SUITE" "variant=$VARIANT" \
              "packages=${BASE_PACKAGES[*]}" "uid=$WORKER_UID" "arch=$(dpkg --print-architecture)" |
            sha256sum | cut -c1-16)
base_tar=$CACHE_DIR/base-$base_hash.tar

unmount_under() { # unmount whatever debootstrap left mounted below $1, deepest first
  local m
  awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r |
    while IFS= read -r m; do umount -l "$m" 2>/dev/null || true; done
}

build_rootfs() {
  local work=$CACHE_DIR/build-$base_hash root
  root=$work/rootfs
  # A build interrupted earlier may have left proc/sys mounted: unmount before removing.
  unmount_under "$work"
  rm -rf --one-file-system "$work"
  mkdir -p "$work" "$CACHE_DIR/debs"
  trap 'unmount_under "'"$work"'"' EXIT

  local t
  if ! command -v debootstrap >/dev/null; then
    t=$(now)
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    log "step: install debootstrap $(since "$t")"
  fi

  t=$(now)
  local include
  include=$(IFS=,; echo "${BASE_PACKAGES[*]}")
  local keyring=()
  [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] &&
    keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
  log "debootstrap $SUITE ($VARIANT + $include) from $MIRROR"
  if ! debootstrap --variant="$VARIANT" --include="$include" "${keyring[@]}" \
        --cache-dir="$CACHE_DIR/debs" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    [[ -f $root/debootstrap/debootstrap.log ]] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (full log: $work/debootstrap.log)"
  fi
  unmount_under "$root"
  log "step: debootstrap $(since "$t")"

  t=$(now)
  # The user tasks run as (the worker image's USER). Made here so the app images
  # need no RUN step (each RUN is a container start, slow on fuse-overlayfs).
  chroot "$root" groupadd --gid "$WORKER_UID" flotilla
  chroot "$root" useradd --uid "$WORKER_UID" --gid "$WORKER_UID" --no-log-init \
    --home-dir /home/flotilla --create-home --shell /usr/sbin/nologin flotilla

  # Keep future `apt-get install`s in derived images small, as Debian's slim images do.
  cat >"$root/etc/dpkg/dpkg.cfg.d/flotilla-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  cat >"$root/etc/apt/apt.conf.d/flotilla-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Install-Recommends "false";
Acquire::GzipIndexes "true";
EOF
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  # Docker writes these per container.
  : >"$root/etc/hostname"
  : >"$root/etc/resolv.conf"
  rm -f "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"

  # Trim: apt lists and caches, docs (copyright kept), man pages, locales, logs.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian \
         "$root"/usr/share/linda "$root"/tmp/* "$root"/var/tmp/*
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  find "$root/var/log" -type f -exec truncate -s 0 {} +

  # What the worker's tasks need (tracebacks, json) must import before we ship it.
  chroot "$root" python3 -c 'import json, traceback, ssl, urllib.request, subprocess' ||
    die "python3 in the new root filesystem is incomplete"
  log "step: configure and trim $(since "$t")"

  t=$(now)
  # /dev, /proc, /sys are provided by the container runtime: ship them empty.
  tar --numeric-owner --one-file-system -C "$root" \
      --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      -cf "$base_tar.tmp" .
  mv -f "$base_tar.tmp" "$base_tar"
  # Older recipes' tarballs are dead weight.
  find "$CACHE_DIR" -maxdepth 1 -name 'base-*.tar' ! -name "base-$base_hash.tar" -delete
  trap - EXIT
  rm -rf --one-file-system "$work"
  log "step: pack root filesystem $(since "$t") ($(du -h "$base_tar" | cut -f1))"
}

t=$(now)
if [[ $rebuild_base -eq 0 && $(label_of "$BASE_IMAGE" "$LABEL_BASE") == "$base_hash" ]]; then
  log "step: base $BASE_IMAGE up to date (recipe $base_hash), skipped $(since "$t")"
else
  if [[ $rebuild_base -eq 1 || ! -f $base_tar ]]; then
    build_rootfs
  else
    log "reusing cached root filesystem $base_tar"
  fi
  t=$(now)
  previous_base=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
  docker import \
    --change "LABEL $LABEL_BASE=$base_hash" \
    --change 'LABEL org.opencontainers.image.title="flotilla-base"' \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE $VARIANT + ${BASE_PACKAGES[*]}, by debootstrap\"" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "flotilla base, recipe $base_hash" \
    "$base_tar" "$BASE_IMAGE" >/dev/null
  # The replaced base goes once nothing is built on it (the app images rebuilt
  # below then drop theirs; a base still in use by a container stays).
  if [[ -n $previous_base ]]; then docker rmi "$previous_base" >/dev/null 2>&1 || true; fi
  log "step: docker import $BASE_IMAGE $(since "$t")"
fi
log "base image: $BASE_IMAGE $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%.1f MB", $1 / 1e6 }')"

if [[ $base_only -eq 1 ]]; then
  log "done (--base-only) in $(since "$t_total")"
  exit 0
fi

# ---------------------------------------------------------------- app images
base_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")
ctx_root=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-images.XXXXXX")
trap 'rm -rf "$ctx_root"' EXIT

# build_app NAME DOCKERFILE FILE... : FILEs are copied into a context of their own,
# so `docker build` sends only them (not the repo, not target/).
build_app() {
  local name=$1 dockerfile=$2 t
  shift 2
  local image=$name:$VERSION
  t=$(now)
  local hash
  hash=$( { echo "version=$VERSION base=$base_id"; sha256sum "$dockerfile" "$@" | cut -d' ' -f1; } |
          sha256sum | cut -c1-16)
  if [[ $rebuild_apps -eq 0 && $(label_of "$image" "$LABEL_APP") == "$hash" ]]; then
    docker tag "$image" "$name:dev"
    log "step: $image up to date (inputs $hash), skipped $(since "$t")"
    return
  fi
  local previous
  previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  local ctx=$ctx_root/$name
  mkdir -p "$ctx"
  cp "$dockerfile" "$ctx/Dockerfile"
  local f
  for f in "$@"; do cp "$f" "$ctx/"; done
  if ! docker build --quiet --label "$LABEL_APP=$hash" --build-arg "FLOTILLA_VERSION=$VERSION" \
        -t "$image" -t "$name:dev" "$ctx" >"$ctx_root/$name.log" 2>&1; then
    cat "$ctx_root/$name.log" >&2
    die "docker build of $image failed"
  fi
  # The image this one replaces is now untagged: drop it (and its cache layers)
  # rather than let every rebuild leave ~a binary's worth of dangling layers. It
  # stays if a container still uses it.
  if [[ -n $previous && $previous != $(docker image inspect -f '{{.Id}}' "$image") &&
        $(docker image inspect -f '{{len .RepoTags}}' "$previous" 2>/dev/null) == 0 ]]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
  log "step: build $image (+ :dev) $(since "$t")"
}

build_app flotilla-worker "$DOCKER_DIR/Dockerfile.worker.local" "$BIN_DIR/flotilla-worker"
build_app flotilla-master "$DOCKER_DIR/Dockerfile.master.local" \
  "$BIN_DIR/flotilla" "$BIN_DIR/flotilla-worker" "$DOCKER_DIR/cluster.yaml"

docker image ls --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' |
  grep -E '^flotilla-(base|worker|master):' | sed 's/^/  /' >&2 || true
log "done in $(since "$t_total")"
