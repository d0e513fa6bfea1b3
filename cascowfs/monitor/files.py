"""What the monitor reads from a mount, and the one command it sends: plain file calls only.

The monitor is an agent like any other: it lists ``MNT/branches/``, reads each branch's
``parent``, reads the generated files ``MNT/episodes``, ``MNT/events`` and ``MNT/metrics``, and
writes ``reset <branch> <id>`` to ``MNT/ctl``. Every file is opened, read whole and closed at
once: a file the monitor kept open would make ``cascowfs umount`` fail with EBUSY.

Everything read here was written by agents (ids, branch names, label keys and values) or
generated from what they wrote, so it is parsed strictly: a line that does not have the agreed
shape is skipped and counted, never passed on half-checked.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from ..client import Client
from ..errors import CascowfsError, InvalidArgumentError, PermissionDeniedError
from ..names import check_branch_name, check_labels, check_snapshot_id
from ..privacy import Caller

T = TypeVar("T")

# A daemon without the file answers ENOENT; these mean the mount itself is gone.
DAEMON_GONE = (errno.ENOTCONN, errno.ECONNABORTED)


@dataclass(frozen=True, slots=True)
class Node:
    """One snapshot as the page shows it."""

    id: str
    parent: str | None
    created_ns: int
    files: int
    size: int
    labels: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "parent": self.parent,
            "created_ns": self.created_ns,
            "files": self.files,
            "size": self.size,
            "labels": self.labels,
        }


@dataclass(frozen=True, slots=True)
class BranchView:
    name: str
    parent: str | None  # the snapshot the branch sits on; None: the empty snapshot


@dataclass(frozen=True, slots=True)
class Event:
    """One line of ``MNT/events``."""

    time_ns: int
    op: str
    names: tuple[str, ...]
    result: str
    latency_ms: float
    id: str | None
    # A caller outside root and the admin group: its uid, and how many such callers' events
    # the daemon had dropped when this one came (its ring of them is short). None: root's or
    # the admin group's.
    uid: int | None = None
    dropped: int = 0

    def as_json(self) -> dict:
        return {
            "time_ns": self.time_ns,
            "op": self.op,
            "names": list(self.names),
            "result": self.result,
            "latency_ms": self.latency_ms,
            "id": self.id,
            "uid": self.uid,
            "dropped": self.dropped,
        }


@dataclass(frozen=True, slots=True)
class Parsed(Generic[T]):
    """Records read from a JSON Lines file, and how many lines did not have the agreed shape."""

    records: list[T]
    rejected: int


class FileMissing(CascowfsError):
    """The daemon serves no such file (an older cascowfs): the part of the page it feeds says
    so instead of showing anything made up."""

    errno = errno.ENOENT


class MountFiles:
    """The monitor's reads and its one write, on the mount point ``mnt``."""

    def __init__(self, mnt: str | os.PathLike[str]) -> None:
        self.mnt = Path(mnt).absolute()
        self.client = Client(self.mnt)  # used for reads: it opens ctl only to send a command

    # -- generated files ---------------------------------------------------------------------
    def read_generated(self, name: str) -> bytes:
        """The whole content of ``MNT/<name>``, read on one open file (the daemon generates
        it at open). FileMissing if this daemon does not serve it."""
        path = self.mnt / name
        try:
            with open(path, "rb", buffering=0) as fh:
                chunks = []
                while chunk := fh.read(1 << 20):
                    chunks.append(chunk)
        except FileNotFoundError:
            raise FileMissing(f"{path} is not served by this daemon") from None
        except OSError as exc:
            raise CascowfsError(f"read {path}: {exc.strerror or exc}", errno=exc.errno) from None
        return b"".join(chunks)

    def episodes(self) -> Parsed[Node]:
        return parse_episodes(self.read_generated("episodes"))

    def events(self) -> Parsed[Event]:
        return parse_events(self.read_generated("events"))

    def metrics(self) -> bytes:
        return self.read_generated("metrics")

    # -- what every daemon serves ------------------------------------------------------------
    def snapshot_ids(self) -> list[str]:
        return [i for i in self.client.snapshots() if _valid_name(i, check_snapshot_id)]

    def snapshot(self, ident: str) -> Node:
        """One snapshot from the xattrs of its root (when the daemon serves no episodes)."""
        info = self.client.snapshot(ident)
        return Node(info.id, info.parent, info.created_ns, info.files, info.size, info.labels)

    def branches(self) -> list[BranchView]:
        out = []
        for name in self.client.branches():
            if not _valid_name(name, check_branch_name):
                continue
            try:
                parent = self.client.parent(name)
            except CascowfsError as exc:
                if exc.errno == errno.ENOENT:  # discarded between the listing and the read
                    continue
                raise
            if parent is not None and not _valid_name(parent, check_snapshot_id):
                continue
            out.append(BranchView(name, parent))
        return out

    def reset(self, branch: str, ident: str, caller: Caller) -> str:
        """``reset <branch> <id>`` through ``ctl`` on behalf of ``caller``, on a client opened
        for this one command (no ``ctl`` file stays open while the monitor idles); the
        daemon's ``ok`` result.

        The monitor writes ``ctl`` as itself (root), so it first applies the daemon's own rule
        to ``caller``: root, or a member of the admin group, which the daemon shows as the
        group of ``ctl`` (0 when it has none). Switching to ``caller`` to open ``ctl`` would
        leave the decision to the daemon, but would need the capabilities to change user that
        the monitor's unit drops."""
        check_branch_name(branch)
        check_snapshot_id(ident)
        if not caller.may_change_state(self.admin_gid()):
            raise PermissionDeniedError(
                f"reset {branch} {ident}: uid {caller.uid} is neither root nor in the mount's "
                "admin group, which alone may change state",
                errno=errno.EPERM,
            )
        with Client(self.mnt) as client:
            return client.command("reset", branch, ident)

    def admin_gid(self) -> int | None:
        """The mount's admin group, as the group of its ``ctl`` (None for group 0: only root)."""
        ctl = self.mnt / "ctl"
        try:
            gid = os.stat(ctl).st_gid
        except OSError as exc:  # a daemon gone, or no mount at all: as a command would find
            raise self.client.error_of(exc, f"stat {ctl}") from None
        return gid or None


