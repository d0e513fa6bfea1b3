#!/usr/bin/env bash
# Put cascowfs in place on a Debian machine (or image) from a checkout:
#   - the CLI in a virtual environment at /opt/cascowfs, linked as /usr/local/bin/cascowfs
#     (the path the unit names);
#   - the unit, the monitor's unit (cascowfs-monitor@), their tmpfiles.d, sysusers.d and
#     modules-load.d companions, and the mount(8) helper /sbin/mount.fuse.cascowfs;
#   - the docs in /usr/share/doc/cascowfs, where the units' Documentation= points;
#   - /etc/cascowfs/mnt-cascowfs.env (store /var/lib/cascowfs/store) unless it exists.
# Needs python3-venv, fuse3 (libfuse3) and, to build pyfuse3 without a wheel, libfuse3-dev.
# PIP_INSTALL_ARGS adds pip options (e.g. --no-index --find-links DIR for an offline image);
# CASCOWFS_SOURCE is what pip installs (default: this checkout). See docs/operations.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source="${CASCOWFS_SOURCE:-$(dirname "$here")}"
venv=/opt/cascowfs

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC2086  # PIP_INSTALL_ARGS is a list of options
"$venv/bin/python" -m pip install -q ${PIP_INSTALL_ARGS:-} "$source" </dev/null
ln -sf "$venv/bin/cascowfs" /usr/local/bin/cascowfs

install -D -m 644 "$here/cascowfs@.service" /etc/systemd/system/cascowfs@.service
install -D -m 644 "$here/cascowfs-monitor@.service" /etc/systemd/system/cascowfs-monitor@.service
install -D -m 644 "$here/tmpfiles.d/cascowfs.conf" /etc/tmpfiles.d/cascowfs.conf
install -D -m 644 "$here/sysusers.d/cascowfs.conf" /etc/sysusers.d/cascowfs.conf
install -D -m 644 "$here/modules-load.d/cascowfs.conf" /etc/modules-load.d/cascowfs.conf
install -D -m 755 "$here/mount.fuse.cascowfs" /sbin/mount.fuse.cascowfs
install -d -m 755 /usr/share/doc/cascowfs  # the units' Documentation=
install -m 644 "$(dirname "$here")"/docs/*.md /usr/share/doc/cascowfs/
if [ ! -e /etc/cascowfs/mnt-cascowfs.env ]; then
    install -d -m 755 /etc/cascowfs
    printf 'CASCOWFS_STORE=/var/lib/cascowfs/store\nCASCOWFS_OPTIONS=--admin-group cascowfs\n' \
        > /etc/cascowfs/mnt-cascowfs.env
fi

systemd-sysusers /etc/sysusers.d/cascowfs.conf
if [ -d /run/systemd/system ]; then  # systemd is running (not an image being built, whose
    # first boot runs systemd-tmpfiles and systemd-modules-load anyway)
    systemd-tmpfiles --create /etc/tmpfiles.d/cascowfs.conf
    systemctl daemon-reload
    systemctl restart systemd-modules-load.service
fi
echo "cascowfs installed; start it with: systemctl enable --now cascowfs@mnt-cascowfs.service"
