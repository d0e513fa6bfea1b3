"""``cascowfs.Client(MNT)``: docs/interface.md's file contract as Python calls, for agent loops.

Nothing here talks to the daemon other than through plain file calls on the mount (open, write,
read, mkdir, readlink, getxattr), so the client behaves exactly like a shell script would, and a
failed call raises the engine's class for its errno, which is also the builtin ``OSError``
subclass for it (``os_error_from_errno``): ``NotFoundError`` is a ``FileNotFoundError``,
``ExistsError`` a ``FileExistsError``, ``PermissionDeniedError`` a ``PermissionError``, ...

Each command opens ``ctl``, writes its line, reads its reply line from the same open file and
closes it (``label`` reads it only when the write fails: a write that returns is its answer).
An idle client therefore holds nothing open on the mount, and ``cascowfs umount`` never finds
it busy; each open gets a ``ctl`` lane of its own, so threads sharing a client run their
commands side by side. The price is a LOOKUP, an OPEN and a RELEASE per command
(docs/interface.md, "Many agents at once", has the figure).

A mount point with no live daemon (nothing mounted there, or a FUSE mount whose daemon is
gone) raises ``DaemonNotRunningError`` naming it, never the ENOENT that the plain directory
underneath answers for every snapshot and branch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import (
    CascowfsError,
    DaemonNotRunningError,
    InvalidArgumentError,
    NotFoundError,
    os_error_from_errno,
)
from .fuse.sysmount import is_cascowfs_mount
from .model import BranchInfo, Change, SnapshotInfo
from .names import check_branch_name, check_label_key, check_snapshot_id
from .wire import command_line, parse_reply

_XATTR = "user.cascowfs."
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


class Client:
    """Drive a mounted cascowfs through its files."""

    def __init__(self, mnt: str | os.PathLike[str]) -> None:
        self.mnt = Path(mnt).absolute()

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release: no file stays open between calls (kept for ``with``)."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ctl(self) -> Path:
        return self.mnt / "ctl"

    def command(self, *words: str) -> str:
        """Send one ctl command (words are shell-quoted) and return the result of its reply."""
        return self._command(words, read_reply=True)

    def _command(self, words: tuple[str, ...], read_reply: bool) -> str:
        """``command``; without ``read_reply`` a write that succeeds is the whole answer (the
        command is done and durable) and its ``ok`` reply goes unread, saving a round trip
        through the daemon; the result is then ""."""
        line = command_line(words)
        try:
            fd = os.open(self.ctl, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self.error_of(exc, f"open {self.ctl}") from None
        try:
            try:
                os.write(fd, (line + "\n").encode())
            except OSError as exc:
                if exc.errno in _DEAD:
                    raise self.error_of(exc, line) from None
                # The daemon's reply names what it refused; the bare errno does not.
                reply = _read_reply(fd)
                ok, code, text = parse_reply(reply) if reply else (False, exc.errno, "")
                raise os_error_from_errno(
                    exc.errno or code or errno.EIO, text or exc.strerror or str(exc)
                ) from None
            if not read_reply:
                return ""
            try:
                reply = _read_reply(fd)
            except OSError as exc:
                raise self.error_of(exc, line) from None
        finally:
            # The reply is read: a FLUSH error on close (a daemon gone meanwhile) changes
            # nothing about it, and must not hide the error being raised.
            with contextlib.suppress(OSError):
                os.close(fd)
        ok, code, text = parse_reply(reply)
        if not ok:
            raise os_error_from_errno(code, text)
        return text

    def error_of(self, exc: OSError, what: str) -> CascowfsError:
        """The client's exception for a failed file call on the mount, naming ``what``.

        ENOTCONN/ECONNABORTED come from a FUSE mount whose daemon is gone; ENOENT from a mount
        point with nothing mounted on it, whose plain directory has no ``ctl`` nor
        ``snapshots/``. Both are told apart from a real "no such ..." here, on the error path,
        so a working call costs no check."""
        code = exc.errno or errno.EIO
        if code in _DEAD:
            verb = "exited while handling" if code == errno.ECONNABORTED else "is not running for"
            return DaemonNotRunningError(
                f"{self.mnt}: the cascowfs daemon {verb} {what!r} (run cascowfs mount STORE "
                f"{self.mnt})",
                errno=code,
            )
        if code == errno.ENOENT and not is_cascowfs_mount(self.mnt):
            return DaemonNotRunningError(
                f"{self.mnt} is not a cascowfs mount: no daemon serves it (run cascowfs mount "
                f"STORE {self.mnt})"
            )
        return os_error_from_errno(code, f"{what}: {exc.strerror or exc}")

    # -- state changes -------------------------------------------------------------------------
    def branch(self, name: str, parent: str | None = None) -> Path:
        """Create branch ``name`` on snapshot ``parent`` (None: the empty snapshot); its tree."""
        if parent is None:
            path = self.branch_path(name)
            try:
                os.mkdir(path)
            except OSError as exc:
                raise self.error_of(exc, f"mkdir {path}") from None
            return self.tree(name)
        return Path(self.command("branch", name, parent))

    def new_branch(self, name: str, parent: str | None = None) -> Branch:
        """``branch()`` as an object: ``with client.new_branch(name, parent) as b:`` discards the
        branch on leaving the block unless it was committed."""
        tree = self.branch(name, parent)
        return Branch(self, name, tree, self._created_ns(name))

    def commit(
        self,
        name: str,
        id: str | None = None,
        labels: dict[str, str] | None = None,
        obs: str | os.PathLike[str] | None = None,
    ) -> str:
        """Freeze branch ``name`` into snapshot ``id`` (None: generated); the new id. ``obs``:
        a file (readable by this process) stored beside the snapshot as its observation."""
        words = ["commit", name] + ([_checked(check_snapshot_id, id)] if id is not None else [])
        words += _label_words(labels)
        if obs is not None:
            words.append(f"obs=@{os.path.abspath(obs)}")
        return self.command(*words)

    def label(self, id: str, labels: dict[str, str]) -> None:
        """Set labels of snapshot ``id``; a key with the value "" is removed. Durable when it
        returns. The most frequent call of a tree search (back-propagation), so its ``ok``
        reply, which would only repeat ``id``, is not read."""
        words = ("label", _checked(check_snapshot_id, id), *_label_words(labels))
        self._command(words, read_reply=False)

    def reset(self, name: str, id: str) -> None:
        """Drop branch ``name``'s changes and re-base it on snapshot ``id``."""
        self.command("reset", name, id)

    def discard(self, name: str) -> None:
        self.command("discard", name)

    def prune(self, id: str) -> None:
        self.command("prune", id)

    def rebase(self, name: str, parent: str | None) -> None:
        """Re-base an unmodified branch on ``parent`` (None: the empty snapshot)."""
        self.command("rebase", name, *([parent] if parent is not None else []))

    def import_tree(
        self, src: str | os.PathLike[str], id: str, labels: dict[str, str] | None = None
    ) -> str:
        """Import directory ``src`` (read by the daemon) as snapshot ``id``."""
        words = ["import", _checked(check_snapshot_id, id), os.path.abspath(src)]
        words += _label_words(labels)
        return self.command(*words)

    def push(self, remote: str, ids: list[str], *, with_ancestors: bool = False) -> list[str]:
        """Send snapshots ``ids`` to ``remote`` (a configured name or a URL); the ids sent
        (those already there are left out)."""
        return self._transfer("push", remote, ids, with_ancestors)

    def pull(self, remote: str, ids: list[str], *, with_ancestors: bool = False) -> list[str]:
        """Fetch snapshots ``ids`` from ``remote``; the ids fetched (those this store has
        already are left out). They appear under ``MNT/snapshots/``."""
        return self._transfer("pull", remote, ids, with_ancestors)

    def _transfer(self, verb: str, remote: str, ids: list[str], with_ancestors: bool) -> list[str]:
        words = [verb, remote] + (["--with-ancestors"] if with_ancestors else []) + list(ids)
        return self.command(*words).split()

    def gc(self) -> dict[str, int]:
        text = self.command("gc")
        out: dict[str, int] = {}
        for word in text.split():
            key, _, val = word.partition("=")
            out[key] = int(val) if val.lstrip("-").isdigit() else val  # type: ignore[assignment]
        return out

    # -- queries -------------------------------------------------------------------------------
    def find(
        self,
        *predicates: str,
        sort: str | None = None,
        limit: int | None = None,
        parent: str | None = None,
        ancestor: str | None = None,
    ) -> list[str]:
        """Snapshot ids whose labels satisfy every predicate (``reward>0.5``, ``action=fix``,
        ``has:obs``), among ``parent``'s children or ``ancestor``'s descendants if given,
        ordered by label ``sort`` (``-key``: descending), at most ``limit`` of them."""
        words = ["find", *predicates]
        for option, value in (
            ("--sort", sort),
            ("--limit", limit),
            ("--parent", parent),
            ("--ancestor", ancestor),
        ):
            if value is not None:
                words += [option, str(value)]
        return self.command(*words).split()

    def children(self, id: str | None) -> list[str]:
        """The snapshots whose parent is ``id`` (None: those without a parent), sorted."""
        return self.command("children", *([id] if id is not None else [])).split()

    def episodes(self) -> list[dict]:
        """Every snapshot as a record of ``MNT/episodes`` (id, parent, created, labels, ...)."""
        # split at newlines only: str.splitlines() also splits at U+2028 and others, which a
        # label value may hold and JSON leaves unescaped
        lines = self._read(self.mnt / "episodes").split("\n")
        return [json.loads(line) for line in lines if line]

    def observation_path(self, id: str) -> Path:
        """Where snapshot ``id``'s large observation reads (ENOENT there: it has none)."""
        return self.mnt / "observations" / _checked(check_snapshot_id, id)

    def show(self, id: str) -> dict:
        """Snapshot ``id``'s record, labels, root digest, observation size and children."""
        info = self.snapshot(id)
        out = {
            "id": info.id,
            "parent": info.parent,
            "created_ns": info.created_ns,
            "files": info.files,
            "size": info.size,
            "root": info.root,
            "obs": info.obs,
            "labels": info.labels,
            "children": self.children(id),
        }
        if info.error:
            out["error"] = info.error
        return out

    def snapshots(self) -> list[str]:
        return sorted(self._listdir(self.mnt / "snapshots"))

    def branches(self) -> list[str]:
        return sorted(self._listdir(self.mnt / "branches"))

    def snapshot_path(self, id: str) -> Path:
        """Where snapshot ``id`` reads; InvalidArgumentError (EINVAL) for what is no id, so
        that no name reaches past ``MNT/snapshots/`` (``..``, ``a/b``)."""
        return self.mnt / "snapshots" / _checked(check_snapshot_id, id)

    def branch_path(self, name: str) -> Path:
        """Branch ``name``'s directory, ``MNT/branches/<name>``; EINVAL for what is no name."""
        return self.mnt / "branches" / _checked(check_branch_name, name)

    def snapshot(self, id: str) -> SnapshotInfo:
        """Metadata of a snapshot, from the ``user.cascowfs.*`` xattrs of its root."""
        path = self.snapshot_path(id)
        attrs = self._xattrs(path, f"snapshot {id!r}")
        labels = {k[len("label.") :]: v for k, v in attrs.items() if k.startswith("label.")}
        return SnapshotInfo(
            id=id,
            root=attrs.get("root", ""),
            parent=attrs.get("parent") or None,
            created_ns=int(attrs.get("created_ns", "0")),
            size=int(attrs.get("size", "0")),
            files=int(attrs.get("files", "0")),
            labels=labels,
            error=attrs.get("error"),
            obs=int(attrs["obs"]) if "obs" in attrs else None,
        )

    def tree(self, name: str) -> Path:
        """The branch's writable tree (the resolved overlay mount: work there, not via MNT)."""
        link = self.branch_path(name) / "tree"
        try:
            return Path(os.readlink(link))
        except OSError as exc:
            raise self.error_of(exc, f"readlink {link}") from None

    def parent(self, name: str) -> str | None:
        return self._read(self.branch_path(name) / "parent").strip() or None

    def last_commit(self, name: str) -> str | None:
        return self._read(self.branch_path(name) / "commit").strip() or None

    def branch_info(self, name: str) -> BranchInfo:
        created = self._created_ns(name)
        return BranchInfo(name, self.parent(name), self.tree(name), created, self.last_commit(name))

    def _created_ns(self, name: str) -> int:
        """When branch ``name`` was made (its directory's mtime): a branch discarded and made
        again under its name is another one."""
        directory = self.branch_path(name)
        try:
            return os.stat(directory).st_mtime_ns
        except OSError as exc:
            raise self.error_of(exc, f"stat {directory}") from None

    def status(self, name: str) -> list[Change]:
        """The branch's changes, read from ``status.z`` (NUL-terminated, so every name that a
        file can have comes back exactly: ``Change.path`` is str with ``surrogateescape``)."""
        path = self.branch_path(name) / "status.z"
        try:
            with open(path, "rb", buffering=0) as fh:
                data = fh.read()
        except OSError as exc:
            raise self.error_of(exc, f"read {path}") from None
        return [Change.from_record_z(record) for record in data.split(b"\0")[:-1]]

    def diff(self, a: str | None, b: str | None) -> list[Change]:
        """Changes from snapshot ``a`` to ``b`` (None: the empty snapshot), by walking both trees.

        Directories whose ``user.cascowfs.tree`` ids match are skipped; files are equal exactly
        when their inode numbers are (the daemon derives them from content and metadata).
        """
        left = self.snapshot_path(a) if a is not None else None
        right = self.snapshot_path(b) if b is not None else None
        for id, root in ((a, left), (b, right)):
            if root is not None:
                try:
                    os.lstat(root)
                except OSError as exc:
                    raise self.error_of(exc, f"diff: snapshot {id!r}") from None
        changes: list[Change] = []
        try:
            _diff_dirs(left, right, "", changes)
        except OSError as exc:
            raise self.error_of(exc, "diff") from None
        changes.sort()
        return changes

    # -- helpers -------------------------------------------------------------------------------
    def _listdir(self, path: Path) -> list[str]:
        try:
            return os.listdir(path)
        except OSError as exc:
            raise self.error_of(exc, f"list {path}") from None

    def _read(self, path: Path) -> str:
        try:
            with open(path, "rb", buffering=0) as fh:
                return fh.read().decode("utf-8", "surrogateescape")
        except OSError as exc:
            raise self.error_of(exc, f"read {path}") from None

    def _xattrs(self, path: Path, what: str) -> dict[str, str]:
        """The ``user.cascowfs.*`` xattrs of a snapshot root, without the prefix."""
        try:
            try:
                names = [n for n in os.listxattr(path) if n.startswith(_XATTR)]
            except OSError as exc:
                if exc.errno != errno.E2BIG:
                    raise
                # The root's own xattrs crowd the list: the recorded names are still readable
                # one by one, the labels are not.
                return _recorded_without_labels(path)
            return {
                n[len(_XATTR) :]: os.getxattr(path, n).decode("utf-8", "replace") for n in names
            }
        except OSError as exc:
            raise self.error_of(exc, what) from None


