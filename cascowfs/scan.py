"""Turning real directories into snapshot trees.

Two sources, one result type:

* ``scan_directory`` reads a plain directory (import), optionally mirroring it into a layer
  directory from the very bytes it hashed, so the layer and the tree cannot disagree;
* ``apply_upper`` lays an overlayfs upper directory (whiteouts, opaque and redirected
  directories) over a base tree, giving exactly the tree a reader of the branch sees.

Both build a ``DirNode`` skeleton; ``finalize`` turns it into tree objects bottom-up, writing only
the directories that actually changed.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, cast

import blake3

from . import beneath, fsmeta, images
from .cas import prepare_content
from .import_workers import FileJob, FileResult, ImportWorkers, Prepare, read_content
from .model import Entry
from .privacy import Caller, reading_as
from .trees import (
    STORED,
    Encoding,
    TreeStore,
    counted,
    encode_listing,
    listing_totals,
    same_entries,
)


class ObjectSink:
    """New objects of one operation; ``flush`` hands batches to a writer (an LMDB transaction)."""

    # a flush holds a batch, its packs and LMDB's copy of them at once: ~3x this in memory
    def __init__(
        self,
        flush: Callable[[list[tuple[bytes, bytes]]], None] | None = None,
        batch_bytes: int = 32 << 20,
    ) -> None:
        self.pending: dict[bytes, bytes] = {}
        self.pending_bytes = 0
        self._flush = flush
        self._batch_bytes = batch_bytes

    def add(self, objects: list[tuple[bytes, bytes]]) -> None:
        for oid, value in objects:
            if value != STORED and oid not in self.pending:
                self.pending[oid] = value
                self.pending_bytes += len(value)
        if self._flush is not None and self.pending_bytes >= self._batch_bytes:
            self.flush()

    def flush(self) -> None:
        if self._flush is not None and self.pending:
            self._flush(list(self.pending.items()))
            self.pending.clear()
            self.pending_bytes = 0

    def take(self) -> list[tuple[bytes, bytes]]:
        items = list(self.pending.items())
        self.pending.clear()
        self.pending_bytes = 0
        return items


_NOTHING_BELOW: dict[bytes, Entry] = {}  # lower listing of a directory with none; never mutated
_NO_TOTALS = (0, 0, 0)
_OPAQUE = b"trusted.overlay.opaque"
_REDIRECT = b"trusted.overlay.redirect"


class DirNode:
    """A directory being built: its own metadata and its children (entries or nodes).

    A node of an upper walk holds what the upper says about its children (``changes``: name ->
    entry, node, or None for a whiteout) over the listing of the directory below (``lower``,
    as the tree cache holds it, and its tree id); ``children``, the two merged, is built when
    first asked for. ``finalize`` compares only ``changes`` with the branch's last commit, so
    a directory with a thousand entries and one changed file costs one entry, not a
    thousand."""

    __slots__ = ("meta", "_children", "lower", "lower_id", "lower_totals", "changes")

    def __init__(
        self,
        meta: Entry,
        children: dict[bytes, Entry | DirNode] | None = None,
        *,
        lower: Entry | None = None,
        lower_children: dict[bytes, Entry] | None = None,
        changes: dict[bytes, Entry | DirNode | None] | None = None,
    ) -> None:
        self.meta = meta
        self._children = children
        self.lower = lower_children
        self.lower_id = lower.ref if lower is not None else b""  # b"": nothing below
        # what the directory below holds in all (files, bytes, link members), so that a
        # change costs its own entries, not a sum over the whole listing
        self.lower_totals = (
            _NO_TOTALS if lower is None else (lower.tree_files, lower.tree_bytes, lower.tree_links)
        )
        self.changes = changes

    @property
    def children(self) -> dict[bytes, Entry | DirNode]:
        if self._children is None:
            self._children = _overlaid(self.lower or {}, self.changes or {})
        return self._children

    @property
    def changes_only(self) -> bool:
        """Whether ``changes`` over ``lower`` is still all there is (nobody edited
        ``children``)."""
        return self.changes is not None and self._children is None


def _overlaid(lower: dict, changes: dict) -> dict:
    """A listing with an upper's changes applied (None: a whiteout, the name goes)."""
    merged = dict(lower)
    for name, child in changes.items():
        if child is None:
            merged.pop(name, None)
        else:
            merged[name] = child
    return merged


