#!/usr/bin/env bash
# Build (or find in the cache) the micro-VM test's Debian image; prints its directory, which
# holds disk.img (ext4, the whole root file system), vmlinuz and initrd.img.
#
# Two cached layers under $VMTEST_CACHE (default /var/cache/cascowfs-vmtest):
#   base-<hash>.tar   debootstrap of Debian bookworm with systemd, fuse3, python3 and a kernel
#                     (hash: this script's package list); rebuilt only when that changes
#   image-<hash>/     the base plus this checkout installed by systemd/install.sh from wheels
#                     built on the host, and the test's guest files (hash: the base and every
#                     file of cascowfs/, systemd/, tools/vm/ and pyproject.toml)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${VMTEST_CACHE:-/var/cache/cascowfs-vmtest}"
mirror="${VMTEST_MIRROR:-http://deb.debian.org/debian}"
packages=systemd,systemd-sysv,udev,dbus,kmod,fuse3,python3,python3-venv,e2fsprogs,util-linux,procps,attr
# Branch mounts use overlayfs's lowerdir+ (Linux 6.8+): the kernel comes from bookworm-backports.
kernel=linux-image-amd64/bookworm-backports
mkdir -p "$cache"
log() { echo "build-image: $*" >&2; }

base_key=$(printf '%s\n' bookworm "$packages" "$kernel" "$mirror" | sha256sum | cut -c1-16)
base="$cache/base-$base_key.tar"
if [ ! -s "$base" ]; then
    log "debootstrap of bookworm and a backports kernel (cold build)"
    work=$(mktemp -d "$cache/debootstrap.XXXXXX")
    trap 'umount "$work/root/proc" 2>/dev/null; rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include="$packages" bookworm "$work/root" "$mirror" >&2
    echo "deb $mirror bookworm-backports main" > "$work/root/etc/apt/sources.list.d/backports.list"
    mount -t proc proc "$work/root/proc"
    chroot "$work/root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $kernel && apt-get clean" >&2
    umount "$work/root/proc"
    rm -rf "$work/root/var/lib/apt/lists"/*
    tar -C "$work/root" --numeric-owner --xattrs -cf "$base.part" .
    mv "$base.part" "$base"
    rm -rf "$work"
    trap - EXIT
fi

image_key=$( (echo "$base_key"; cd "$repo" &&
              find cascowfs systemd docs tools/vm pyproject.toml -type f ! -name '*.pyc' -print0 |
              sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
image="$cache/image-$image_key"
if [ -s "$image/disk.img" ]; then
    echo "$image"
    exit 0
fi
log "assembling image $image_key from base $base_key"
work=$(mktemp -d "$cache/image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir "$root"
tar -C "$root" --numeric-owner --xattrs -xf "$base"

# This checkout as wheels (and every dependency's), built by the host's pip against the host's
# index; the guest's Python is the same Debian 3.11, so they install offline there.
"$repo/.venv/bin/python" -m pip wheel -q -w "$root/tmp/wheels" "$repo" </dev/null >&2
mkdir -p "$root/tmp/cascowfs-src"
cp -r "$repo/systemd" "$repo/docs" "$root/tmp/cascowfs-src/"
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin CASCOWFS_SOURCE=cascowfs \
    PIP_INSTALL_ARGS="--no-index --find-links /tmp/wheels" \
    bash /tmp/cascowfs-src/systemd/install.sh >&2
rm -rf "$root/tmp/wheels" "$root/tmp/cascowfs-src"

guest="$repo/tools/vm/guest"
install -D -m 755 "$guest/agent.py" "$root/usr/local/lib/vmtest/agent.py"
install -D -m 755 "$guest/phase.sh" "$root/usr/local/lib/vmtest/phase.sh"
install -m 644 "$guest/vmtest.service" "$guest/vmtest-agent.service" "$root/etc/systemd/system/"
mkdir -p "$root/mnt/fstab" "$root/var/lib/vmtest"
cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda  /  ext4  rw,errors=remount-ro  0 1
/var/lib/cascowfs/fstab-store  /mnt/fstab  fuse.cascowfs  defaults,_netdev,nice=0,x-systemd.mount-timeout=15min  0 0
FSTAB
echo cascowfs-vm > "$root/etc/hostname"
chroot "$root" passwd -d root >/dev/null  # a root shell on the serial console, for debugging
chroot "$root" systemctl enable -q cascowfs@mnt-cascowfs.service vmtest.service
cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
cp "$root"/boot/initrd.img-*[0-9]-amd64 "$work/initrd.img"
mkfs.ext4 -q -L root -d "$root" "$work/disk.img" 3G >&2
rm -rf "$root"
mv "$work" "$image"
trap - EXIT
echo "$image"
