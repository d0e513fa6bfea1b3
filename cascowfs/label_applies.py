"""Labels after commit: acknowledged once their WAL record is flushed, applied to LMDB behind.

A tree search relabels the nodes of its path on every simulation. LMDB's group commit would
make each label wait for the batch in flight (often a commit's) and then for its own, two disk
flushes each. So a label is durable, and returns, once its PREPARE record, which carries the
snapshot's whole label set afterwards, is flushed (the WAL's group commit: one shared
``fdatasync``); its LMDB transaction is queued on the committer without waiting and FINALIZEd
once it commits. Recovery rolls a logged label forward from its record (``redo``).

Order: labels take tickets, under one lock, in WAL order, and their transactions are queued in
ticket order, so LMDB applies them in the order replay would. Each label's set is computed
from the one the label before it on the same snapshot left (``_projected``), so concurrent
labels of one snapshot compose, the last one winning per key.

Reads see every label that returned, and none that is not durable yet: a reader of whole
snapshot records overlays the sets of the labels queued and not applied (``labels_of``,
``overlay``); a reader of the label indexes (``find``) waits until every transaction queued
so far has committed (``wait_applied``).

A label whose transaction fails (a full or failing disk) stays acknowledged: its set stays
what readers see and what the next label of its snapshot starts from (``_stuck``), so every
later label's record carries its changes too. The first later label of that snapshot whose
transaction commits therefore applies them as well, and FINALIZEs the failed ones; until then
they are ``failed``, the checkpoint keeps the log, and the next open applies the last label
record of the snapshot (``redo``), never an older one over a newer. A label whose flush failed
as well was never acknowledged (``settle_unflushed`` fails it): it is not ``failed`` but
abandoned (``WriteAheadLog.abandon``), so that it neither keeps the log from its checkpoints
for the rest of the run nor is applied by replay, its own or another label's.

Prune: a label either lands before a prune of its snapshot or fails with ENOENT. A prune
waits for the labels that already took a ticket to be queued before queueing its own
transaction, and labels of that snapshot wait for the prune to end (``pruning``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import lmdb

from .catalog import Catalog
from .crashpoints import crash_point
from .errors import CascowfsError, InvalidArgumentError
from .metadb import MetaDB, WriteRequest
from .names import check_labels, check_snapshot_id, labels_over_limits
from .wal import PendingOp, WriteAheadLog

log = logging.getLogger("cascowfs.labels")


@dataclass(frozen=True)
class LoggedLabel:
    """A label whose record is written: ``mark`` is the flush target that covers it, and
    ``ticket`` its place in WAL order."""

    op: str
    id: str
    labels: dict[str, str]
    mark: int
    ticket: int


def settle_unflushed(request: WriteRequest, flush_error: CascowfsError) -> None:
    """A label whose record's flush failed is durable only once its transaction commits:
    wait for it, and fail with the flush's error if it does not (blocking)."""
    try:
        request.wait()
    except CascowfsError:
        raise flush_error from None


