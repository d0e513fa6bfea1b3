"""EROFS images: how layers are stored and mounted where the kernel can.

A layer directory written from the CAS (``layers.py``) is turned into an EROFS image by
``mkfs.erofs`` (erofs-utils), and the image is mounted read-only once, for every branch that
stacks it. Overlayfs reads an image's whiteouts (character devices 0/0) and opaque directories
(``trusted.overlay.opaque``) as it reads a directory's. Which way images are mounted is found
at open (``detect``):

* ``erofs``: the kernel mounts an image file directly (file-backed EROFS, Linux 6.12+);
* ``loop``: the image is mounted through a loop device, detached with its last unmount;
* ``dir``: no EROFS (or no ``mkfs.erofs``): layers stay directories, as in store format 7.

``CASCOWFS_LAYER_IMAGES`` (``Tuning.layer_images``) forces one of them; ``auto`` probes.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import overlay
from .errors import StoreIOError

log = logging.getLogger("cascowfs.images")

FILE_BACKED = "erofs"
LOOP = "loop"
DIRECTORIES = "dir"
MODES = (FILE_BACKED, LOOP, DIRECTORIES)
AUTO = "auto"

# A file bigger than this with fewer bytes allocated than its size has holes (the CAS's grid).
HOLE_GRID = 65536
# The most xattr bytes (names and values) of one entry that mkfs.erofs 1.5 writes right.
MAX_XATTR_BYTES = 3072
# The longest name mkfs.erofs 1.5 writes: it fails on one of 255 bytes, the most Linux allows.
MAX_NAME_BYTES = 254
# Compression for a layer that shows a whole tree or many commits (full and merged layers):
# lz4 halves a source tree's image for ~3x the CPU of an uncompressed one; lz4hc saves
# another tenth for ~70x (docs/architecture.md, *Decisions*).
COMPRESSOR = "lz4"
# No file's last block beside its inode: inodes then fill their blocks, so a cold stat walk
# reads ~30% less of the image (the image grows ~18%; docs/architecture.md, *Decisions*).
LAYOUT = "-Enoinline_data"

_MKFS = shutil.which("mkfs.erofs")
_LOSETUP = shutil.which("losetup")
# mkfs.erofs is started under ``setpriv --pdeathsig KILL`` (util-linux): a daemon killed while
# it writes an image leaves no mkfs.erofs writing into the staging that the next open empties.
_SETPRIV = shutil.which("setpriv")
_DIES_WITH_CALLER = [_SETPRIV, "--pdeathsig", "KILL"] if _SETPRIV is not None else []


class ImageError(StoreIOError):
    pass


def build(
    tree: Path,
    image: Path,
    *,
    compress: bool,
    started: Callable[[subprocess.Popen], None] | None = None,
) -> None:
    """Write the EROFS image of directory ``tree`` to ``image``. It reaches the disk as a
    layer directory does: by the store's background syncfs, and a layer recorded after the
    last one is rebuilt if the page cache is lost (``durability.py``).

    Every attribute the layer directory holds goes into the image: owners, modes, mtimes in
    nanoseconds (``--preserve-mtime``: extended inodes where a file's mtime is not the
    image's), xattrs, hard links, device nodes (whiteouts among them). mkfs.erofs reads a
    file's bytes as a stream; it writes a hole's zeros, so sparse trees stay directories
    (``find_sparse_file``). ``started`` gets the running mkfs.erofs (to kill it when its
    image is no longer wanted: the build then fails)."""
    if _MKFS is None:
        raise ImageError("mkfs.erofs is not installed (Debian package erofs-utils)")
    args = [_MKFS, "--quiet", "--preserve-mtime", LAYOUT]
    if compress:
        args.append(f"-z{COMPRESSOR}")
    with subprocess.Popen(
        [*_DIES_WITH_CALLER, *args, os.fsdecode(image), os.fsdecode(tree)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as run:
        if started is not None:
            started(run)
        _, stderr = run.communicate()
    if run.returncode != 0:
        detail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise ImageError(f"mkfs.erofs {image} from {tree} failed: {detail[0]}")


def why_not_an_image(tree: Path) -> str | None:
    """Why the layer directory ``tree`` must stay a directory (None: it may be an image), found
    by a walk of it (``why_not_an_entry`` for every entry). A writer that knows its entries
    already (an import's scan) asks ``why_not_an_entry`` as it writes them instead."""
    root = os.fsencode(tree)
    why = why_not_an_entry(root, b"", _xattr_bytes(root))  # the root's own xattrs count too
    dirs = [root]
    while dirs and why is None:
        with os.scandir(dirs.pop()) as it:
            for entry in it:
                size = allocated = 0
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    size, allocated = st.st_size, st.st_blocks * 512
                why = why_not_an_entry(
                    entry.path, entry.name, _xattr_bytes(entry.path), size, allocated
                )
                if why is not None:
                    break
    return why


def why_not_an_entry(
    path: str | bytes, name: bytes, xattr_bytes: int, size: int = 0, allocated: int = 0
) -> str | None:
    """Why a layer holding the entry at ``path``, named ``name`` in its directory (b"": the
    layer's root), must stay a directory (None: mkfs.erofs writes it right): mkfs.erofs 1.5
    writes a hole's zeros (reading 16 GiB of them for a 16 GiB disk image), so a regular file
    of ``size`` bytes with fewer ``allocated`` may not be in an image; it writes an entry with
    more than ``MAX_XATTR_BYTES`` of xattrs (names and values) into an image that answers
    EUCLEAN; and it fails on a name longer than ``MAX_NAME_BYTES``, after reading the whole
    tree."""
    if len(name) > MAX_NAME_BYTES:
        return f"{os.fsdecode(path)} has a name of {len(name)} bytes"
    if size > HOLE_GRID and allocated < size:
        return f"{os.fsdecode(path)} is sparse"
    if xattr_bytes > MAX_XATTR_BYTES:
        return f"{os.fsdecode(path)} has large xattrs"
    return None


def xattr_bytes(xattrs: tuple[tuple[bytes, bytes], ...]) -> int:
    """The bytes ``why_not_an_entry`` counts of an entry's xattrs (name, value pairs)."""
    return sum(len(name) + len(value) for name, value in xattrs)


def _xattr_bytes(path: bytes) -> int:
    """``xattr_bytes`` of every xattr ``path`` has, overlayfs's own included (a layer's
    whiteouts and opaque directories are written into its image too)."""
    pairs = []
    for name in os.listxattr(path, follow_symlinks=False):
        try:
            pairs.append((os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            pass  # removed meanwhile: nothing to hold
    return xattr_bytes(tuple(pairs))


def mount(image: Path, target: Path, mode: str) -> None:
    """Mount ``image`` read-only at ``target``, the file itself or (``LOOP``) a loop device
    made for it, which the kernel detaches at the mount's end."""
    check_whole(image)
    if mode == FILE_BACKED:
        overlay.mount_erofs(target, image)
        return
    if _LOSETUP is None:
        raise ImageError(f"mounting {image} needs losetup (util-linux)")
    made = subprocess.run(
        [_LOSETUP, "--find", "--show", "--read-only", os.fsdecode(image)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        raise ImageError(
            f"no loop device for {image}: {made.stderr.decode(errors='replace').strip()}"
        )
    device = made.stdout.decode().strip()
    try:
        overlay.mount_erofs(target, Path(device))
    finally:
        # detaching a mounted loop device marks it autoclear: it goes with the last unmount
        subprocess.run(
            [_LOSETUP, "--detach", device],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )


# The EROFS superblock, 1 KiB into an image: its magic, the block size's log2 and the count
# of blocks the image holds.
_SUPERBLOCK_AT = 1024
_SUPERBLOCK = struct.Struct("<I8xB23xI")
_EROFS_MAGIC = 0xE0F5E1E2


def check_whole(image: Path) -> None:
    """Raise ImageError unless ``image`` starts with an EROFS superblock and holds every
    block it names. The kernel mounts an image cut short (a disk that lost its end, a torn
    copy) and then answers EUCLEAN for the files past the cut: refused here, the layer is
    rebuilt from the CAS as one that does not mount."""
    try:
        with open(image, "rb") as f:
            head = os.pread(f.fileno(), _SUPERBLOCK.size, _SUPERBLOCK_AT)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise ImageError(f"layer image {image}: {exc.strerror}") from None
    if len(head) < _SUPERBLOCK.size:
        raise ImageError(f"layer image {image} is cut short ({size} bytes, no superblock)")
    magic, block_bits, blocks = _SUPERBLOCK.unpack(head)
    if magic != _EROFS_MAGIC:
        raise ImageError(f"layer image {image} is no EROFS image (damaged superblock)")
    need = blocks << block_bits
    if size < need:
        raise ImageError(f"layer image {image} is cut short ({size} of its {need} bytes)")


def detect(wanted: str, where: Path) -> str:
    """How layer images stored in directory ``where`` mount: ``wanted`` unless it is
    ``AUTO``, else the first of file-backed EROFS, a loop device, directories that works for
    a one-file image built and mounted there (once per process and filesystem: file-backed
    mounts need the backing filesystem's support, which tmpfs lacks)."""
    if wanted in MODES:
        return wanted
    if wanted != AUTO:
        raise ValueError(f"layer images {wanted!r}: expected one of {', '.join(MODES)}, {AUTO}")
    device = os.stat(where).st_dev
    if device not in _PROBED:
        try:
            _PROBED[device] = _probe(where)
        except OSError as exc:
            # A full disk must not keep the store from opening (freeing space needs it open):
            # assume what a kernel with EROFS does, and probe again at the next open. An image
            # that then does not mount is rebuilt, as a torn one is.
            log.warning(
                "could not try layer images in %s (%s): assuming %s", where, exc, FILE_BACKED
            )
            return FILE_BACKED
    return _PROBED[device]


_PROBED: dict[int, str] = {}  # filesystem (st_dev) -> what ``_probe`` found there


def _probe(where: Path) -> str:
    if _MKFS is None:
        log.warning("mkfs.erofs is missing: layers are directories (install erofs-utils)")
        return DIRECTORIES
    reasons = []
    with tempfile.TemporaryDirectory(prefix="probe-", dir=where) as tmp:
        tree, image, target = Path(tmp, "tree"), Path(tmp, "image"), Path(tmp, "mnt")
        tree.mkdir()
        (tree / "probe").write_bytes(b"probe")
        target.mkdir()
        try:
            build(tree, image, compress=False)
        except ImageError as exc:
            log.warning("%s: layers are directories", exc)
            return DIRECTORIES
        for mode in (FILE_BACKED, LOOP):
            try:
                mount(image, target, mode)
            except StoreIOError as exc:
                reasons.append(f"{mode}: {exc}")
                continue
            try:
                works = (target / "probe").read_bytes() == b"probe"
            finally:
                overlay.unmount(target)
            if works:
                if reasons:
                    log.warning("layer images mount through %s (%s)", mode, "; ".join(reasons))
                return mode
    log.warning("layers are directories: no EROFS mount works (%s)", "; ".join(reasons))
    return DIRECTORIES
