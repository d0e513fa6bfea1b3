"""Opening a store after whatever ended its last run: the format check and upgrade, WAL
replay, reconciliation of the disk and the mount table with the recorded state, and the
reset after a lost page cache.

Every op whose APPLY transaction committed is rolled forward (its SWITCH step redone), and so
is every label logged (its transaction redone from its record); every other one leaves only
staging, unrecorded layers and unreachable objects, which reconciliation and a collection
sweep. If the page cache was lost since the last open (a
reboot, a remount: ``durability.py``), the branches restart from their parent snapshots and
the layers recorded since the last syncfs are rebuilt before anything is mounted.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from . import durability, label_applies, overlay
from .catalog import CHAIN_NODES_FORMAT, STORE_FORMAT, BranchRecord
from .crashpoints import crash_point
from .errors import CascowfsError, InvalidArgumentError, StoreIOError
from .names import check_branch_name
from .wal import PendingOp

if TYPE_CHECKING:  # the StateManager opens a store through this module
    from .state import StateManager

log = logging.getLogger("cascowfs.recovery")

UPGRADES_IN_PLACE = {2, 3, 4, 5, 6, 7, 8, 9, 10}  # older formats a writable open upgrades
PRIVATE_BRANCH_DIRS_SINCE = 8  # older formats keep a branch's upper and work beside its tree
# ops that may leave objects no live root reaches when rolled back
_MAY_LEAVE_OBJECTS = ("import", "commit", "flatten", "pull")


def check_format(sm: StateManager, *, read_only: bool) -> None:
    """Refuse a store of a format this version cannot read; upgrade an older one in place
    (unless ``read_only``)."""
    with sm.db.read() as txn:
        raw = sm.catalog.format(txn)
        found = int(raw) if raw is not None else None
        empty = sm.catalog.snapshot_count(txn) == 0
    if found == STORE_FORMAT:
        return
    if found not in UPGRADES_IN_PLACE and not (found is None and empty):
        raise StoreIOError(
            f"store {sm.store} has format {raw and raw.decode() or 'unknown'}; "
            f"this cascowfs reads format {STORE_FORMAT}"
        )
    older_layout = found is not None and found < PRIVATE_BRANCH_DIRS_SINCE
    if read_only:
        # formats 2-4 differ only in refcounts, which this version ignores; 5-7 read as is,
        # with the branches' uppers where they are (format 7's layer directories mount as
        # they are; the indexes, which only the queries of a served store read, are missing
        # below format 10; fsck checks layer refcounts below format 11 as they were counted)
        sm.legacy_branch_layout = older_layout
        return
    if older_layout:
        _move_branch_dirs_into_private(sm)

    def upgrade(txn: lmdb.Transaction) -> None:
        if found is not None and found < 5:
            # Object refcounts (and their queue) are not kept; objects they would have
            # deleted are garbage now, which the first collection takes.
            sm.db.drop_legacy(txn)
            sm.collector.note_garbage(txn)
        if found is not None and found < 10:
            sm.catalog.rebuild_indexes(txn)  # 10: the children and labels indexes
        if found is not None and found < CHAIN_NODES_FORMAT:
            sm.layer_refs.rebuild(txn)  # 11: layer refcounts count chain nodes
        sm.catalog.set_format(txn, STORE_FORMAT)

    sm.db.write(upgrade, "upgrading the store format")


def _move_branch_dirs_into_private(sm: StateManager) -> None:
    """Format 8: move each branch's ``upper/`` into its private directory, and its ``work/``
    into the trash (a mount starts it afresh anyway). Each step is one rename or is done
    already, and the format is recorded only after the last: a kill -9 anywhere leaves steps
    the next open redoes or skips. A branch still mounted over its old upper keeps working (a
    rename does not reach the mount); reconcile mounts it again over the moved upper."""
    for name in sorted(os.listdir(sm.branches_dir)):
        bdir = sm.branches_dir / name
        legacy_upper, legacy_work = bdir / "upper", bdir / "work"
        if not os.path.lexists(legacy_upper) and not os.path.lexists(legacy_work):
            continue
        upper, _ = sm.make_branch_dirs(name)
        if os.path.lexists(legacy_upper):
            if os.path.lexists(upper):
                sm.trash.put(legacy_upper)  # never both: a rename moved it, or it was never made
            else:
                os.rename(legacy_upper, upper)
        sm.trash.put(legacy_work)
        durability.fsync_dir(upper.parent)
        durability.fsync_dir(bdir)
        crash_point("upgrade.moved")
    log.info("%s: branch upper directories moved into their private directories", sm.store)


def recover(sm: StateManager, progress: bool) -> None:
    """Replay the WAL and reconcile, as the module docstring says."""
    cache = durability.page_cache_id(sm.store)
    with sm.db.read() as txn:
        last_cache = sm.catalog.page_cache(txn)
    # A branch mount outlives any daemon, but never its page cache: while one is there,
    # nothing was lost, whatever the ids say.
    cache_lost = bool(cache and last_cache and last_cache != cache and not sm.own_mounts())
    sm.layers.find_unbuilt()
    logged = sm.wal.prepared()
    pending = [op for op in logged if not op.finished]
    last_labels = label_applies.last_of_each_snapshot(logged)
    sm.wal.replayed = len(pending)
    with sm.db.read() as txn:
        applied = {op.op for op in pending if sm.catalog.is_applied(txn, op.op)}
    orphans_possible = False
    for op in pending:
        if op.op in applied:
            _roll_forward(sm, op, cache_lost)
        elif op.kind in ("rebase", "reset"):
            _roll_back_repoint(sm, op)
        elif op.kind == "label":  # acknowledged once logged: label_applies.py
            label_applies.redo(sm.db, sm.catalog, op, last_labels)
        else:
            orphans_possible = orphans_possible or op.kind in _MAY_LEAVE_OBJECTS
    reconcile(sm, cache_lost, progress)
    if orphans_possible:
        sm.collect(progress=progress)
    sm.checkpoint()
    if cache_lost:
        sm.layers.sync()  # the rebuilt layers: a second power cut must not tear them
    if cache != last_cache:
        sm.db.write(
            lambda txn: sm.catalog.set_page_cache(txn, cache), "recording the page cache id"
        )


def _roll_forward(sm: StateManager, op: PendingOp, cache_lost: bool) -> None:
    """Finish the SWITCH step of an op whose APPLY committed (idempotent)."""
    layer = op.args.get("layer")
    if layer:
        staged = sm.staging_dir / op.op
        target = sm.layers.path(layer)
        if staged.exists() and not target.exists():
            os.rename(staged, target)
            durability.fsync_dir(sm.layers.layers_dir)
    if op.kind in ("rebase", "reset") and not cache_lost:
        # After a lost page cache, reconcile restarts every branch afresh anyway, and only
        # once it has rebuilt the layers the cut tore: the new base's may be among them.
        _roll_forward_repoint(sm, op)
    # The other mount-side effects (discard, branch) are settled by reconcile from state.


def _roll_forward_repoint(sm: StateManager, op: PendingOp) -> None:
    """The SWITCH of a re-base or reset past its APPLY, which may or may not have been done:
    the op is left unfinished in the log by a kill -9 before its FINALIZE, but also by a
    FINALIZE that could not be written (a full or failing disk) after the op returned, and
    the branch has then been worked in since, for as long as the daemon ran.

    The branch's upper directory is never replaced here. Its directories were swapped for
    the fresh ones the op staged before the APPLY (``StateManager._swap_in_staged``), so the
    upper directory in place is the op's fresh one, or everything written into the branch
    since the SWITCH: either way, what the branch must show. What may be wrong is the mount:
    until the SWITCH, the old overlay still works on the old directories, which wait in
    staging (``old-upper``, ``old-work``) until the SWITCH is over. While they are there, the
    branch is unmounted, and reconcile mounts it again over its upper directory (a mount the
    SWITCH made already is made again over the same directory: nothing is lost); once they
    are gone the SWITCH is done, and reconcile adopts the mount. The mount may match the
    record either way (a reset onto the snapshot the branch is on keeps the chain and the
    upper directory's path), so only staging tells. A branch discarded since, or made again
    under the name, is not this op's: reconcile settles it from its record."""
    rec = _branch_of(sm, op)
    if rec is None:
        return
    name = op.args["name"]  # checked by ``_branch_of``
    if "staged" not in op.args:
        # an older version's record: it swapped the directories at the SWITCH, so the upper
        # directory in place is the old one (with the changes a reset drops)
        overlay.unmount_stacked(sm.tree_path(name))
        _mount(sm, name, rec, fresh_upper=True)
        return
    waiting = _staged_dirs(sm, op)
    if waiting is not None and any(
        os.path.lexists(waiting / f"old-{kind}") for kind in ("upper", "work")
    ):
        sm.unmount_branch(name)


def _branch_of(sm: StateManager, op: PendingOp) -> BranchRecord | None:
    """The record of the branch re-based or reset by ``op``, if it is still the one the op
    changed: not discarded since, nor made again under its name (its ``created`` differs;
    records of older versions carry none). A record is read back as hostile input."""
    try:
        name = check_branch_name(op.args.get("name"))
    except InvalidArgumentError:
        return None
    with sm.db.read() as txn:
        rec = sm.catalog.find_branch(txn, name)
    created = op.args.get("created")
    if rec is None or (created is not None and created != str(rec.created_ns)):
        return None
    return rec


def _roll_back_repoint(sm: StateManager, op: PendingOp) -> None:
    """A re-base or reset killed before its APPLY may have swapped the branch's upper and
    work directories for the fresh ones it staged (``StateManager._swap_in_staged``): put
    its own back under the mount that still uses them, before staging is emptied (a failed
    op whose own undo could not do it leaves the same: ``StateManager._strand``).

    A branch discarded since (a run that could not write the op's FINALIZE went on), or made
    again under its name, is not the op's: nothing of it is touched."""
    staged = _staged_dirs(sm, op)
    if staged is None or not staged.is_dir() or _branch_of(sm, op) is None:
        return
    name = op.args["name"]  # checked by ``_branch_of``
    if (sm.branches_dir / name).is_dir():
        sm.swap_back(name, staged)


def _staged_dirs(sm: StateManager, op: PendingOp) -> Path | None:
    """Where a re-base or reset ``op`` staged the branch's directories (its record's
    ``staged``: a name in staging), if its record names one."""
    staged = op.args.get("staged")
    if isinstance(staged, str) and staged not in ("", ".", "..") and Path(staged).name == staged:
        return sm.staging_dir / staged
    return None


def _mount(sm: StateManager, name: str, rec: BranchRecord, *, fresh_upper: bool) -> None:
    """Mount branch ``name``; on a full disk, leave it unmounted and open the store anyway:
    freeing space (prune, discard, gc) needs it open."""
    try:
        sm.mount_branch(name, rec, fresh_upper=fresh_upper)
    except CascowfsError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sm.leave_unmounted(name, exc)


def reconcile(sm: StateManager, cache_lost: bool = False, progress: bool = False) -> None:
    """Make disk and mounts agree with the recorded state. If the page cache was lost
    since the last open (a reboot, a remount), first undo what that may have torn (nothing
    is mounted yet): branches restart from their parent snapshots, layers recorded since
    the last syncfs are rebuilt."""
    # staging: nothing in flight survives a restart
    for entry in os.listdir(sm.staging_dir):
        sm.trash.put(sm.staging_dir / entry)
    if cache_lost:
        _reset_branches_to_their_parents(sm)
        sm.layers.rebuild(
            sm.layers.unsynced(),
            "not synced before the page cache was lost",
            progress,
            sm.unmount_branch,
        )
    with sm.db.read() as txn:
        records = sm.catalog.layer_ids(txn)
        branches = dict(sm.catalog.branches(txn))
    on_disk = set(os.listdir(sm.layers.layers_dir))  # one read, not a stat per layer
    for entry in on_disk - records:
        sm.trash.put(sm.layers.path(entry))
    missing = [lid for lid in records if not sm.layers.is_unbuilt(lid) and lid not in on_disk]
    if missing:
        sm.layers.rebuild(set(missing), "missing from layers/", progress, sm.unmount_branch)
    # mounts: keep exactly one correct mount per live branch
    expected = {str(sm.tree_path(name)): (name, rec) for name, rec in branches.items()}
    seen: dict[str, int] = {}
    for m in sm.branch_side_mounts():
        found = expected.get(m.target)
        if found is not None and seen.get(m.target, 0) == 0 and sm.mount_matches(m, *found):
            seen[m.target] = 1
            continue
        overlay.unmount(Path(m.target))
    for name in os.listdir(sm.branches_dir):
        if name not in branches:
            sm.trash_branch_dir(name)
    for name, rec in branches.items():
        if str(sm.tree_path(name)) not in seen:
            _mount(sm, name, rec, fresh_upper=False)
    # image mounts no overlay stacks any more (a killed run's, a pruned layer's)
    sm.layers.unmount_unused()


def _reset_branches_to_their_parents(sm: StateManager) -> None:
    """After the page cache was lost. A branch's upper directory belongs to a volatile
    overlay: nothing in it is ever synced (not even by an fsync inside the branch), so any
    file there may be torn, including files the branch has since committed. Every branch
    therefore restarts from its parent snapshot (its last commit, or the snapshot it was
    made from) with an empty upper directory, as overlayfs asks of a volatile upper."""
    with sm.db.read() as txn:
        names = sm.catalog.branch_names(txn)
    if names:
        log.warning(
            "%s: the page cache was lost since the last open (a reboot, a remount): "
            "%d branch(es) restart from their parent snapshots, uncommitted changes "
            "dropped",
            sm.store,
            len(names),
        )
    for name in names:

        def apply(txn: lmdb.Transaction, name: str = name) -> list[str]:
            old = sm.catalog.branch(txn, name)
            return sm.repoint_branch(txn, name, old, old.parent)[1]

        dropped = sm.db.write(apply, f"resetting branch {name}")
        sm.unmount_branch(name)  # none is mounted after a lost page cache: harmless
        sm.trash.put(sm.upper_path(name))  # mounting makes a fresh one
        sm.trash_after_apply(dropped)