class LabelApplies:
    """The labels acknowledged and not yet committed to LMDB, and their order."""

    def __init__(self, db: MetaDB, catalog: Catalog, wal: WriteAheadLog) -> None:
        self._db = db
        self._catalog = catalog
        self._wal = wal
        self._cond = threading.Condition()
        # snapshot id -> (its labels once every label of it with a ticket applied, how many)
        self._projected: dict[str, tuple[dict[str, str], int]] = {}
        # snapshot id -> its labels once every label of it queued applied: what readers see
        # (a label is queued once durable, so no reader sees one a crash could lose)
        self._visible: dict[str, dict[str, str]] = {}
        self._pruning: Counter[str] = Counter()
        self._issued = 0  # tickets handed out, in WAL order
        self._queued = 0  # of those, how many have their transaction queued
        self._last: WriteRequest | None = None  # the transaction queued last
        # snapshot id -> the set of its label applied last, whose transaction failed, and the
        # failed ops of that snapshot since its last label that committed
        self._stuck: dict[str, tuple[dict[str, str], list[str]]] = {}
        self.failed: set[str] = set()  # ops whose transaction failed: replay must redo them

    def label(self, id: str, changes: dict[str, str]) -> dict[str, str]:
        """Make ``changes`` (checked; "" removes a key) to snapshot ``id``'s labels, durably;
        returns its labels afterwards. ENOENT if it does not exist, EINVAL if the result
        breaks a cap: both before anything is logged."""
        logged = self.log(id, changes)
        assert logged is not None
        flush_error: CascowfsError | None = None
        try:
            self._wal.flush_through(logged.mark)
        except CascowfsError as exc:
            flush_error = exc
        else:
            crash_point("label.logged")
        request = self.queue(logged)
        assert request is not None
        if flush_error is not None:
            settle_unflushed(request, flush_error)
        return logged.labels

    # ``label`` in steps, for a caller that must not block (the trio thread): ``log``,
    # flush the log through ``mark`` its own way, ``queue``; if the flush failed,
    # ``settle_unflushed``.
    def log(self, id: str, changes: dict[str, str], *, wait: bool = True) -> LoggedLabel | None:
        """Write the label's record (not flushed) and take its ticket. Without ``wait``,
        None instead of waiting for a prune of the snapshot."""
        with self._cond:
            while self._pruning[id]:
                if not wait:
                    return None
                self._cond.wait()
            with self._db.read() as txn:
                recorded = self._catalog.snapshot(txn, id).labels
            if id in self._stuck:  # acknowledged, not in the record
                recorded = self._stuck[id][0]
            before, count = self._projected.get(id, (recorded, 0))
            labels = relabelled(id, before, changes)
            op, mark = self._wal.log_prepare("label", durable=False, id=id, labels=labels)
            ticket = self._issued
            self._issued += 1
            self._projected[id] = (labels, count + 1)
        return LoggedLabel(op, id, labels, mark, ticket)

    def queue(self, logged: LoggedLabel, *, wait: bool = True) -> WriteRequest | None:
        """Queue the logged label's transaction once every label logged before it has its
        own queued. Without ``wait``, None while one has not."""
        with self._cond:
            while self._queued != logged.ticket:
                if not wait:
                    return None
                self._cond.wait()
            op, id, labels = logged.op, logged.id, logged.labels
            try:
                request = self._db.submit(
                    lambda txn: apply_label(self._catalog, txn, op, id, labels),
                    f"labelling snapshot {id}",
                    on_done=lambda request: self._applied(logged, request),
                )
            except CascowfsError:
                self._unproject(id)
                raise
            finally:
                self._queued += 1
                self._cond.notify_all()
            self._last = request
            self._visible[id] = labels
        return request

    def _applied(self, logged: LoggedLabel, request: WriteRequest) -> None:
        """On the committer thread, once a label's transaction committed or failed (in
        ticket order: the latest label of its snapshot to be settled). A failed one whose
        record is durable is acknowledged (``_stuck``); one whose flush failed is not
        (``settle_unflushed`` fails it): the labels after it do not build on it, and it is
        abandoned, not ``failed``."""
        op, id, labels = logged.op, logged.id, logged.labels
        abandoned = request.error is not None and not self._wal.flushed(logged.mark)
        with self._cond:
            superseded: list[str] = []
            if request.error is not None and not abandoned:
                failed_before = self._stuck[id][1] if id in self._stuck else []
                self._stuck[id] = (labels, [*failed_before, op])
                self.failed.add(op)
            elif request.error is None and id in self._stuck:
                superseded = self._stuck.pop(id)[1]
                self.failed.difference_update(superseded)
            self._unproject(id)
        if abandoned:
            log.error("label op %s of snapshot %s failed: %s", op, id, request.error)
            try:
                self._wal.abandon(op)
            except CascowfsError as exc:  # a checkpoint forgets it (a crash before: redone)
                log.warning("label op %s: its abandon record is not written: %s", op, exc)
            return
        if request.error is not None:
            log.error(
                "label op %s of snapshot %s: left for the next open, or the next label of "
                "the snapshot: %s",
                op,
                id,
                request.error,
            )
            return
        crash_point("label.applied")
        for done in [*superseded, op]:  # the failed ones' changes are in this op's set
            try:
                self._wal.finalize(done)
            except CascowfsError as exc:
                log.warning("label op %s is applied, but its FINALIZE record is not: %s", done, exc)

    def _unproject(self, id: str) -> None:
        labels, count = self._projected[id]
        if count == 1:
            del self._projected[id]
            if id in self._stuck:
                self._visible[id] = self._stuck[id][0]
            else:
                self._visible.pop(id, None)
        else:
            self._projected[id] = (labels, count - 1)

    def forget(self, id: str) -> None:
        """Snapshot ``id`` is pruned: the labels of it whose transaction failed are moot
        (replay would find it gone), so they are FINALIZEd."""
        with self._cond:
            failed = self._stuck.pop(id)[1] if id in self._stuck else []
            self.failed.difference_update(failed)
            if id not in self._projected:
                self._visible.pop(id, None)
        for op in failed:
            try:
                self._wal.finalize(op)
            except CascowfsError:
                pass  # replay finds the snapshot gone: a no-op

    def labels_of(self, id: str) -> dict[str, str] | None:
        """Snapshot ``id``'s labels if a label of it is not applied yet (else None: read the
        record). Call before reading the record: a label applied in between is in it."""
        with self._cond:
            found = self._visible.get(id)
            return dict(found) if found is not None else None

    def overlay(self) -> dict[str, dict[str, str]]:
        """``labels_of`` of every snapshot that has one: read before the records."""
        with self._cond:
            return {id: dict(labels) for id, labels in self._visible.items()}

    def wait_applied(self) -> None:
        """Wait until every label transaction queued so far has committed (or failed)."""
        with self._cond:
            last = self._last
        if last is not None:
            last.done.wait()

    @contextmanager
    def pruning(self, id: str) -> Iterator[None]:
        """Around a prune of snapshot ``id`` (see the module docstring)."""
        with self._cond:
            self._pruning[id] += 1
            horizon = self._issued
            while self._queued < horizon:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._pruning[id] -= 1
                if not self._pruning[id]:
                    del self._pruning[id]
                self._cond.notify_all()


