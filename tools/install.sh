#!/usr/bin/env bash
# Install everything cascowfs needs on a fresh Debian-based micro-VM, from the project's own files:
# system packages from Debian (libfuse3-dev, fuse3, pkg-config to build pyfuse3; attr for
# getfattr in tests; btrfs-progs for the btrfs benchmark peer; systemd for `systemd-analyze
# verify`; erofs-utils for mkfs.erofs, which writes the layer images; chromium and
# chromium-driver for the monitor page's browser tests; restic for the remote benchmark's
# peer), then a virtual environment at .venv with the package and its test extras.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
for pkg in libfuse3-dev fuse3 pkg-config attr btrfs-progs systemd git erofs-utils chromium chromium-driver restic; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
    echo "installing Debian packages: ${need_pkgs[*]}"
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" </dev/null
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip </dev/null
.venv/bin/python -m pip install -q -e ".[test${EXTRAS:+,$EXTRAS}]" </dev/null
echo "cascowfs installed in $here/.venv"
