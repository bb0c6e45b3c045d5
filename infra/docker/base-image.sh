#!/usr/bin/env bash
# The local build path's only base image: Debian bookworm (minbase) from Debian's own packages,
# imported into Docker because no image registry is reachable here. Skipped when the image exists.
#   infra/docker/base-image.sh [IMAGE]      (default recsys-debian:bookworm; needs root and debootstrap)
set -euo pipefail
image="${1:-recsys-debian:bookworm}"
docker="${DOCKER:-/usr/bin/docker}"
if "$docker" image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(mktemp -d /var/tmp/recsys-rootfs.XXXXXX)"
cleanup() {
  umount "$root/proc" "$root/sys" 2>/dev/null || true
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
# Smaller and reproducible: no apt lists, caches, docs or man pages in the image.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
umount "$root/proc" "$root/sys" 2>/dev/null || true
tar -C "$root" --numeric-owner --exclude=./proc/* --exclude=./sys/* --exclude=./dev/* -c . | "$docker" import - "$image" >/dev/null
echo "base image $image imported"
