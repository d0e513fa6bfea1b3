"""Journaled ext4 file systems on loop devices, for disk-full, power-cut and disk-failure tests.

``make_ext4_image(img, size_mib)``       a sparse image holding a fresh ext4
``mounted_image(img, mnt, options)``     that image on a loop device, mounted; always unmounted
                                         and ``losetup -d``-ed on the way out
``loop_ext4(dir, size_mib, options)``    both at once, the image removed afterwards
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator

from support.mounts import mounts_below


@contextlib.contextmanager
def loop_ext4(workdir: Path, size_mib: int, options: str = "") -> Iterator[Path]:
    """A fresh ext4 (journaled, no reserved blocks) of ``size_mib`` on a loop device, mounted
    at ``workdir/disk`` (image ``workdir/disk.img``) with mount ``options``. Everything mounted
    below it is unmounted first on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    img = workdir / "disk.img"
    try:
        make_ext4_image(img, size_mib)
        with mounted_image(img, workdir / "disk", options) as mnt:
            yield mnt
    finally:
        img.unlink(missing_ok=True)


def make_ext4_image(img: Path, size_mib: int) -> Path:
    """A sparse file of ``size_mib`` holding a fresh ext4 (journaled, no reserved blocks)."""
    with open(img, "wb") as fh:
        fh.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", str(img)],
                   check=True, capture_output=True)
    return img


@contextlib.contextmanager
def mounted_image(img: Path, mnt: Path, options: str = "") -> Iterator[Path]:
    """The ext4 image ``img`` on a loop device, mounted at ``mnt``; on the way out everything
    mounted below it is unmounted, then it, then the loop device is detached."""
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", *(["-o", options] if options else []), dev, str(mnt)],
                       check=True, capture_output=True)
        try:
            yield mnt
        finally:
            for m in sorted(mounts_below(mnt), key=lambda m: len(m.target), reverse=True):
                if m.target != str(mnt):
                    subprocess.run(["umount", "-l", m.target], capture_output=True)
            for attempt in range(50):
                if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
