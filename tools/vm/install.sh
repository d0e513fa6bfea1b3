#!/usr/bin/env bash
# Debian packages the micro-VM test (tools/vmtest.sh) needs on the host, kept out of
# tools/install.sh so the ordinary install stays light: qemu-system-x86 boots the guest,
# debootstrap builds its root file system, e2fsprogs (mkfs.ext4 -d) turns that tree into a disk
# image without a loop mount.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need_pkgs=()
for pkg in qemu-system-x86 debootstrap e2fsprogs; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
    echo "installing Debian packages for the VM test: ${need_pkgs[*]}"
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" </dev/null
fi