def _meta_entry(
    name: bytes, st: os.stat_result, xattrs: tuple, size: int = 0, ref: bytes = b""
) -> Entry:
    return Entry(
        name,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns,
        size,
        ref,
        st.st_rdev if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else 0,
        xattrs,
    )


def link_key(paths: list[bytes]) -> bytes:
    """Hard-link group key: derived from every member path, so a stale member of an old group
    (left behind when its siblings were copied up) can never merge with a new group."""
    return blake3.blake3(b"H\0" + b"\0".join(sorted(paths))).digest()[:16]


def link_group_problem(
    entries_of: Callable[[bytes], Iterable[Entry]], superroot: bytes
) -> str | None:
    """What is wrong with the hard-link groups of the snapshot of superroot tree
    ``superroot`` (``entries_of``: a tree's entries by id), or None. A group's members must
    be one inode, the same metadata and content (a layer links them into one file), and the
    group keyed by its members' paths as an import keys it (``link_key``; a lone member has
    no key): a commit re-keys only the groups its branch touched (``apply_upper``). Only
    directories that hold members (``tree_links``) are read."""
    groups: dict[bytes, tuple[tuple, list[bytes]]] = {}
    stack: list[tuple[bytes, bytes | None]] = [(superroot, None)]  # None: the superroot
    while stack:
        tree_id, path = stack.pop()
        for entry in entries_of(tree_id):
            cpath = b"" if path is None else path + b"/" + entry.name if path else entry.name
            if entry.is_dir:
                if entry.tree_links:
                    stack.append((entry.ref, cpath))
            elif entry.link:
                inode = (entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.size,
                         entry.ref, entry.rdev, entry.xattrs)  # fmt: skip
                first, paths = groups.setdefault(entry.link, (inode, []))
                paths.append(cpath)
                if first != inode:
                    shown, first_shown = _shown(cpath), _shown(paths[0])
                    return f"file {shown}: a hard link of {first_shown} that is another file"
    for key, (_, paths) in groups.items():
        if key != (link_key(paths) if len(paths) > 1 else b""):
            return (
                f"file {_shown(paths[0])}: a hard-link group keyed {key.hex()}, which its "
                f"{len(paths)} member paths do not give"
            )
    return None


def _shown(path: bytes) -> str:
    return repr(path.decode("utf-8", "backslashreplace"))


class HardLinks:
    """Hard-link groups met during a scan, keyed by the inode they share."""

    def __init__(self) -> None:
        self.groups: dict[tuple[int, int], list[tuple[DirNode, bytes, bytes]]] = {}
        self.first_path: dict[tuple[int, int], bytes] = {}

    def add(self, st: os.stat_result, node: DirNode, name: bytes, path: bytes) -> bool:
        """Record a member; True if this inode was seen before (caller may link, not copy)."""
        key = (st.st_dev, st.st_ino)
        seen = key in self.groups
        self.groups.setdefault(key, []).append((node, name, path))
        self.first_path.setdefault(key, path)
        return seen

    def assign(self) -> None:
        for members in self.groups.values():
            if len(members) < 2:
                continue
            key = link_key([path for _, _, path in members])
            for node, name, _ in members:
                node.children[name] = cast(Entry, node.children[name])._replace(link=key)


def _file_entry(
    name: bytes, path: bytes, st: os.stat_result, prepare: Prepare, sink: ObjectSink
) -> Entry:
    prepared, xattrs = read_content(path, prepare, sink.add, walked=beneath.identity(st))
    sink.add(prepared.objects)
    return _meta_entry(name, st, xattrs, prepared.size, prepared.content_id)


