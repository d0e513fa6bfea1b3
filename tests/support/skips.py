"""What a test needs of the machine, and why the machine may not have it.

Each ``needs_*`` marks a test with its tier (``engine``, ``loop``, ``fuse``); conftest.py skips
a test whose tier the machine cannot serve, with the reason ``*_unavailable()`` gives (a
string, or None when the need is met; each is tried for real once per run):

``needs_overlay``   root and a kernel whose overlayfs takes ``lowerdir+`` (fsconfig)
``needs_loop``      ``needs_overlay`` plus loop devices, ``losetup`` and ``mkfs.ext4``
``needs_fuse``      root, /dev/fuse and the fuse3 user-space tools

A test with none of these marks, and none of the fixtures that imply one (see
``FIXTURE_TIERS``), is a ``unit`` test: it runs as any user, with no mount.
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




def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE and overlayfs mounts)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if not shutil.which("fusermount3") and not shutil.which("fusermount"):
        return "needs fuse3 userspace tools"
    return None


needs_overlay = pytest.mark.engine
needs_loop = pytest.mark.loop
needs_fuse = pytest.mark.fuse

# Tiers, each with what says whether this machine can run it; "unit" is the rest.
TIER_UNAVAILABLE = {"engine": overlay_unavailable, "loop": loop_unavailable,
                    "fuse": fuse_unavailable}
# Fixtures that make a test need a tier without a mark saying so.
FIXTURE_TIERS = {"store": "engine", "sm": "engine", "track_store": "engine"}


def tiers_of(marks: set[str], fixtures: set[str]) -> set[str]:
    """The tiers of a test with these marker names and fixture names (``unit`` if none)."""
    tiers = {m for m in marks if m in TIER_UNAVAILABLE}
    tiers |= {FIXTURE_TIERS[f] for f in fixtures if f in FIXTURE_TIERS}
    return tiers or {"unit"}