def _checked(check: Callable[[object], str], value: object) -> str:
    """``value`` as ``check`` takes it; its refusal as the client's EINVAL, an OSError."""
    try:
        return check(value)
    except InvalidArgumentError as exc:
        raise os_error_from_errno(exc.errno, exc.message) from None


def _label_words(labels: dict[str, str] | None) -> list[str]:
    """``key=value`` words of ``labels``, every key checked here: the daemon splits a word at
    its first ``=``, so a key holding one would set another label, and ``obs`` (reserved)
    would name a file for the daemon to store as the observation."""
    return [f"{_checked(check_label_key, k)}={v}" for k, v in (labels or {}).items()]


class Branch:
    """A live branch of a ``Client``: its name and writable ``tree``, its ``parent``, ``status``
    and ``last_commit`` read afresh from the branch files, and the calls that act on it.

    As a context manager it is scoped work: leaving the block discards the branch unless it
    was committed (through this object or any other way), exception or not. A committed branch
    is kept, continuing on its last commit as every branch does; one already discarded is left
    alone, and so is another branch made under its name since.
    """

    def __init__(
        self, client: Client, name: str, tree: Path, created_ns: int | None = None
    ) -> None:
        self.client = client
        self.name = name
        self.tree = tree
        self.created_ns = created_ns  # when made: ``__exit__`` leaves a namesake alone

    def __repr__(self) -> str:
        return f"Branch({self.name!r}, tree={str(self.tree)!r})"

    def __enter__(self) -> Branch:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            made = self.client._created_ns(self.name)
            if self.created_ns is not None and made != self.created_ns:
                return  # discarded inside the block, and another branch took its name
            committed = self.last_commit is not None
        except NotFoundError:  # discarded inside the block
            return
        if not committed:
            self.discard()

    @property
    def parent(self) -> str | None:
        return self.client.parent(self.name)

    @property
    def status(self) -> list[Change]:
        return self.client.status(self.name)

    @property
    def last_commit(self) -> str | None:
        return self.client.last_commit(self.name)

    def commit(self, id: str | None = None, labels: dict[str, str] | None = None) -> str:
        """Freeze the branch into snapshot ``id`` (None: generated); the new id."""
        return self.client.commit(self.name, id, labels)

    def discard(self) -> None:
        self.client.discard(self.name)

    def rebase(self, parent: str | None) -> None:
        self.client.rebase(self.name, parent)


