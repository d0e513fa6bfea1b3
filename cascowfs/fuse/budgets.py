"""What one user can make the daemon hold, and the threads its reads may take.

Every open file here is memory in the daemon, and any local user may open the mount's files
as often as its fd limits allow (tens of thousands per process, as many processes as it
likes): an open of ``episodes`` keeps the content it opened, an open directory keeps its
listing, an open ``ctl`` keeps the replies nobody read yet. Unbounded, one user outside the
admin group gets the daemon OOM-killed and the mount dies for every agent.

So the bytes kept for open files are charged to the uid that opened them, and each uid has a
budget (``UID_BUDGET_BYTES``). An open that would take its uid past the budget is refused with
ENOMEM, unless the uid holds nothing else: one file is always readable, however large. A
content several open files share (``SharedContent``: one generated ``episodes`` per state) is
charged once to each uid that holds it, whatever the number of its opens. Root is charged as
anyone, so a user's exhausted budget never stops root's monitor; what root holds, root could
end anyway.

Reads by callers outside the admin group (``find``, ``children``, generating ``episodes``,
listing large directories, walking a snapshot to count its hard links) run in threads of
their own (``ReaderThreads``): at most ``READER_THREADS`` at once and one per uid, not in
trio's shared pool of 40 that commits and branch operations wait for. Threads alone do not
bound the CPU: every thread of the daemon shares one GIL, and a user looping ``find`` in its
thread takes the GIL from the trio thread that serves every agent. So a uid's next read
waits until its last one's CPU time is at most ``READER_CPU_SHARE`` of the time since that
read started.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ..errors import CascowfsError
from ..model import Entry

log = logging.getLogger("cascowfs.fuse")

T = TypeVar("T")

UID_BUDGET_BYTES = 256 << 20  # vs 5.5 GB held by one user's 60 opens of a 97 MB episodes
ENV_BUDGET = "CASCOWFS_UID_BUDGET_BYTES"  # the daemon's environment may lower or raise it
HANDLE_BYTES = 1024  # what any open file costs the daemon, charged with what it keeps
# What an open directory's listing keeps, charged as it is held (``listed_entries_bytes``;
# CPython 3.11 on 64 bits). At a flat 96 bytes a name, a decoded entry of a snapshot
# directory (its Entry, its ints, its ref, the (name, Entry) pair and its slot) held 4-5
# times as much, its xattrs more, and one uid held about 1 GB under its budget of 256 MiB.
LISTED_ENTRY_BYTES = 576  # an entry's fixed part, a directory's totals included
LISTED_XATTRS_BYTES = 48  # an entry's tuple of xattrs, if it has any
LISTED_XATTR_BYTES = 128  # each xattr's pair and its two bytes objects, with their lengths
LISTED_BRANCH_BYTES = 1024  # a BranchInfo, its tree's Path and its names' strings
LISTED_NODE_BYTES = 128  # a (name, node) pair of a node that exists anyway, with its slot
LISTED_CHARGES_KEPT = 4096  # trees whose listing's charge is kept (``ListedCharges``), ~0.5 MB
LISTED_COUNTED_INLINE = 4096  # entries a listing's charge is counted for on the trio thread
READER_THREADS = 2  # of non-admin reads at once; one uid gets one
READER_CPU_SHARE = 0.1  # of a core, one uid's reads at most: 10k-snapshot finds 100 a second
WARN_EVERY = 60.0  # seconds between two log lines about one uid's refusals


class OverBudgetError(CascowfsError):
    errno = errno.ENOMEM


def listed_entries_bytes(entries: Collection[Entry]) -> int:
    """What an open directory keeps of the decoded ``entries`` of its listing: once the
    tree cache dropped them (a large tree is dropped as soon as another is decoded), its
    handle is their only owner."""
    held = LISTED_ENTRY_BYTES * len(entries)
    for e in entries:
        held += len(e.name) + len(e.ref) + len(e.link)
        if e.xattrs:
            held += LISTED_XATTRS_BYTES
            for key, value in e.xattrs:
                held += LISTED_XATTR_BYTES + len(key) + len(value)
    return held


class ListedCharges:
    """``listed_entries_bytes`` of the snapshot directories listed last, by tree id (a tree
    never changes): counted at each listing, on the trio thread, a directory of a million
    entries cost every agent's requests some 0.15 s more per ``ls``, any user's (twice what
    copying its listing costs)."""

    def __init__(self, limit: int = LISTED_CHARGES_KEPT) -> None:
        self.limit = limit
        self._by_tree: OrderedDict[bytes, int] = OrderedDict()

    def get(self, tree_id: bytes) -> int | None:
        held = self._by_tree.get(tree_id)
        if held is not None:
            self._by_tree.move_to_end(tree_id)
        return held

    def keep(self, tree_id: bytes, held: int) -> None:
        self._by_tree[tree_id] = held
        if len(self._by_tree) > self.limit:
            self._by_tree.popitem(last=False)


def budget_from_environment() -> int:
    value = os.environ.get(ENV_BUDGET, "")
    return int(value) if value.isdigit() else UID_BUDGET_BYTES


@dataclass(eq=False)
class Generated:
    """A content generated once and kept while open files hold it."""

    version: int
    content: bytes
    holders: Counter[int] = field(default_factory=Counter)  # uid -> open files holding it


@dataclass(eq=False)
class Charge:
    """What one open file costs its uid: ``bytes`` of its own, and a shared content."""

    uid: int
    bytes: int = 0
    shared: Generated | None = None


class Budgets:
    """Bytes held for each uid's open files, against the budget of each."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = budget_from_environment() if limit is None else limit
        self.held: Counter[int] = Counter()
        self._warned: dict[int, float] = {}

    def _admit(self, uid: int, size: int, what: str, own: int = 0) -> None:
        """Refuse ``size`` more bytes for ``uid`` past its budget, unless all it holds is
        ``own``, the file's own: one file is always readable, however large."""
        held = self.held[uid]
        if held > own and held + size > self.limit:
            message = (
                f"{what}: uid {uid} holds {held} bytes in open files of this mount, "
                f"over its budget of {self.limit}; it may close some"
            )
            now = time.monotonic()
            if now - self._warned.get(uid, -WARN_EVERY) >= WARN_EVERY:
                self._warned[uid] = now
                log.warning("refused with ENOMEM: %s", message)
            raise OverBudgetError(message)

    def opened(self, uid: int, what: str, size: int = 0) -> Charge:
        """The charge of a new open file of ``uid`` that keeps ``size`` bytes."""
        size += HANDLE_BYTES
        self._admit(uid, size, what)
        self.held[uid] += size
        return Charge(uid, size)

    @contextlib.contextmanager
    def opening(self, uid: int, what: str) -> Iterator[Charge]:
        """``opened``, given back if the open fails before its file has a handle."""
        charge = self.opened(uid, what)
        try:
            yield charge
        except BaseException:
            self.closed(charge)
            raise

    def grow(self, charge: Charge, size: int, what: str) -> None:
        """``charge``'s file keeps ``size`` more bytes (OverBudgetError: it may not)."""
        if size > 0:
            self._admit(charge.uid, size, what, charge.bytes)
        self._add(charge.uid, size)
        charge.bytes += size

    def force(self, charge: Charge, size: int) -> None:
        """As ``grow``, past the budget: a few bytes that say why more were refused."""
        self._add(charge.uid, size)
        charge.bytes += size

    def share(self, charge: Charge, piece: Generated, what: str) -> None:
        """``charge``'s file holds ``piece``: charged once per uid that holds it."""
        assert charge.shared is None
        if not piece.holders[charge.uid]:
            self._admit(charge.uid, len(piece.content), what, charge.bytes)
            self._add(charge.uid, len(piece.content))
        piece.holders[charge.uid] += 1
        charge.shared = piece

    def closed(self, charge: Charge) -> None:
        self._add(charge.uid, -charge.bytes)
        charge.bytes = 0
        piece, charge.shared = charge.shared, None
        if piece is not None:
            piece.holders[charge.uid] -= 1
            if piece.holders[charge.uid] <= 0:
                del piece.holders[charge.uid]
                self._add(charge.uid, -len(piece.content))

    def _add(self, uid: int, size: int) -> None:
        self.held[uid] += size
        if self.held[uid] <= 0:
            del self.held[uid]


