"""The monitor's picture of one mount, kept current by a poller thread.

Reading ``MNT/episodes`` makes the daemon generate one JSON line per snapshot (about a megabyte
at 10,000 snapshots), so the poller does not read it on a timer: it reads the short
``MNT/events`` every ``POLL_SECONDS`` and reads the tree again only when an operation that
changes snapshots has run since, and never more often than twice the time the last read took
(the daemon spends at most a third of its time on the monitor). Without ``MNT/events`` it lists
``MNT/snapshots/`` instead and reads the xattrs of new snapshots only.

Each node carries the sequence number of its last change and each removed id the number of its
removal, so a page asks for the changes since the number it has (``tree_since``) and receives a
few nodes, not the whole tree, on every commit.

Any user may write to ``ctl``: a caller outside root and the admin group (an outsider) gets
EPERM for every change, thousands a second if it likes. Its events name its ``uid`` and are
kept apart, the last ``OUTSIDER_EVENTS`` of them, as the daemon keeps them: the operations of
root and the admin group keep their ``KEPT_EVENTS`` and the latency chart, whatever outsiders
send, and an outsider's operation never has the tree read again (it changed nothing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CascowfsError
from ..events import SplitRing
from ..wire import QUERY_VERBS
from .files import DAEMON_GONE, BranchView, Event, FileMissing, MountFiles, Node

log = logging.getLogger("cascowfs.monitor")

POLL_SECONDS = 0.25  # the page is at most ~1 s behind: a poll, a tree read, an SSE push
FULL_REFRESH_SECONDS = 10.0  # also shows a change whose event left the ring between two reads
# Operations after which the snapshots and their labels are as they were: the tree is not read
# again for them (agents run `find` at every step). Any other operation that succeeded, a verb
# added later included, has the tree read again.
TREE_UNCHANGED_BY = frozenset({"branch", "discard", "rebase", "reset", "gc", "unknown"}) | set(
    QUERY_VERBS
)
KEPT_EVENTS = 200  # of root and the admin group: the table shows 10, the chart up to 120
OUTSIDER_EVENTS = 50  # of callers outside root and the admin group, kept apart
SERVED_EVENTS = KEPT_EVENTS + OUTSIDER_EVENTS  # the most /api/events answers
CHART_EVENTS = 120
TABLE_EVENTS = 10
# Removed ids a page may still have to drop: a search prunes as it goes, for as long as the
# monitor runs. A page further behind than the oldest kept gets the whole tree again.
REMOVALS_KEPT = 20_000


@dataclass(frozen=True, slots=True)
class TreeDelta:
    seq: int
    full: bool  # the caller's number was unknown: these are all the nodes
    nodes: list[Node]
    removed: list[str]


class Tracker:
    """Snapshots, branches and recent operations of a mount, safe to read from any thread."""

    def __init__(self, files: MountFiles, clock: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self._clock = clock
        self._cond = threading.Condition()
        self.version = 0  # bumps on every change a page shows
        self._seq = 0  # bumps on every change of the tree
        self._nodes: dict[str, tuple[Node, int]] = {}
        self._removed: dict[str, int] = {}  # in the order removed: by sequence number
        self._removed_floor = 0  # removals up to this number are forgotten
        self._branches: list[BranchView] = []
        # root's and the admin group's, and outsiders' (with a uid), in order of arrival
        self._events: SplitRing[Event] = SplitRing(KEPT_EVENTS, OUTSIDER_EVENTS)
        self._outsiders_seen = 0  # outsiders' events this monitor read
        self._outsiders_dropped = 0  # how many the daemon had let go, by the last one read
        self._problems: dict[str, str] = {}
        self._tree_problems: dict[str, str] = {}  # from the last read of the tree
        self._label_keys: list[str] = []
        self._branches_known = False
        self._events_seen: set[Event] = set()  # what the last read of MNT/events held
        self._tree_due = 0.0  # clock time before which the tree is not read again
        self._tree_read_at = float("-inf")
        self._tree_pending = True  # a change was seen that the tree does not show yet
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the poller ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            self._cond.notify_all()

    def poke(self) -> None:
        """Read everything again now (after the monitor itself changed something)."""
        self._tree_pending = True
        self._tree_due = 0.0
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            wait = POLL_SECONDS
            if self._tree_pending:  # come back when the tree is due, not at the next event
                wait = min(wait, max(0.0, self._tree_due - self._clock()))
            self._wake.wait(wait)
            self._wake.clear()

    def poll_once(self) -> None:
        problems: dict[str, str] = {}
        if "daemon" in self._problems:  # a daemon (back) may hold anything: read it all
            self._tree_pending, self._tree_due, self._branches_known = True, 0.0, False
        try:
            changed = self._poll(problems)
        except CascowfsError as exc:
            changed = False
            if exc.errno in DAEMON_GONE:
                problems["daemon"] = f"{self.files.mnt}: the daemon is not running ({exc.message})"
            else:
                problems["daemon"] = exc.message
        except Exception as exc:  # the page must keep following the mount whatever failed
            log.exception("reading %s failed", self.files.mnt)
            changed = False
            problems["daemon"] = f"{self.files.mnt}: {exc}"
        with self._cond:
            if changed or problems != self._problems:
                self._problems = problems
                self.version += 1
                self._cond.notify_all()

    def _poll(self, problems: dict[str, str]) -> bool:
        now = self._clock()
        new_events = self._read_events(problems)
        events_served = "events" not in problems
        self._tree_pending |= (
            not events_served
            or any(
                e.result == "ok" and e.op not in TREE_UNCHANGED_BY and e.uid is None
                for e in new_events
            )
            or now - self._tree_read_at > FULL_REFRESH_SECONDS
        )
        changed = bool(new_events)
        if self._tree_pending and now >= self._tree_due:
            changed |= self._read_tree()
            took = self._clock() - now
            self._tree_pending = False
            self._tree_read_at = now
            self._tree_due = now + 2 * took
        problems.update(self._tree_problems)
        if not events_served or new_events or not self._branches_known:
            changed |= self._read_branches()
        return changed

    def _read_events(self, problems: dict[str, str]) -> list[Event]:
        try:
            parsed = self.files.events()
        except FileMissing as exc:
            problems["events"] = (
                f"{exc.message}: no operations, latencies or live updates from events; "
                "the tree and the branches are polled instead"
            )
            return []
        if parsed.rejected:
            problems["events_rejected"] = f"{parsed.rejected} malformed line(s) in MNT/events"
        # Lines are appended as operations end but carry their start time, so a long commit
        # may follow a later branch: what is new is what the last read did not hold.
        new = [e for e in parsed.records if e not in self._events_seen]
        self._events_seen = set(parsed.records)
        if new:
            with self._cond:
                for event in new:
                    self._events.append(event, outsider=event.uid is not None)
                    if event.uid is not None:
                        self._outsiders_seen += 1
                        self._outsiders_dropped = event.dropped
        return new

    def _read_tree(self) -> bool:
        problems: dict[str, str] = {}
        try:
            parsed = self.files.episodes()
            nodes, rejected = parsed.records, parsed.rejected
        except FileMissing as exc:
            problems["episodes"] = (
                f"{exc.message}: nodes are read from MNT/snapshots; labels set after a "
                "commit are not followed"
            )
            nodes, rejected = self._nodes_from_snapshots(), 0
        if rejected:
            problems["episodes_rejected"] = f"{rejected} malformed line(s) in MNT/episodes"
        self._tree_problems = problems
        return self._apply_tree(nodes)

    def _nodes_from_snapshots(self) -> list[Node]:
        """Every snapshot, its record read from xattrs once (records are immutable)."""
        nodes = []
        for ident in self.files.snapshot_ids():
            known = self._nodes.get(ident)
            if known is not None:
                nodes.append(known[0])
                continue
            try:
                nodes.append(self.files.snapshot(ident))
            except CascowfsError as exc:
                if exc.errno in DAEMON_GONE:
                    raise
                log.debug("snapshot %s left out: %s", ident, exc.message)  # pruned meanwhile
        return nodes

    def _apply_tree(self, nodes: list[Node]) -> bool:
        with self._cond:
            seq = self._seq + 1
            changed = False
            seen = set()
            for node in nodes:
                seen.add(node.id)
                old = self._nodes.get(node.id)
                if old is None or old[0] != node:
                    self._nodes[node.id] = (node, seq)
                    self._removed.pop(node.id, None)
                    changed = True
            for gone in [i for i in self._nodes if i not in seen]:
                del self._nodes[gone]
                self._removed[gone] = seq
                changed = True
            while len(self._removed) > REMOVALS_KEPT:
                oldest = next(iter(self._removed))
                self._removed_floor = self._removed.pop(oldest)
            if changed:
                self._seq = seq
                keys = {k for n, _ in self._nodes.values() for k in n.labels}
                self._label_keys = sorted(keys)[:200]
            return changed

    def _read_branches(self) -> bool:
        branches = self.files.branches()
        self._branches_known = True
        with self._cond:
            if branches == self._branches:
                return False
            self._branches = branches
            return True

    # -- what the HTTP side reads -------------------------------------------------------------
    def wait_for_change(self, version: int, timeout: float) -> int:
        """Block until the version differs from ``version`` (or ``timeout``); the version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != version or self._stop.is_set(), timeout)
            return self.version

    def tree_since(self, seq: int) -> TreeDelta:
        """The nodes changed and the ids removed after tree number ``seq``; all the nodes
        (``full``) for a number unknown here or older than the removals kept."""
        with self._cond:
            if seq <= 0 or seq > self._seq or seq < self._removed_floor:
                nodes = [n for n, _ in self._nodes.values()]
                return TreeDelta(self._seq, True, nodes, [])
            nodes = [n for n, s in self._nodes.values() if s > seq]
            removed = [i for i, s in self._removed.items() if s > seq]
            return TreeDelta(self._seq, False, nodes, removed)

    def branches(self) -> list[BranchView]:
        with self._cond:
            return list(self._branches)

    def events(self, limit: int) -> list[Event]:
        with self._cond:
            return self._events.since()[-limit:] if limit > 0 else []

    def summary(self) -> dict:
        """What the page's header, branch table, operations table and chart show: the table
        the last operations of anyone, the chart those of root and the admin group only, and
        how many outsiders' operations were read and how many the daemon let go unread (its
        ring of them is short: a flood between two polls is not all seen)."""
        with self._cond:
            events = self._events.since()[-TABLE_EVENTS:]
            chart = [e for _, e in self._events.ours][-CHART_EVENTS:]
            return {
                "mount": str(self.files.mnt),
                "version": self.version,
                "tree_seq": self._seq,
                "snapshots": len(self._nodes),
                "branches": [{"name": b.name, "parent": b.parent} for b in self._branches],
                "events": [e.as_json() for e in events],
                "latency": [e.as_json() for e in chart],
                "outsiders": {"seen": self._outsiders_seen, "dropped": self._outsiders_dropped},
                "label_keys": self._label_keys,
                "problems": dict(self._problems),
            }