def relabelled(id: str, labels: dict[str, str], changes: dict[str, str]) -> dict[str, str]:
    """``labels`` with ``changes`` made; EINVAL if the result breaks a cap."""
    out = {**labels, **{k: v for k, v in changes.items() if v}}
    for key, val in changes.items():
        if not val:
            out.pop(key, None)
    problem = labels_over_limits(out)
    if problem:
        raise InvalidArgumentError(f"labels of snapshot {id}: {problem}")
    return out


def apply_label(
    catalog: Catalog, txn: lmdb.Transaction, op: str, id: str, labels: dict[str, str]
) -> None:
    """A label op's transaction: the snapshot's labels become ``labels``, the op applied. A
    snapshot gone meanwhile (replay of a label logged before a prune) makes it a no-op."""
    old = catalog.find_snapshot(txn, id)
    if old is None:
        log.warning("label op %s: snapshot %s is gone, its labels are dropped", op, id)
    else:
        catalog.replace_snapshot(txn, id, old, replace(old, labels=labels))
    catalog.mark_applied(txn, op)


def last_of_each_snapshot(logged: list[PendingOp]) -> dict[str, PendingOp]:
    """The last label record of each snapshot among ``logged`` (``WriteAheadLog.prepared``:
    every record of the log, finalized or not), by the id the record names. An abandoned
    one (never acknowledged, never applied: ``WriteAheadLog.abandon``) is not a label."""
    return {
        op.args["id"]: op
        for op in logged
        if op.kind == "label" and isinstance(op.args.get("id"), str) and not op.abandoned
    }


def redo(
    db: MetaDB, catalog: Catalog, op: PendingOp, last: dict[str, PendingOp] | None = None
) -> None:
    """Roll a logged label forward at open. The snapshot's labels become those of its last
    label record in the log (``last``: ``last_of_each_snapshot``), which holds the changes of
    every label logged before it (``_stuck``): applying ``op``'s own older set would undo the
    later labels LMDB committed. Records are written by a daemon but read back as hostile
    input: one of another shape is skipped with a warning, never raised."""
    try:
        id, labels = _checked(op)
    except InvalidArgumentError as exc:  # a record of an older version has no labels
        log.warning("label op %s: not redone, its record is not one: %s", op.op, exc.message)
        return
    latest = (last or {}).get(id, op)
    if latest is not op:
        try:
            id, labels = _checked(latest)
        except InvalidArgumentError:
            pass  # warned about at its own redo, if it needs one
    db.write(
        lambda txn: apply_label(catalog, txn, op.op, id, labels),
        f"redoing label op {op.op} of snapshot {id}",
    )


def _checked(op: PendingOp) -> tuple[str, dict[str, str]]:
    """The snapshot and label set a label record carries (EINVAL: it carries none)."""
    id, labels = op.args.get("id"), op.args.get("labels")
    if not isinstance(labels, dict):
        raise InvalidArgumentError(f"labels {type(labels).__name__}, not an object")
    return check_snapshot_id(id), check_labels(labels)
