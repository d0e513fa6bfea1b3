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
from .trees import TreeStore, file_key


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


class _Writer:
    """Writes entries from the CAS into a layer directory, keeping hard-link groups."""

    def __init__(self, trees: TreeStore, content: ContentStore,
                 progress: Callable[[int], None] | None) -> None:
        self.trees = trees
        self.content = content
        self.linked: dict[bytes, bytes] = {}
        self.tick = progress or (lambda n: None)

    def write_leaf(self, child: Entry, path: bytes) -> None:
        if child.link and child.link in self.linked:
            os.link(self.linked[child.link], path)
            return
        if child.is_file:
            fsmeta.write_file_data(path, self.content.read(child.ref))
            self.tick(child.size)
        elif stat.S_ISLNK(child.mode):
            os.symlink(child.ref, path)
        else:
            fsmeta.make_node(path, child.mode, child.rdev)
        fsmeta.apply_metadata(path, child.mode, child.uid, child.gid, child.mtime_ns, child.xattrs)
        if child.link:
            self.linked[child.link] = path

    def write_dir(self, entry: Entry, path: bytes) -> None:
        """The whole subtree of a directory entry."""
        os.mkdir(path, 0o700)
        for name, child in self.trees.get(entry.ref).items():
            if child.is_dir:
                self.write_dir(child, path + b"/" + name)
            else:
                self.write_leaf(child, path + b"/" + name)
        _set_dir_metadata(path, entry)

    def write_delta(self, base: Entry | None, target: Entry, path: bytes) -> None:
        """Only what turns directory ``base`` into ``target``, in overlayfs's upper format."""
        os.mkdir(path, 0o700)
        before = self.trees.get(base.ref) if base is not None else {}
        after = self.trees.get(target.ref)
        for name in before.keys() - after.keys():
            os.mknod(path + b"/" + name, stat.S_IFCHR, 0)  # whiteout
        for name, t in after.items():
            b = before.get(name)
            child = path + b"/" + name
            if t.is_dir:
                if b is not None and b.is_dir:
                    if b == t:
                        continue  # same subtree, same attributes: the lower layer shows it
                    self.write_delta(b, t, child)
                else:
                    self.write_dir(t, child)
                    if b is not None:  # a directory replacing a file hides nothing below
                        os.setxattr(child, b"trusted.overlay.opaque", b"y")
            elif b is None or b.is_dir or file_key(b) != file_key(t):
                self.write_leaf(t, child)
        _set_dir_metadata(path, target)


def _set_dir_metadata(path: bytes, entry: Entry) -> None:
    fsmeta.apply_metadata(path, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs)


def materialize(trees: TreeStore, content: ContentStore, root: Entry, dst: Path,
                progress: Callable[[int], None] | None = None) -> None:
    """Write the full tree of a snapshot from the CAS into ``dst`` (which must not exist)."""
    _Writer(trees, content, progress).write_dir(root, os.fsencode(dst))


def materialize_delta(trees: TreeStore, content: ContentStore, base: Entry, root: Entry,
                      dst: Path) -> None:
    """Write, as one overlay layer over a full layer of ``base``, what turns it into ``root``."""
    _Writer(trees, content, None).write_delta(base, root, os.fsencode(dst))


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
