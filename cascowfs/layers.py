"""Layer directories: the native lower layers that branches are mounted on.

A layer is either a full tree (an import, or a flattened chain) or a delta in overlayfs's own
format (a committed branch's upper directory: whiteouts, opaque and redirected directories).
Layers are a cache: ``materialize`` rebuilds a full layer for any snapshot from the CAS.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from . import fsmeta
from .cas import ContentStore
from .model import Entry
from .trees import TreeStore


def copy_layer(src: Path, dst: Path) -> None:
    """Copy an overlay upper directory into ``dst`` (which must not exist), keeping whiteouts,
    the overlay xattrs a lower layer needs, hard links, and every piece of metadata."""
    seen: dict[tuple[int, int], bytes] = {}

    def copy_dir(s: bytes, d: bytes, st: os.stat_result) -> None:
        os.mkdir(d, 0o700)
        with os.scandir(s) as it:
            items = list(it)
        for item in items:
            cs = s + b"/" + item.name
            cd = d + b"/" + item.name
            cst = os.lstat(cs)
            mode = cst.st_mode
            if stat.S_ISDIR(mode):
                copy_dir(cs, cd, cst)
                continue
            if stat.S_ISCHR(mode) and cst.st_rdev == 0:
                os.mknod(cd, stat.S_IFCHR | 0o000, 0)  # whiteout
                os.chown(cd, cst.st_uid, cst.st_gid, follow_symlinks=False)
                continue
            if stat.S_ISREG(mode):
                inode = (cst.st_dev, cst.st_ino)
                if cst.st_nlink > 1 and inode in seen:
                    os.link(seen[inode], cd)
                    continue
                fsmeta.copy_file_data(cs, cd, cst.st_size)
                if cst.st_nlink > 1:
                    seen[inode] = cd
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(cs), cd)
            else:
                fsmeta.make_node(cd, mode, cst.st_rdev)
            fsmeta.apply_metadata(cd, mode, cst.st_uid, cst.st_gid, cst.st_mtime_ns,
                                  fsmeta.read_xattrs(cs, keep_overlay=True))
        fsmeta.apply_metadata(d, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                              fsmeta.read_xattrs(s, keep_overlay=True))

    s = os.fsencode(src)
    copy_dir(s, os.fsencode(dst), os.lstat(s))


def materialize(trees: TreeStore, content: ContentStore, root: Entry, dst: Path,
                progress: Callable[[int], None] | None = None) -> None:
    """Write the full tree of a snapshot from the CAS into ``dst`` (which must not exist)."""
    linked: dict[bytes, bytes] = {}
    tick = progress or (lambda n: None)

    def write_dir(entry: Entry, d: bytes) -> None:
        os.mkdir(d, 0o700)
        for name, child in trees.get(entry.ref).items():
            cd = d + b"/" + name
            if child.is_dir:
                write_dir(child, cd)
                continue
            if child.link and child.link in linked:
                os.link(linked[child.link], cd)
                continue
            if child.is_file:
                fsmeta.write_file_data(cd, content.read(child.ref))
                tick(child.size)
            elif stat.S_ISLNK(child.mode):
                os.symlink(child.ref, cd)
            else:
                fsmeta.make_node(cd, child.mode, child.rdev)
            fsmeta.apply_metadata(cd, child.mode, child.uid, child.gid, child.mtime_ns, child.xattrs)
            if child.link:
                linked[child.link] = cd
        fsmeta.apply_metadata(d, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs)

    write_dir(root, os.fsencode(dst))


def set_root_metadata(path: Path, root: Entry | None) -> None:
    """Make a branch's upper root show the snapshot root's own attributes (overlayfs takes the
    root's attributes from the upper directory)."""
    if root is None:
        return
    fsmeta.apply_metadata(os.fsencode(path), root.mode, root.uid, root.gid, root.mtime_ns, root.xattrs)


def remove_tree(path: Path) -> None:
    """rm -rf that also copes with read-only directories; missing is fine."""
    import shutil

    def onerror(func, p, exc_info):
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
            return
        raise exc

    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=onerror)
        else:
            os.unlink(path)
