#!/bin/sh
# Install the Debian 12 packages gho2kvm needs when they are missing.
# As root: apt-get install them. Otherwise: print the exact command and fail.
set -eu

# gcc, libc6-dev and python3-dev build the C extension pipeline.gho._native at `make venv` (setup.py)
PKGS="genisoimage python3 python3-venv python3-dev gcc libc6-dev pkg-config ca-certificates libvirt-dev
qemu-utils qemu-system-x86 ovmf libguestfs-tools linux-image-amd64 ntfs-3g libhivex-bin libwin-hivex-perl
libvirt-daemon-system libvirt-clients libxml2-utils dosfstools mtools syslinux-common nasm
tesseract-ocr tesseract-ocr-eng chromium"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

cmd="apt-get install -y --no-install-recommends$missing"
if [ "$(id -u)" != 0 ]; then
    echo "gho2kvm needs these Debian packages:$missing" >&2
    echo "run as root:  apt-get update && $cmd" >&2
    exit 1
fi
echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