# What the mount records on a snapshot root besides labels (fuse/snapshot_view.root_xattrs).
_RECORDED = ("parent", "root", "created_ns", "size", "files", "obs", "error")


def _recorded_without_labels(path: Path) -> dict[str, str]:
    out = {"error": f"the xattr list of {path} exceeds the kernel's limit; labels not shown"}
    for name in _RECORDED:
        try:
            out[name] = os.getxattr(path, _XATTR + name).decode("utf-8", "replace")
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return out


def _read_reply(fd: int) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace")


def _tree_id(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, _XATTR + "tree")
    except OSError:
        return None


def _entries(path: Path | None) -> dict[str, os.stat_result]:
    if path is None:
        return {}
    return {e.name: e.stat(follow_symlinks=False) for e in os.scandir(path)}


def _walk(path: Path, prefix: str) -> Iterator[str]:
    """Every path below directory ``path``, each directory's entries in name order, each
    subdirectory's right after its name (from a stack, not a recursion: a tree may be deeper
    than Python's recursion limit)."""
    stack = [(iter(_sorted_entries(path)), prefix)]
    while stack:
        entries, top_prefix = stack[-1]
        for entry in entries:
            sub = f"{top_prefix}/{entry.name}" if top_prefix else entry.name
            yield sub
            if entry.is_dir(follow_symlinks=False):
                stack.append((iter(_sorted_entries(Path(entry.path))), sub))
                break
        else:
            stack.pop()


