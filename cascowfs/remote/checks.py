"""What a tree pulled from a remote may hold, and what a pulled observation must be.

A remote is written by other machines: a tree from it is hostile input, held to what this
store's own scans can produce, and to no more privilege than a branch can give itself. A
tree that breaks a rule is refused (EIO naming the remote, the object and the entry)
before any of it is stored:

- names are file names: not empty (but the superroot's one entry), no ``/`` or NUL, not
  ``.`` or ``..``;
- no xattr of overlayfs's (``trusted.overlay.*``) or of cascowfs's (``user.cascowfs.*``):
  scans never record them, and a layer holding them would steer the overlay mounts;
- no device node, no set-user-id or set-group-id file or directory owned by root, and no
  xattr that grants privilege at exec: file capabilities (``security.capability``, which a
  branch's mount honours as it honours a set-id bit) and Smack's exec label
  (``security.SMACK64EXEC``). A branch runs with what its snapshot's files grant. Other
  ``security.*`` xattrs (an SELinux label, IMA and EVM signatures) grant nothing by
  themselves: the pulling host's policy and keys decide what they mean;
- only the file types a scan records, each as a scan records it: a symbolic link's target a
  path (1 to 4095 bytes, no NUL) and its size that path's length, a FIFO or socket without
  content (a layer could not be written otherwise);
- a big directory's index (``trees.index_pages``) is paged as this store pages one, since
  the store reads its pages as one listing (``TreeStore._decoded``): it is no snapshot root
  and has a page at least, and, once the pull has every object (a page may be a tree the
  store had), each page is a listing (not an index) of one name at least, and the names run
  in order through the pages, none in two (a name in two would count twice in the totals
  summed over the pages, and show once). Where pages end is not held to this store's cut:
  it reads any cut, and lends a commit only its own;
- across the trees of one pull (``PulledTrees``), once the pull has every object: a
  directory (or a page of a big one) names a tree, a directory entry's totals (files, bytes,
  hard-link members below it) are those of the tree it names, and a regular file's content
  holds its size, and so does the observation's. A snapshot read by the daemon and its layer
  written from the CAS must show the same files, and ``show``, ``episodes`` and the
  snapshot's xattrs the totals of those files;
- across the whole snapshot, trees the store had included: the members of a hard-link group
  are one inode (the same metadata and content), as the layer written from them makes them,
  and the group is keyed by its members' paths as an import keys it (``scan.link_key``; a
  lone member has no key). A commit re-keys only the groups its branch touched, so a key
  that a later branch's own group could be given would join two files into one.

A directory's totals are checked one level down: against the entries of the tree it names,
whose own directory entries are checked in turn if pulled, and are as this store recorded
them if it had the tree before. So a pull reads no more of what the store had than the
trees its pulled directories name directly.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable

from ..cas import ContentStore, content_size
from ..catalog import Observation
from ..codec import TYPE_TREE
from ..errors import StoreIOError
from ..fsmeta import OVERLAY_XATTR_PREFIX, RESERVED_XATTR_PREFIX
from ..model import Entry
from ..scan import link_group_problem
from ..trees import TreeStore, decode_tree, index_pages, listing_totals, stored_payload

_FORBIDDEN_XATTRS = (OVERLAY_XATTR_PREFIX, RESERVED_XATTR_PREFIX)
_PRIVILEGE_XATTRS = (b"security.capability", b"security.SMACK64EXEC")
_FILE_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK)
Totals = tuple[int, int, int]  # files, bytes, hard-link members below a directory
# a listing's first and last names, or why it can be no page of an index
Span = tuple[bytes, bytes] | str
_TARGET_MAX = 4095  # the longest symbolic link target Linux stores (PATH_MAX less its NUL)


def check_pulled_tree(payload: bytes, oid: bytes, *, superroot: bool, where: str) -> list[Entry]:
    """Raise StoreIOError if the listing ``payload`` of tree object ``oid`` breaks a rule
    above; its entries, for the rules across trees (``PulledTrees``)."""
    try:
        entries = decode_tree(payload)
    except StoreIOError as exc:
        raise StoreIOError(f"{_tree(where, oid)} does not decode: {exc.message}") from None
    if superroot and list(entries) != [b""]:
        raise StoreIOError(f"{_tree(where, oid)} is no snapshot root (one entry, named '')")
    for name, entry in entries.items():
        problem = _problem(name, entry, superroot)
        if problem:
            raise StoreIOError(f"{_entry(where, oid, name)}: {problem}")
    return list(entries.values())


class PulledTrees:
    """The rules that span the objects of one pull (module docstring): ``take`` each object
    as it arrives, then ``check_objects`` and ``check_link_groups`` once every one is in."""

    def __init__(self, where: str, snapshot: str, obs: Observation | None) -> None:
        self.where = where
        self._snapshot = snapshot
        self._obs = obs
        # every object pulled -> the bytes of file content it holds (None: a tree)
        self._pulled: dict[bytes, int | None] = {}
        # (content id, size) of every regular file -> the tree and the entry that give them
        self._files: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}
        # what must be a tree (a directory's, an index's page) -> the tree naming it, and the
        # directory's name (None: a page)
        self._trees: dict[bytes, tuple[bytes, bytes | None]] = {}
        # every tree pulled -> its listing's totals, or an index's pages
        self._listed: dict[bytes, Totals | list[bytes]] = {}
        # every listing pulled -> its names' span, which a page of an index must have
        self._spans: dict[bytes, Span] = {}
        # the entries of every tree pulled that holds hard-link members
        self._linked: dict[bytes, list[Entry]] = {}
        # (tree id, the totals a directory entry gives it) -> the tree and the entry
        self._claims: dict[tuple[bytes, Totals], tuple[bytes, bytes]] = {}

    def take(self, oid: bytes, kind: bytes, payload: bytes, *, superroot: bool) -> None:
        """A pulled object: a tree is checked now (``check_pulled_tree`` and the rules across
        trees that need no other object), file content noted with its size."""
        if kind != TYPE_TREE:
            try:
                self._pulled[oid] = content_size(kind, payload)
            except StoreIOError as exc:
                raise StoreIOError(
                    f"remote {self.where}: object {oid.hex()}: {exc.message}"
                ) from None
            return
        self._pulled[oid] = None
        try:
            pages = index_pages(payload)
        except StoreIOError as exc:
            raise StoreIOError(f"{_tree(self.where, oid)} does not decode: {exc.message}") from None
        if pages is not None:  # the pages are checked as trees of their own, and as pages
            if superroot:  # whose one entry the store looks up in a listing
                raise StoreIOError(
                    f"{_tree(self.where, oid)} is a big directory's index, no snapshot root "
                    "(one entry, named '')"
                )
            if not pages:
                raise StoreIOError(f"{_tree(self.where, oid)} is an index of no pages")
            self._listed[oid] = pages
            for page in pages:
                self._trees.setdefault(page, (oid, None))
            return
        entries = check_pulled_tree(payload, oid, superroot=superroot, where=self.where)
        self._spans[oid] = _span([entry.name for entry in entries])
        self._listed[oid] = totals = listing_totals(entries)
        if totals[2]:
            self._linked[oid] = entries
        for entry in entries:
            if entry.is_dir:
                self._trees.setdefault(entry.ref, (oid, entry.name))
                claimed = (entry.tree_files, entry.tree_bytes, entry.tree_links)
                self._claims.setdefault((entry.ref, claimed), (oid, entry.name))
            elif stat.S_ISREG(entry.mode):
                self._files.setdefault((entry.ref, entry.size), (oid, entry.name))

    def check_objects(self, trees: TreeStore) -> None:
        """Raise StoreIOError unless every directory and page names a tree, every index
        pulled is paged as the store pages (module docstring), every directory entry carries
        its tree's totals, and every regular file's content, and the observation's, holds its
        size: as pulled, or as ``trees`` (the pulling store's) holds an object it had before
        the pull."""
        content = trees.content
        for tree_id, (tree, name) in self._trees.items():
            if not self._is_tree(tree_id, content):
                where = _tree(self.where, tree) if name is None else _entry(self.where, tree, name)
                raise StoreIOError(f"{where}: {tree_id.hex()} is not a tree")
        for index, listed in self._listed.items():
            if isinstance(listed, list):  # before any totals: they are read through the pages
                self._check_pages(index, listed, trees)
        for (tree_id, claimed), (tree, name) in self._claims.items():
            found = self._totals_of(tree_id, trees)
            if found != claimed:
                raise StoreIOError(
                    f"{_entry(self.where, tree, name)}: a directory said to hold {_said(claimed)}"
                    f" whose tree holds {_said(found)}"
                )
        for (content_id, size), (tree, name) in self._files.items():
            try:
                holds = self._size_of(content_id, content)
            except StoreIOError as exc:
                raise StoreIOError(f"{_entry(self.where, tree, name)}: {exc.message}") from None
            if holds != size:
                raise StoreIOError(
                    f"{_entry(self.where, tree, name)}: a file of {size} bytes whose content "
                    f"holds {holds}"
                )
        if self._obs is not None:
            what = f"remote {self.where}: the observation of snapshot {self._snapshot}"
            try:
                holds = self._size_of(bytes.fromhex(self._obs.ref), content)
            except StoreIOError as exc:
                raise StoreIOError(f"{what}: {exc.message}") from None
            if holds != self._obs.size:
                raise StoreIOError(
                    f"{what} holds {holds} bytes, not the {self._obs.size} its ref says"
                )

    def check_link_groups(self, superroot: bytes, trees: TreeStore) -> None:
        """Raise StoreIOError unless every hard-link group of the snapshot (superroot tree
        ``superroot``) is one inode keyed by its members' paths (``link_group_problem``).
        Call after ``check_objects``, which checks the totals that say where members are."""
        problem = link_group_problem(lambda tree_id: self._entries_of(tree_id, trees), superroot)
        if problem:
            raise StoreIOError(f"remote {self.where}: snapshot {self._snapshot}, {problem}")

    def _check_pages(self, index: bytes, pages: list[bytes], trees: TreeStore) -> None:
        """Raise StoreIOError unless the ``pages`` of pulled index ``index`` (trees, checked
        before) are listings, each of one name at least, whose names run in order through
        them, as ``trees.encode_listing`` pages a directory: the store reads an index
        (``TreeStore._decoded``) as the one listing of every page's entries, and its totals
        are summed over the pages."""
        last = None
        for page in pages:
            span = self._span_of(index, page, trees)
            if isinstance(span, str):
                raise StoreIOError(f"{_tree(self.where, index)}: page {page.hex()} {span}")
            first, final = span
            if last is not None and first <= last:
                raise StoreIOError(
                    f"{_tree(self.where, index)}: page {page.hex()} begins at {_name(first)}, "
                    f"not after {_name(last)}, where the page before it ends"
                )
            last = final

    def _span_of(self, index: bytes, page: bytes, trees: TreeStore) -> Span:
        """The span of the names of ``page`` of ``index``: a listing pulled, or one the
        store had (StoreIOError if it is an index, which the store does not read as a
        page)."""
        listed = self._listed.get(page)
        if listed is None:  # a tree the store had
            is_index = index_pages(stored_payload(trees.content.get(page))) is not None
            if not is_index:
                return _span(list(trees.get(page)))
        elif not isinstance(listed, list):
            return self._spans[page]
        raise StoreIOError(
            f"{_tree(self.where, index)}: page {page.hex()} is an index, which the store does "
            "not read as a page"
        )

    def _entries_of(self, tree_id: bytes, trees: TreeStore) -> Iterable[Entry]:
        listed = self._listed.get(tree_id)
        if listed is None:  # a tree the store had
            return trees.get(tree_id).values()
        if isinstance(listed, list):  # an index: its pages' entries
            return [entry for page in listed for entry in self._entries_of(page, trees)]
        return self._linked.get(tree_id, ())

    def _totals_of(self, tree_id: bytes, trees: TreeStore) -> Totals:
        listed = self._listed.get(tree_id)
        if listed is None:  # a tree the store had: its listing as the store recorded it
            return listing_totals(trees.get(tree_id).values())
        if isinstance(listed, list):  # an index: the sum of its pages'
            sums = [self._totals_of(page, trees) for page in listed]
            return (sum(t[0] for t in sums), sum(t[1] for t in sums), sum(t[2] for t in sums))
        return listed

    def _is_tree(self, oid: bytes, content: ContentStore) -> bool:
        if oid in self._pulled:
            return self._pulled[oid] is None
        return content.kind_of(oid) == TYPE_TREE

    def _size_of(self, content_id: bytes, content: ContentStore) -> int:
        if content_id not in self._pulled:
            return content.content_size(content_id)
        size = self._pulled[content_id]
        if size is None:
            raise StoreIOError(f"object {content_id.hex()} is a tree, which is not file content")
        return size


def _span(names: list[bytes]) -> Span:
    """The first and last of a listing's ``names``, if it could be a page."""
    if not names:
        return "holds no entry"
    if any(a >= b for a, b in zip(names, names[1:], strict=False)):
        return "holds its names out of order"
    return names[0], names[-1]


def _said(totals: Totals) -> str:
    files, size, links = totals
    return f"{files} files of {size} bytes and {links} hard-link members"


def _tree(where: str, oid: bytes) -> str:
    return f"remote {where}: tree {oid.hex()}"


def _entry(where: str, oid: bytes, name: bytes) -> str:
    return f"{_tree(where, oid)}, entry {_name(name)}"


def _name(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


def _problem(name: bytes, entry: Entry, superroot: bool) -> str | None:
    if not superroot and (not name or name in (b".", b"..") or b"/" in name or b"\0" in name):
        return "not a file name"
    if superroot and not entry.is_dir:
        return "the root is not a directory"
    if any(key.startswith(_FORBIDDEN_XATTRS) for key, _ in entry.xattrs):
        return "an overlayfs or cascowfs xattr"
    granting = [key for key, _ in entry.xattrs if key in _PRIVILEGE_XATTRS]
    if granting:
        return f"{granting[0].decode()}, which grants privilege at exec"
    kind = stat.S_IFMT(entry.mode)
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        return "a device node"
    if kind not in _FILE_TYPES:
        return f"no file type a scan records (mode {entry.mode:o})"
    if kind == stat.S_IFLNK and not (0 < len(entry.ref) <= _TARGET_MAX and b"\0" not in entry.ref):
        return "a symbolic link whose target is no path"
    if kind == stat.S_IFLNK and entry.size != len(entry.ref):
        return "a symbolic link whose size is not its target's length"
    if kind in (stat.S_IFIFO, stat.S_IFSOCK) and (entry.ref or entry.size):
        return "a FIFO or socket with content"
    if (entry.mode & stat.S_ISUID and entry.uid == 0) or (
        entry.mode & stat.S_ISGID and entry.gid == 0 and not entry.is_dir
    ):
        return "set-id and owned by root"
    return None