def _valid_name(value: object, check) -> bool:
    try:
        check(value)
    except InvalidArgumentError:
        return False
    return True


def _json_lines(data: bytes) -> list[object | None]:
    """Each line decoded as JSON (None where it is not JSON at all)."""
    out: list[object | None] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append(None)
    return out


def _int(value: object, top: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    if top is not None and value > top:
        raise ValueError(f"over {top}: {value!r}")
    return value


UID_MAX = 2**32 - 2  # (uid_t)-1 is no one's
DROPPED_MAX = 2**53 - 1  # read by the page as a JavaScript number


def _parse_lines(data: bytes, parse_one: Callable[[dict], T]) -> Parsed[T]:
    """Each line of a JSON Lines file through ``parse_one``, which raises ValueError or
    InvalidArgumentError on an object without the agreed shape."""
    records: list[T] = []
    rejected = 0
    for obj in _json_lines(data):
        try:
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            records.append(parse_one(obj))
        except (ValueError, InvalidArgumentError):
            rejected += 1
    return Parsed(records, rejected)


def _episode(obj: dict) -> Node:
    parent = obj.get("parent")
    labels = obj.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError("labels not an object")
    return Node(
        id=check_snapshot_id(obj.get("id")),
        parent=None if parent is None else check_snapshot_id(parent),
        created_ns=_int(obj.get("created_ns", 0)),
        files=_int(obj.get("files", 0)),
        size=_int(obj.get("size", 0)),
        labels=check_labels(labels),
    )


def _event(obj: dict) -> Event:
    op, result, names = obj.get("op"), obj.get("result"), obj.get("names") or []
    latency, ident = obj.get("latency_ms"), obj.get("id")
    if not isinstance(op, str) or not isinstance(result, str):
        raise ValueError("bad op or result")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("bad names")
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        raise ValueError("bad latency")
    if not math.isfinite(latency) or latency < 0:
        raise ValueError("bad latency")
    # An outsider's line (a caller outside root and the admin group) names its uid, and says
    # how many outsiders' events the daemon dropped so far; without a uid, no such count.
    uid, dropped = obj.get("uid"), obj.get("dropped")
    if uid is not None:
        uid, dropped = _int(uid, UID_MAX), _int(0 if dropped is None else dropped, DROPPED_MAX)
    elif dropped is not None:
        raise ValueError("dropped without uid")
    # A failed command's words are whatever its caller wrote: shown as text only, cut for the
    # table, and an id that is not a valid one (the refused `commit b ../x`) is left out.
    return Event(
        time_ns=_int(obj.get("time_ns")),
        op=op[:32],
        names=tuple(n[:256] for n in names[:8]),
        result=result[:32],
        latency_ms=float(latency),
        id=ident if _valid_name(ident, check_snapshot_id) else None,
        uid=uid,
        dropped=dropped or 0,
    )


def parse_episodes(data: bytes) -> Parsed[Node]:
    """``MNT/episodes``: one object per snapshot with ``id``, ``parent``, ``created_ns``,
    ``files``, ``size`` and ``labels`` (other keys are not used)."""
    return _parse_lines(data, _episode)


def parse_events(data: bytes) -> Parsed[Event]:
    """``MNT/events``: one object per operation, oldest first, with ``time_ns``, ``op``,
    ``names``, ``result`` (``ok`` or an errno name), ``latency_ms`` and ``id``, and for a
    caller outside root and the admin group ``uid`` and ``dropped``."""
    return _parse_lines(data, _event)