def _other_entry(name: bytes, directory: int, st: os.stat_result, shown: bytes) -> Entry:
    """The entry of ``name`` (at ``shown``), neither a directory nor a regular file, in the
    open ``directory``."""
    path = beneath.at(directory, name)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name, dir_fd=directory)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise beneath.replaced(shown) from None  # no longer a symbolic link
        return _meta_entry(name, st, fsmeta.read_xattrs(path), len(target), target)
    return _meta_entry(name, st, fsmeta.read_xattrs(path))


# One entry of a directory a walk opened: its name, its path, its ``lstat``, and its entry if
# it is neither a directory nor a regular file (nor an overlay whiteout, in an upper)
_LookedUp = tuple[bytes, bytes, os.stat_result, Entry | None]


def _looked_up(
    directory: int, path: bytes, names: Iterable[bytes], *, whiteouts: bool
) -> list[_LookedUp]:
    """Each of ``names`` looked up in the open ``directory`` (at ``path``), never through a
    symbolic link; what is neither a directory nor a regular file (nor, with ``whiteouts``, a
    whiteout) is read now, through the directory."""
    out = []
    for name in names:
        cpath = path + b"/" + name
        st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        kind = stat.S_IFMT(st.st_mode)
        plain = kind in (stat.S_IFDIR, stat.S_IFREG) or (
            whiteouts and kind == stat.S_IFCHR and st.st_rdev == 0
        )
        out.append((name, cpath, st, None if plain else _other_entry(name, directory, st, cpath)))
    return out


def _mirror_other(entry: Entry, dst: bytes) -> None:
    if stat.S_ISLNK(entry.mode):
        os.symlink(entry.ref, dst)
    else:
        fsmeta.make_node(dst, entry.mode, entry.rdev)


class Progress:
    """Counts bytes as they are scanned; ``update`` is a callback (a tqdm bar, usually)."""

    def __init__(self, update: Callable[[int], None] | None = None) -> None:
        self.update = update or (lambda n: None)


