"""Skip conditions: each ``needs_*`` is a ``pytest.mark.skipif`` with a clear reason, tried for
real once per run; each ``*_unavailable()`` gives that reason as a string, or None.

``needs_overlay``   root and a kernel whose overlayfs takes ``lowerdir+`` (fsconfig)
``needs_loop``      ``needs_overlay`` plus loop devices, ``losetup`` and ``mkfs.ext4``
``needs_fuse``      root, /dev/fuse and the fuse3 user-space tools
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


@functools.cache
def overlay_unavailable() -> str | None:
    """Why real branch mounts cannot work here (None if they can): tried for real, once."""
    if os.geteuid() != 0:
        return "needs root (overlayfs mounts)"
    try:
        with open("/proc/filesystems") as fh:
            if "overlay" not in fh.read():
                subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
    except OSError:
        pass
    try:
        from cascowfs import overlay
    except Exception as exc:  # pragma: no cover - import problems are reported by other tests
        return f"cannot import cascowfs.overlay: {exc}"
    base = Path(tempfile.mkdtemp(prefix="cascowfs-probe-"))
    try:
        for d in ("lower", "upper", "work", "mnt"):
            (base / d).mkdir()
        (base / "lower" / "f").write_text("x")
        try:
            overlay.mount_overlay(base / "mnt", [base / "lower"], base / "upper", base / "work")
        except Exception as exc:
            return f"overlayfs with lowerdir+ (fsconfig) is not available: {exc}"
        try:
            ok = (base / "mnt" / "f").read_text() == "x"
        finally:
            overlay.unmount(base / "mnt", lazy=False)
        return None if ok else "overlayfs mount does not show its lower layer"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@functools.cache
def loop_unavailable() -> str | None:
    why = overlay_unavailable()
    if why:
        return why
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


needs_overlay = pytest.mark.skipif(overlay_unavailable() is not None,
                                   reason=overlay_unavailable() or "")
needs_loop = pytest.mark.skipif(loop_unavailable() is not None, reason=loop_unavailable() or "")


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE and overlayfs mounts)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if not shutil.which("fusermount3") and not shutil.which("fusermount"):
        return "needs fuse3 userspace tools"
    return None


needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None,
                                reason=fuse_unavailable() or "")
