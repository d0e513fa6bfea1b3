"""``cascowfs.Client(MNT)``: docs/interface.md's file contract as Python calls, for agent loops.

Nothing here talks to the daemon other than through plain file calls on the mount (open, write,
read, mkdir, readlink, getxattr), so the client behaves exactly like a shell script would, and a
failed call raises the same ``CascowfsError`` subclass the engine raised (``error_from_errno``):
``ExistsError``, ``NotFoundError``, ``InvalidArgumentError``, ``BusyError``, ...

Commands go through one ``ctl`` file descriptor kept open per client, so that each command's
reply line (``ok <result>`` / ``error <ERRNO> <message>``) is read back from the same open file;
a lock makes a client safe to share between threads.
"""

from __future__ import annotations

import errno
import filecmp
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import CascowfsError, error_from_errno
from .model import BranchInfo, Change, SnapshotInfo
from .wire import command_line, parse_reply

_XATTR = "user.cascowfs."
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


class Client:
    """Drive a mounted cascowfs through its files."""

    def __init__(self, mnt: str | os.PathLike[str]) -> None:
        self.mnt = Path(mnt).absolute()
        self._fd: int | None = None
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._reset_fd()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            self.close()
        except Exception:
            pass

    @property
    def ctl(self) -> Path:
        return self.mnt / "ctl"

    def _ctl_fd(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.ctl, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise _wrap(exc, f"open {self.ctl}") from None
        return self._fd

    def _read_reply(self, fd: int) -> str:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
        return buf.decode("utf-8", "replace")

    def command(self, *words: str) -> str:
        """Send one ctl command (words are shell-quoted) and return the result of its reply."""
        line = (command_line(words) + "\n").encode()
        with self._lock:
            for attempt in (1, 2):
                fd = self._ctl_fd()
                try:
                    os.write(fd, line)
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOTCONN and attempt == 1:
                        # Our open file belongs to a daemon that is gone (restarted since).
                        # ENOTCONN means the request never reached any daemon, so sending it
                        # again on a fresh open is safe. (ECONNABORTED: the daemon died while
                        # handling it; the outcome is unknown, so that one is raised.)
                        self._reset_fd()
                        continue
                    reply = self._read_reply(fd) if exc.errno not in _DEAD else ""
                    if exc.errno in _DEAD:
                        self._reset_fd()
                    ok, code, text = parse_reply(reply) if reply else (False, exc.errno, "")
                    raise error_from_errno(
                        exc.errno or code or errno.EIO, text or exc.strerror or str(exc)
                    ) from None
            reply = self._read_reply(fd)
        ok, code, text = parse_reply(reply)
        if not ok:
            raise error_from_errno(code, text)
        return text

    def _reset_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    # -- state changes -------------------------------------------------------------------------
    def branch(self, name: str, parent: str | None = None) -> Path:
        """Create branch ``name`` on snapshot ``parent`` (None: the empty snapshot); its tree."""
        if parent is None:
            path = self.mnt / "branches" / name
            try:
                os.mkdir(path)
            except OSError as exc:
                raise _wrap(exc, f"mkdir {path}") from None
            return self.tree(name)
        return Path(self.command("branch", name, parent))

    def commit(self, name: str, id: str | None = None, labels: dict[str, str] | None = None) -> str:
        """Freeze branch ``name`` into snapshot ``id`` (None: generated); the new id."""
        words = ["commit", name] + ([id] if id is not None else [])
        words += [f"{k}={v}" for k, v in (labels or {}).items()]
        return self.command(*words)

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
        words = ["import", id, os.path.abspath(src)]
        words += [f"{k}={v}" for k, v in (labels or {}).items()]
        return self.command(*words)

    def gc(self) -> dict[str, int]:
        text = self.command("gc")
        out: dict[str, int] = {}
        for word in text.split():
            key, _, val = word.partition("=")
            out[key] = int(val) if val.lstrip("-").isdigit() else val  # type: ignore[assignment]
        return out

    # -- queries -------------------------------------------------------------------------------
    def snapshots(self) -> list[str]:
        return sorted(self._listdir(self.mnt / "snapshots"))

    def branches(self) -> list[str]:
        return sorted(self._listdir(self.mnt / "branches"))

    def snapshot_path(self, id: str) -> Path:
        return self.mnt / "snapshots" / id

    def snapshot(self, id: str) -> SnapshotInfo:
        """Metadata of a snapshot, from the ``user.cascowfs.*`` xattrs of its root."""
        path = self.snapshot_path(id)
        attrs = self._xattrs(path)
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
        )

    def tree(self, name: str) -> Path:
        """The branch's writable tree (the resolved overlay mount: work there, not via MNT)."""
        link = self.mnt / "branches" / name / "tree"
        try:
            return Path(os.readlink(link))
        except OSError as exc:
            raise _wrap(exc, f"readlink {link}") from None

    def parent(self, name: str) -> str | None:
        return self._read(self.mnt / "branches" / name / "parent").strip() or None

    def last_commit(self, name: str) -> str | None:
        return self._read(self.mnt / "branches" / name / "commit").strip() or None

    def branch_info(self, name: str) -> BranchInfo:
        directory = self.mnt / "branches" / name
        try:
            created = os.stat(directory).st_mtime_ns
        except OSError as exc:
            raise _wrap(exc, f"stat {directory}") from None
        return BranchInfo(name, self.parent(name), self.tree(name), created, self.last_commit(name))

    def status(self, name: str) -> list[Change]:
        """The branch's changes, read from ``status.z`` (NUL-terminated, so every name that a
        file can have comes back exactly: ``Change.path`` is str with ``surrogateescape``)."""
        path = self.mnt / "branches" / name / "status.z"
        try:
            with open(path, "rb", buffering=0) as fh:
                data = fh.read()
        except OSError as exc:
            raise _wrap(exc, f"read {path}") from None
        return [Change.from_record_z(record) for record in data.split(b"\0")[:-1]]

    def diff(self, a: str | None, b: str | None) -> list[Change]:
        """Changes from snapshot ``a`` to ``b`` (None: the empty snapshot), by walking both trees.

        Directories whose ``user.cascowfs.tree`` ids match are skipped; files are equal exactly
        when their inode numbers are (the daemon derives them from content and metadata).
        """
        left = self.snapshot_path(a) if a is not None else None
        right = self.snapshot_path(b) if b is not None else None
        changes: list[Change] = []
        try:
            _diff_dirs(left, right, "", changes)
        except OSError as exc:
            raise _wrap(exc, "diff") from None
        changes.sort()
        return changes

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _listdir(path: Path) -> list[str]:
        try:
            return os.listdir(path)
        except OSError as exc:
            raise _wrap(exc, f"list {path}") from None

    @staticmethod
    def _read(path: Path) -> str:
        try:
            with open(path, "rb", buffering=0) as fh:
                return fh.read().decode("utf-8", "surrogateescape")
        except OSError as exc:
            raise _wrap(exc, f"read {path}") from None

    @staticmethod
    def _xattrs(path: Path) -> dict[str, str]:
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
            raise _wrap(exc, f"xattrs of {path}") from None