def _sorted_entries(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _report(path: Path, rel: str, is_dir: bool, kind: str, changes: list[Change]) -> None:
    changes.append(Change(rel, kind))
    if is_dir:
        changes.extend(Change(p, kind) for p in _walk(path, rel))


def _dir_meta(path: Path, st: os.stat_result) -> tuple:
    xattrs = sorted(
        (n, os.getxattr(path, n, follow_symlinks=False))
        for n in os.listxattr(path, follow_symlinks=False)
    )
    return (st.st_mode, st.st_uid, st.st_gid, xattrs)


def _same_file(pa: Path | None, sa: os.stat_result, pb: Path | None, sb: os.stat_result) -> bool:
    """Equal content and metadata. Served by the daemon, files are equal exactly when their
    inode numbers are; two kernel views (two overlay mounts) have numbers of their own, so
    there the attributes, xattrs and bytes are compared."""
    if sa.st_dev == sb.st_dev:
        return sa.st_ino == sb.st_ino
    assert pa is not None and pb is not None
    shown = ("st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_rdev")
    if any(getattr(sa, key) != getattr(sb, key) for key in shown):
        return False
    if _dir_meta(pa, sa) != _dir_meta(pb, sb):  # the xattrs
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(pa) == os.readlink(pb)
    if not stat.S_ISREG(sa.st_mode):
        return True
    from . import extents  # the engine's modules, only when a diff compares bytes

    with open(pa, "rb", buffering=0) as fa, open(pb, "rb", buffering=0) as fb:
        return extents.same_content(fa.fileno(), fb.fileno(), sa.st_size)


def _diff_dirs(a: Path | None, b: Path | None, prefix: str, changes: list[Change]) -> None:
    # directory pairs to compare, on a stack, not a recursion: a tree may be deeper than
    # Python's recursion limit (the order changes are found in does not matter: sorted)
    pairs = [(a, b, prefix)]
    while pairs:
        _diff_dir_pair(*pairs.pop(), changes, pairs)


def _diff_dir_pair(
    a: Path | None,
    b: Path | None,
    prefix: str,
    changes: list[Change],
    pairs: list[tuple[Path | None, Path | None, str]],
) -> None:
    """The changes within directories ``a`` and ``b``; pairs of subdirectories to compare go
    on ``pairs``."""
    if a is not None and b is not None:
        ta, tb = _tree_id(a), _tree_id(b)
        if ta is not None and ta == tb:
            return
    left, right = _entries(a), _entries(b)
    for name in sorted(left.keys() | right.keys()):
        rel = f"{prefix}/{name}" if prefix else name
        sa, sb = left.get(name), right.get(name)
        pa = a / name if a is not None else None
        pb = b / name if b is not None else None
        if sa is None:
            assert pb is not None and sb is not None
            _report(pb, rel, stat.S_ISDIR(sb.st_mode), "A", changes)
        elif sb is None:
            assert pa is not None
            _report(pa, rel, stat.S_ISDIR(sa.st_mode), "D", changes)
        elif stat.S_ISDIR(sa.st_mode) and stat.S_ISDIR(sb.st_mode):
            assert pa is not None and pb is not None
            if _dir_meta(pa, sa) != _dir_meta(pb, sb):
                changes.append(Change(rel, "M"))
            pairs.append((pa, pb, rel))
        elif stat.S_ISDIR(sa.st_mode) != stat.S_ISDIR(sb.st_mode):
            assert pa is not None and pb is not None
            _report(pa, rel, stat.S_ISDIR(sa.st_mode), "D", changes)
            _report(pb, rel, stat.S_ISDIR(sb.st_mode), "A", changes)
        elif not _same_file(pa, sa, pb, sb):
            changes.append(Change(rel, "M"))