class SharedContent:
    """One generated file's content, made once per state version and shared by every open
    file that sees that version; concurrent opens of one version wait for one generation
    (single flight). Admins and other callers fly apart, so that an admin's open never
    waits for a generation queued behind other users' reads."""

    def __init__(self) -> None:
        self.latest: Generated | None = None
        self._flights: dict[tuple[int, bool], trio.Event] = {}

    async def get(
        self, version: int, admin: bool, make: Callable[[], Awaitable[bytes]]
    ) -> Generated:
        key = (version, admin)
        while True:
            latest = self.latest
            if latest is not None and latest.version >= version:
                return latest
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.wait()
        done = self._flights[key] = trio.Event()
        try:
            piece = Generated(version, await make())
        finally:
            del self._flights[key]
            done.set()
        if self.latest is None or self.latest.version < version:
            self.latest = piece
        return piece


class ReaderThreads:
    """Worker threads for the reads of callers outside the admin group: ``READER_THREADS`` at
    most at once, one per uid, apart from the default pool that state changes use, and each
    uid paced to ``cpu_share`` of a core."""

    def __init__(self, total: int = READER_THREADS, cpu_share: float = READER_CPU_SHARE) -> None:
        self._all = trio.CapacityLimiter(total)
        self._uids: dict[int, trio.CapacityLimiter] = {}
        self._idle_per_cpu_second = 1 / cpu_share - 1
        self._paced_until: dict[int, float] = {}  # uid -> trio time its next read may start

    async def run(self, uid: int, fn: Callable[..., T], *args: Any) -> T:
        own = self._uids.get(uid)
        if own is None:
            own = self._uids[uid] = trio.CapacityLimiter(1)
        spent = [0.0]

        def timed() -> T:
            start = time.thread_time()
            try:
                return fn(*args)
            finally:
                spent[0] = time.thread_time() - start

        try:
            async with own:
                # The pause is the next read's, so that a read's own reply is never late.
                await trio.sleep_until(self._paced_until.get(uid, 0.0))
                self._paced_until.pop(uid, None)  # after the sleep: a cancelled one keeps it
                try:
                    return await trio.to_thread.run_sync(timed, limiter=self._all)
                finally:
                    pause = spent[0] * self._idle_per_cpu_second
                    if pause > 0:
                        self._paced_until[uid] = trio.current_time() + pause
        finally:
            stats = own.statistics()
            if not stats.borrowed_tokens and not stats.tasks_waiting:
                self._uids.pop(uid, None)
