#!/bin/sh
# Builds the Debian root filesystem every stand-in starts from and imports it as an image.
# Usage: base.sh <work dir> <image name>
set -eu
work="$1"
image="$2"
debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1
tar -C "$work/rootfs" -c . | docker import - "$image" >/dev/null
rm -rf "$work/rootfs"