def scan_directory(
    src: Path,
    sink: ObjectSink,
    *,
    mirror_to: Path | None = None,
    prepare: Prepare = prepare_content,
    progress: Progress | None = None,
    reader: Caller | None = None,
    unfit_for_image: list[str] | None = None,
    seen: Callable[[bytes, os.stat_result], None] | None = None,
    resolved: beneath.Identity | None = None,
) -> DirNode:
    """Read a plain directory tree into a DirNode (and into ``mirror_to``, a layer, if given).

    The walk runs on the calling thread and hands each file to ``ImportWorkers``, which read,
    cut, hash, compress and mirror it in worker processes (threads for small imports), the
    big ones while the walk goes on; objects reach ``sink`` on the calling thread, in order.
    ``reader``: whose credentials every lookup, listing and open in ``src`` is checked against
    (``privacy.reading_as``); the mirror is written with the process's own.
    ``unfit_for_image`` gets why the mirror may not become an EROFS image, entry by entry
    (``images.why_not_an_entry``), so that no second walk of the mirror has to find out.
    ``seen`` is told every entry's path and ``lstat`` as the walk meets it, the root's first.
    ``resolved``: the ``identity`` of the directory ``src`` named when it was resolved; if a
    directory on the way has been swapped since (for a symbolic link to another tree), the
    walk's top is another directory, and that is BusyError.
    """
    progress = progress or Progress()
    links = HardLinks()
    root_path = os.fsencode(src)
    with reading_as(reader):
        st = os.lstat(root_path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(20, "not a directory", str(src))
    if resolved is not None and beneath.identity(st) != resolved:
        raise beneath.replaced(root_path)
    seen = seen or (lambda path, st: None)
    seen(root_path, st)
    mirror_root = os.fsencode(mirror_to) if mirror_to is not None else None
    if mirror_root is not None:
        os.makedirs(mirror_root, exist_ok=True)
    followers: list[tuple[DirNode, bytes, bytes | None, tuple[int, int]]] = []
    dirs: list[tuple[bytes, Entry]] = []
    first_of_inode: dict[tuple[int, int], tuple[DirNode, bytes, bytes | None]] = {}

    def check_for_image(path: bytes, entry: Entry, st: os.stat_result | None = None) -> None:
        if unfit_for_image is not None:
            size, allocated = (st.st_size, st.st_blocks * 512) if st is not None else (0, 0)
            xattr_bytes = images.xattr_bytes(entry.xattrs)
            why = images.why_not_an_entry(path, entry.name, xattr_bytes, size, allocated)
            if why is not None:
                unfit_for_image.append(why)

    def open_dir(
        top: int, path: bytes, rel: bytes, st: os.stat_result, name: bytes, mirror: bytes | None
    ) -> tuple[DirNode, Iterator[_LookedUp]]:
        """A directory's node and its children read (in name order), to be walked: listed
        and looked up in the directory below ``top`` that the walk saw at ``rel``."""
        with reading_as(reader):  # everything this directory holds, read as ``reader``
            fd = beneath.open_below(top, rel, st, path)
            try:
                node = DirNode(_meta_entry(name, st, fsmeta.read_xattrs(fd)), {})
                check_for_image(mirror or path, node.meta)
                names = sorted(os.fsencode(n) for n in os.listdir(fd))
                children = _looked_up(fd, path, names, whiteouts=False)
            finally:
                os.close(fd)
        for _, cpath, cst, _ in children:
            seen(cpath, cst)
        if mirror is not None:
            dirs.append((mirror, node.meta))
        return node, iter(children)

    def walk(top: int, st: os.stat_result, mirror_root: bytes | None) -> DirNode:
        # depth first with a stack of the directories being walked, not a recursion: a
        # tree may be deeper than Python's recursion limit
        root, children = open_dir(top, root_path, b"", st, b"", mirror_root)
        stack = [(root, children, b"", mirror_root)]
        while stack:
            node, children, rel, mirror = stack[-1]
            for cname, cpath, cst, other in children:
                crel = rel + b"/" + cname if rel else cname
                cmirror = mirror + b"/" + cname if mirror is not None else None
                if stat.S_ISDIR(cst.st_mode):
                    if cmirror is not None:
                        os.mkdir(cmirror, 0o700)
                    sub, subchildren = open_dir(top, cpath, crel, cst, cname, cmirror)
                    node.children[cname] = sub
                    stack.append((sub, subchildren, crel, cmirror))
                    break  # the rest of this directory after that subdirectory's
                elif stat.S_ISREG(cst.st_mode):
                    inode = (cst.st_dev, cst.st_ino)
                    if cst.st_nlink > 1:
                        links.add(cst, node, cname, crel)
                        if inode in first_of_inode:
                            followers.append((node, cname, cmirror, inode))
                            continue
                        first_of_inode[inode] = (node, cname, cmirror)
                    workers.add(FileJob(node, cname, cpath, cst, cmirror))
                else:
                    entry = cast(Entry, other)
                    check_for_image(cmirror or cpath, entry)
                    if cmirror is not None:
                        _mirror_other(entry, cmirror)
                        fsmeta.apply_metadata(
                            cmirror, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs
                        )
                    node.children[cname] = entry
            else:
                stack.pop()
                for job, result in workers.ready():
                    take(job, result)
        return root

    def take(job: FileJob, result: FileResult) -> None:
        content_id, size, xattrs, objects = result
        entry = _meta_entry(job.name, job.st, xattrs, size, content_id)
        job.node.children[job.name] = entry
        check_for_image(job.mirror or job.path, entry, job.st)
        sink.add(objects)
        progress.update(size)

    with ImportWorkers(prepare, sink.add, reader) as workers:
        with reading_as(reader):
            top = beneath.open_top(root_path, st)
        try:
            root = walk(top, st, mirror_root)
        finally:
            os.close(top)
        for job, result in workers.rest():
            take(job, result)
    for node, name, mirror, inode in followers:
        first_node, first_name, first_mirror = first_of_inode[inode]
        node.children[name] = cast(Entry, first_node.children[first_name])._replace(name=name)
        if mirror is not None:
            assert first_mirror is not None  # every file of a mirrored walk has a mirror
            os.link(first_mirror, mirror)
    for mirror, meta in reversed(dirs):  # children first: creating them changed the mtimes
        fsmeta.apply_metadata(mirror, meta.mode, meta.uid, meta.gid, meta.mtime_ns, meta.xattrs)
    links.assign()
    return root


def expand(trees: TreeStore, entry: Entry | None, meta: Entry) -> DirNode:
    """A DirNode holding the children of directory ``entry`` (none if it is not a directory)."""
    children: dict = dict(trees.get(entry.ref)) if entry is not None and entry.is_dir else {}
    return DirNode(meta, children)


RACY_NS = 50_000_000  # well above a kernel timestamp tick (at most 10 ms)


def _listing_key(rel: bytes, st: os.stat_result) -> tuple:
    """The key of a directory's listing in an ``apply_upper`` cache (file keys start with their
    path, never with this string)."""
    return ("listing", rel, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


# A directory of an ``apply_upper`` walk: its node, its children left to walk, its path
# relative to the upper, its node's changes and the listing below it (a plain tuple: one is
# made for every directory of every commit)
_UpperDir = tuple[
    DirNode,
    Iterator[_LookedUp],
    bytes,
    dict[bytes, Entry | DirNode | None],
    dict[bytes, Entry],
]


def apply_upper(
    trees: TreeStore,
    base_root: Entry | None,
    upper: Path,
    sink: ObjectSink,
    prepare: Prepare = prepare_content,
    file_cache: dict | None = None,
    keep: dict | None = None,
) -> DirNode:
    """The tree a reader of overlay(upper over base) sees, as a DirNode.

    ``file_cache`` maps (path, ino, size, mtime_ns, ctime_ns) to an already computed file entry,
    so that repeated status calls or commits of a live branch hash only what changed since,
    and ``_listing_key(path, st)`` to a directory's names and xattrs, so that a directory
    whose ctime has not moved (no entry added, removed or renamed, no xattr or mode change) is
    not listed again. Every entry this walk uses goes into ``keep`` (which may be
    ``file_cache`` itself), except for those changed within ``RACY_NS`` of the walk: the
    kernel's coarse clock could give a further change the same ctime.
    """
    links = HardLinks()
    stable_before_ns = time.time_ns() - RACY_NS
    upper_root = os.fsencode(upper)
    # whether the upper shadows, removes or moves a member of one of the base's hard-link
    # groups: only then may a base group's key have changed (``canonicalize_links``)
    base_links_touched = False

    def lookup_abs(path: bytes) -> Entry | None:
        if base_root is None:
            return None
        return trees.lookup(base_root, path)

    def open_dir(
        top: int,
        path: bytes,
        rel: bytes,
        st: os.stat_result,
        name: bytes,
        lower: Entry | None,
        siblings: dict[bytes, Entry],
    ) -> _UpperDir:
        """A directory's node, its children still to walk, listed and looked up in the
        directory below ``top`` that the walk saw at ``rel``; ``lower``: what the directory
        below (``siblings``) holds under this name."""
        fd = beneath.open_below(top, rel, st, path)
        try:
            lkey = _listing_key(rel, st)
            listing = file_cache.get(lkey) if file_cache is not None else None
            if listing is None:
                xattrs, marks = fsmeta.read_xattrs_and_overlay_keys(fd)
                # listdir's order, not sorted: trees are encoded sorted by name whatever the
                # order
                listing = ([os.fsencode(n) for n in os.listdir(fd)], xattrs, marks)
            names, xattrs, marks = listing
            if keep is not None and st.st_ctime_ns < stable_before_ns:
                keep[lkey] = listing
            if _OPAQUE in marks or _REDIRECT in marks:
                lower = lower_of_marked(fd, lower, siblings)
            children = _looked_up(fd, path, names, whiteouts=True)
        finally:
            os.close(fd)
        if lower is not None and not lower.is_dir:
            lower = None
        lower_children = trees.get(lower.ref) if lower is not None else _NOTHING_BELOW
        changes: dict[bytes, Entry | DirNode | None] = {}
        node = DirNode(
            _meta_entry(name, st, xattrs),
            lower=lower,
            lower_children=lower_children,
            changes=changes,
        )
        return node, iter(children), rel, changes, lower_children

    def walk(top: int, root: _UpperDir) -> DirNode:
        nonlocal base_links_touched
        # depth first with a stack of the directories being walked, not a recursion: a
        # tree may be deeper than Python's recursion limit
        stack = [root]
        while stack:
            node, children, rel, changes, lower_children = stack[-1]
            for cname, cpath, cst, other in children:
                crel = rel + b"/" + cname if rel else cname
                shadowed = lower_children.get(cname)
                if stat.S_ISCHR(cst.st_mode) and cst.st_rdev == 0:
                    changes[cname] = None  # whiteout
                elif stat.S_ISDIR(cst.st_mode):
                    sub = open_dir(top, cpath, crel, cst, cname, shadowed, lower_children)
                    changes[cname] = sub[0]
                    stack.append(sub)
                    if sub[0].lower_id != (shadowed.ref if shadowed is not None else b""):
                        # opaque or redirected: what stood here goes, what it names moves
                        moved = bool(sub[0].lower_totals[2])
                        base_links_touched |= moved or _holds_links(shadowed)
                    break  # the rest of this directory after that subdirectory's
                elif stat.S_ISREG(cst.st_mode):
                    key = (crel, cst.st_ino, cst.st_size, cst.st_mtime_ns, cst.st_ctime_ns)
                    entry = file_cache.get(key) if file_cache is not None else None
                    if entry is None:
                        entry = _file_entry(cname, cpath, cst, prepare, sink)
                    if keep is not None and cst.st_ctime_ns < stable_before_ns:
                        keep[key] = entry
                    changes[cname] = entry
                    if cst.st_nlink > 1:
                        links.add(cst, node, cname, crel)
                else:
                    changes[cname] = cast(Entry, other)
                base_links_touched |= _holds_links(shadowed)
            else:
                stack.pop()
        return root[0]

    def lower_of_marked(
        directory: int, lower: Entry | None, siblings: dict[bytes, Entry]
    ) -> Entry | None:
        """The lower directory that an opaque or redirected upper directory (open as
        ``directory``) stands over."""
        if fsmeta.get_overlay_xattr(directory, _OPAQUE) == b"y":
            return None
        redirect = fsmeta.get_overlay_xattr(directory, _REDIRECT)
        if redirect is None:
            return lower
        if redirect.startswith(b"/"):
            return lookup_abs(redirect.strip(b"/"))
        return siblings.get(redirect)

    st = os.lstat(upper_root)
    top = beneath.open_top(upper_root, st)
    try:
        root = walk(top, open_dir(top, upper_root, b"", st, b"", base_root, _NOTHING_BELOW))
    finally:
        os.close(top)
    # An upper's own groups get their keys from their paths (``assign``), as an import gives
    # them; the base's untouched groups keep theirs, which were canonical when stored.
    links.assign()
    if base_links_touched:
        canonicalize_links(trees, root)
    return root


def _holds_links(entry: Entry | None) -> bool:
    """Whether ``entry`` is, or a directory holding, a member of a hard-link group."""
    return entry is not None and bool(entry.link or (entry.is_dir and entry.tree_links))


def canonicalize_links(trees: TreeStore, root: DirNode) -> None:
    """Give every hard-link group of the view the key a fresh import would give it.

    Members of a base group that the upper did not touch still share their lower inode, but
    the group may have lost members (copied up, deleted, shadowed) or moved (a redirected
    directory): its key becomes that of its surviving paths, and a lone survivor has no key.
    Only subtrees that hold link members are visited."""
    members: dict[bytes, list[tuple[DirNode, bytes, bytes]]] = {}
    # depth first with a stack of the directories being visited, not a recursion: a tree
    # may be deeper than Python's recursion limit
    stack = [(root, iter(list(root.children.items())), b"")]
    while stack:
        node, children, path = stack[-1]
        for name, child in children:
            cpath = path + b"/" + name if path else name
            if isinstance(child, DirNode):
                stack.append((child, iter(list(child.children.items())), cpath))
                break
            elif child.is_dir:
                if child.tree_links:
                    sub = expand(trees, child, child)
                    node.children[name] = sub
                    stack.append((sub, iter(list(sub.children.items())), cpath))
                    break
            elif child.link:
                members.setdefault(child.link, []).append((node, name, cpath))
        else:
            stack.pop()
    for key, group in members.items():
        canonical = link_key([path for _, _, path in group]) if len(group) > 1 else b""
        if canonical != key:
            for node, name, _ in group:
                node.children[name] = cast(Entry, node.children[name])._replace(link=canonical)


class BuiltDir(NamedTuple):
    """A directory a commit encoded, for the next commit of its branch to compare with."""

    entries: dict[bytes, Entry]
    encoding: Encoding
    meta: Entry  # its own metadata
    entry: Entry  # its entry in its parent
    lower_id: bytes | None  # these two are None unless it came from an upper walk
    changes: dict[bytes, Entry | None] | None


BuiltDirs = dict[bytes, BuiltDir]  # by path


def finalize(
    node: DirNode,
    sink: ObjectSink,
    remember: Callable[[bytes, dict[bytes, Entry], Encoding], None] | None = None,
    reuse: BuiltDirs | None = None,
    built: BuiltDirs | None = None,
    path: bytes = b"",
    stored: TreeStore | None = None,
) -> Entry:
    """Encode a DirNode bottom-up into tree objects (added to ``sink``); returns its entry,
    with ``tree_files``/``tree_bytes`` totals carried in the directory entry. ``remember``
    gets every directory built (id, entries, encoding), for a caller that reads them back next.

    ``built`` collects every directory by path; ``reuse`` is what an earlier call collected.
    A directory whose children are the very same entry objects as then (a commit's unchanged
    files keep their cached entries, unchanged subdirectories their earlier entry) is not
    encoded again: a branch committing again and again re-walks everything it ever changed,
    and re-encoding all of it made each commit of a long lineage slower than the last. For a
    node of an upper walk only its changes are compared (over the same lower listing), not
    every entry of the directory.

    ``stored``: the tree store that holds the lower listings of an upper walk. A changed
    directory with no earlier encoding here then takes the unchanged pages of its lower
    listing as they are stored (a branch's first commit of one file in a directory of 1,100
    entries encodes one page, not all of them), and cuts pages again only around its
    changes."""

    # Children before parents, each directory's in the order of its listing, as a recursion
    # would take them; but from an explicit stack, since a tree may be deeper than Python's
    # recursion limit. A pre-order walk that pushes subdirectories in listing order pops
    # them last first: reversed, it is exactly that post-order, which leaves the entries of
    # a directory's subdirectories on top of ``entries``, in listing order, when its turn
    # comes.
    walked: list[tuple[DirNode, bytes, dict, list[bytes]]] = []
    stack = [(node, path)]
    while stack:
        dir_node, dir_path = stack.pop()
        items: dict = (dir_node.changes or {}) if dir_node.changes_only else dir_node.children
        subdirs = [name for name, child in items.items() if isinstance(child, DirNode)]
        walked.append((dir_node, dir_path, items, subdirs))
        for name in subdirs:
            stack.append((items[name], dir_path + b"/" + name))
    entries: list[Entry] = []
    for dir_node, dir_path, items, subdirs in reversed(walked):
        finalized = dict(items)
        if subdirs:
            below = len(entries) - len(subdirs)
            finalized.update(zip(subdirs, entries[below:], strict=True))
            del entries[below:]
        entries.append(
            _finalize_dir(dir_node, finalized, sink, remember, reuse, built, dir_path, stored)
        )
    return entries[0]


def _finalize_dir(
    node: DirNode,
    finalized: dict,
    sink: ObjectSink,
    remember: Callable[[bytes, dict[bytes, Entry], Encoding], None] | None,
    reuse: BuiltDirs | None,
    built: BuiltDirs | None,
    path: bytes,
    stored: TreeStore | None,
) -> Entry:
    """``finalize`` of one directory, its subdirectories' entries in ``finalized`` already:
    its changes (if ``node.changes_only``) or children, every DirNode replaced by its entry."""
    before = reuse.get(path) if reuse is not None else None
    lower_id = changes = None
    if node.changes_only:
        lower_id = node.lower_id
        changes = finalized
        # over the same listing, the same changes are enough to know
        same = (
            before is not None
            and before.lower_id == lower_id
            and same_entries(before.changes, changes)
        )
        if before is not None and same:
            entries = before.entries
        else:
            entries = _overlaid(node.lower or {}, changes)
    else:
        entries = finalized
        same = before is not None and same_entries(before.entries, entries)
    m = node.meta
    entry = None
    if before is not None and same:
        entries, encoding = before.entries, before.encoding
        if before.meta == m:
            entry = before.entry  # the very same object, so the parent can be reused in turn
    else:
        like, changed = _earlier_encoding(before, lower_id, changes, stored)
        encoding = encode_listing(entries, like, changed)
    tree_id = encoding.tree_id
    if entry is None:
        if changes is not None:  # the lower listing's totals, corrected by the changes
            files, total, links = node.lower_totals
            lower = node.lower or {}
            for name, child in changes.items():
                old = lower.get(name)
                if old is not None:
                    f, b, n = counted(old)
                    files, total, links = files - f, total - b, links - n
                if child is not None:
                    f, b, n = counted(child)
                    files, total, links = files + f, total + b, links + n
        else:
            files, total, links = listing_totals(entries.values())
        entry = m._replace(
            size=0,
            ref=tree_id,
            rdev=0,
            link=b"",
            tree_files=files,
            tree_bytes=total,
            tree_links=links,
        )
    sink.add(encoding.objects)
    if remember is not None:
        remember(tree_id, entries, encoding)
    if built is not None:
        built[path] = BuiltDir(entries, encoding, m, entry, lower_id, changes)
    return entry


def listings_into(
    trees: dict[bytes, dict[bytes, Entry]],
) -> Callable[[bytes, dict[bytes, Entry], Encoding], None]:
    """A ``remember`` for ``finalize`` that keeps each directory built in ``trees`` by id."""

    def remember(tree_id: bytes, entries: dict[bytes, Entry], _encoding: Encoding) -> None:
        trees[tree_id] = entries

    return remember


def _earlier_encoding(
    before: BuiltDir | None,
    lower_id: bytes | None,
    changes: dict[bytes, Entry | None] | None,
    stored: TreeStore | None,
) -> tuple[Encoding | None, Collection[bytes] | None]:
    """An earlier encoding of a directory for ``encode_listing`` to take pages from, and the
    names at which the directory may differ from it (None: any)."""
    if before is not None:
        if changes is not None and before.changes is not None and before.lower_id == lower_id:
            # both over the same lower listing: they differ where either changed it
            return before.encoding, before.changes.keys() | changes.keys()
        return before.encoding, None
    if changes is not None and stored is not None and lower_id:
        return stored.stored_encoding(lower_id), changes.keys()
    return None, None
