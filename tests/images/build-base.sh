#!/usr/bin/env bash
# Build the local stand-ins for the images our Dockerfiles start FROM, without any registry.
#
#   tests/images/build-base.sh CACHE_DIR PYTHON_TAG STANDIN_TAG
#
# PYTHON_TAG   stands in for python:3.11-slim-bookworm: Debian bookworm minbase + python3 (3.11),
#              python3-venv (ensurepip) and ca-certificates, like the official slim image.
# STANDIN_TAG  stands in for a CUDA runtime base: the same minbase without Python, so the Dockerfile
#              branch that installs Python with the distro's package manager is exercised too.
#
# Both root filesystems are cached as tarballs in CACHE_DIR keyed on this script's content, so a
# rerun only re-imports them (seconds); a fresh machine debootstraps from the Debian mirror (~2 min).
set -euo pipefail

cache_dir=$1
python_tag=$2
standin_tag=$3
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm

key=$(sha256sum "$0" | cut -c1-16)
python_tar="$cache_dir/python-$suite-$key.tar"
standin_tar="$cache_dir/minbase-$suite-$key.tar"
mkdir -p "$cache_dir"

image_key() { podman image inspect --format '{{ index .Config.Labels "io.weightsync.test.base-key" }}' "$1" 2>/dev/null || true; }

if [[ "$(image_key "$python_tag")" == "$key" && "$(image_key "$standin_tag")" == "$key" ]]; then
  echo "base images up to date ($key)"
  exit 0
fi

slim_rootfs() {  # what the official slim images also leave out
  local root=$1
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
         "$root"/usr/share/info/* "$root"/tmp/* "$root"/var/tmp/*
  find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
}

sources() {
  cat <<SRC
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
SRC
}

if [[ ! -s "$python_tar" || ! -s "$standin_tar" ]]; then
  work=$(mktemp -d /var/tmp/weightsync-base.XXXXXX)
  trap 'umount -R "$work/root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
  root="$work/root"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -40 "$work/debootstrap.log"; exit 1; }
  sources >"$root/etc/apt/sources.list"
  printf '%s\n' '# keep the image small, like the official slim images' \
    'path-exclude /usr/share/doc/*' 'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
    >"$root/etc/dpkg/dpkg.cfg.d/docker-slim"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/99-no-recommends"
  cp "$root/etc/apt/sources.list" "$work/sources.list"
  slim_rootfs "$root"
  tar --numeric-owner --xattrs -C "$root" -cf "$standin_tar.part" .
  mv "$standin_tar.part" "$standin_tar"

  mount -t proc proc "$root/proc"
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -c \
    'apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates' >"$work/chroot.log" 2>&1 || { tail -40 "$work/chroot.log"; exit 1; }
  umount "$root/proc"
  slim_rootfs "$root"
  tar --numeric-owner --xattrs -C "$root" -cf "$python_tar.part" .
  mv "$python_tar.part" "$python_tar"
fi

import() {
  local tar=$1 tag=$2 cmd=$3
  podman import --quiet \
    --change "LABEL io.weightsync.test.base-key=$key" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "CMD [\"$cmd\"]" \
    "$tar" "$tag" >/dev/null
  echo "imported $tag from $tar"
}
import "$python_tar" "$python_tag" python3
import "$standin_tar" "$standin_tag" bash