# What the mount records on a snapshot root besides labels (fuse/snapshot_view.root_xattrs).
_RECORDED = ("parent", "root", "created_ns", "size", "files", "error")


def _recorded_without_labels(path: Path) -> dict[str, str]:
    out = {"error": f"the xattr list of {path} exceeds the kernel's limit; labels not shown"}
    for name in _RECORDED:
        try:
            out[name] = os.getxattr(path, _XATTR + name).decode("utf-8", "replace")
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return out


def _wrap(exc: OSError, what: str) -> CascowfsError:
    code = exc.errno or errno.EIO
    return error_from_errno(code, f"{what}: {exc.strerror or exc}")


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
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        sub = f"{prefix}/{entry.name}" if prefix else entry.name
        yield sub
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), sub)


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
    return not stat.S_ISREG(sa.st_mode) or filecmp.cmp(pa, pb, shallow=False)


def _diff_dirs(a: Path | None, b: Path | None, prefix: str, changes: list[Change]) -> None:
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
            _diff_dirs(pa, pb, rel, changes)
        elif stat.S_ISDIR(sa.st_mode) != stat.S_ISDIR(sb.st_mode):
            assert pa is not None and pb is not None
            _report(pa, rel, stat.S_ISDIR(sa.st_mode), "D", changes)
            _report(pb, rel, stat.S_ISDIR(sb.st_mode), "A", changes)
        elif not _same_file(pa, sa, pb, sb):
            changes.append(Change(rel, "M"))
