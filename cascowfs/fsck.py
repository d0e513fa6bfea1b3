"""``cascowfs fsck``: check docs/architecture.md's five invariants, report each failure.

1. every snapshot's tree verifies against its root digest and every object it names exists,
   and (``deep``) its hard-link groups are each one file keyed by its members' paths;
2. every refcount equals the count recomputed from live state: chain nodes' and layers'
   refcounts, from the snapshot and branch chains (``layer_refs.py``; below store format 11
   a layer counts the chains naming it; since store format 5 objects carry no refcounts:
   they live while a live root reaches them, see ``collector.py``); likewise every entry of
   the children and labels indexes (store format 10) is what the snapshot records say, and
   no snapshot is its own ancestor (a pull refuses a parent that would close a loop);
3. no object is unreachable from a live root (snapshots, branches and layers each hold a
   tree; a snapshot's observation is a root too), unless a collection is pending: then
   unreachable objects are garbage not yet collected, and only counted
   (``awaiting_collection``);
4. no mount of ours is left that the state does not name, and every live branch is mounted
   (a mount inside a branch's tree is the branch's own business: its code may mount there);
5. no operation is left half-done: the WAL has nothing pending, no staging directory remains,
   and (``deep``) every snapshot's layer chain shows exactly the snapshot's tree (a chain that
   holds a commit's delta layer not written yet, which has no directory to show, is skipped).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import images, overlay
from .cas import STREAM_PIECE, children_of, identify_content
from .catalog import CHAIN_NODES_FORMAT, INDEXED_FORMAT, LayerRecord, SnapshotRecord
from .episodes import parent_loops
from .errors import StoreIOError
from .layer_refs import recount
from .model import Entry
from .pathquote import quote
from .progress import progress_bar
from .scan import ObjectSink, finalize, link_group_problem, listings_into, scan_directory
from .state import StateManager
from .trees import TreeStore


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    snapshots: int = 0
    branches: int = 0
    objects: int = 0
    awaiting_collection: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, invariant: int, message: str) -> None:
        self.problems.append(f"invariant {invariant}: {message}")


def fsck_store(store: str | Path, *, progress: bool = False, deep: bool = False) -> FsckReport:
    """Check a store that no daemon holds (takes the store lock; changes nothing)."""
    sm = StateManager.open(store, recover=False, create=False)
    try:
        return check(sm, progress=progress, deep=deep)
    finally:
        sm.close()


def check(sm: StateManager, *, progress: bool = False, deep: bool = False) -> FsckReport:
    report = FsckReport()
    db = sm.db
    with db.read() as txn:
        snaps = dict(sm.catalog.snapshots(txn))
        branches = dict(sm.catalog.branches(txn))
        layers = dict(sm.catalog.layers(txn))

        object_ids = set(sm.content.iter_object_ids(txn))
        pending = sm.collection_pending(txn)
        stored_format = sm.catalog.format(txn)
        indexed = stored_format is not None and int(stored_format) >= INDEXED_FORMAT
        index_problems = sm.catalog.index_mismatches(txn) if indexed else []
        by_nodes = stored_format is not None and int(stored_format) >= CHAIN_NODES_FORMAT
        nodes = sm.catalog.chain_nodes(txn) if by_nodes else {}
    report.snapshots, report.branches, report.objects = len(snaps), len(branches), len(object_ids)

    # 1: walk every live root, verifying each distinct object once
    roots = [(f"snapshot {sid}", rec.root) for sid, rec in snaps.items()]
    roots += [
        (f"observation of snapshot {sid}", rec.obs.ref)
        for sid, rec in snaps.items()
        if rec.obs is not None and rec.obs.ref
    ]
    roots += [(f"branch {name}", rec.base_root) for name, rec in branches.items() if rec.base_root]
    roots += [(f"layer {lid}", rec.top) for lid, rec in layers.items()]
    roots += [
        (f"layer {lid} (not written yet)", rec.below) for lid, rec in layers.items() if rec.below
    ]
    visited: set[bytes] = set()
    with progress_bar(progress, len(object_ids), "fsck objects", unit="obj") as bar:
        for owner, hexid in roots:
            stack = [bytes.fromhex(hexid)]
            while stack:
                oid = stack.pop()
                if oid in visited:
                    continue
                visited.add(oid)
                bar(1)
                value = sm.content.find(oid)
                if value is None:
                    report.add(1, f"{owner}: object {oid.hex()} is missing")
                    continue
                if not sm.content.verify(oid, value):
                    report.add(1, f"{owner}: object {oid.hex()} does not match its id (corrupt)")
                    continue
                stack.extend(children_of(value))
    # every snapshot's link groups walked anew (tens of ms a snapshot over a 60,000-member
    # group): a deep check's work, as the layers' comparison is
    for sid, rec in snaps.items() if deep else ():
        try:
            problem = link_group_problem(lambda tree_id: sm.trees.get(tree_id).values(),
                                         bytes.fromhex(rec.root))  # fmt: skip
        except StoreIOError:
            continue  # a tree missing or corrupt: reported above
        if problem:
            report.add(1, f"snapshot {sid}: {problem}")

    # 3: nothing unreachable, but garbage a pending collection will take
    unreachable = object_ids - visited
    if pending:
        report.awaiting_collection = len(unreachable)
    else:
        for oid in sorted(unreachable):
            report.add(3, f"object {oid.hex()} is not reachable from any snapshot, branch or layer")

    # 2 (layers): layer refcounts and directories
    chains = [rec.layers for rec in snaps.values()] + [rec.layers for rec in branches.values()]
    if by_nodes:
        held, layer_refs = recount(chains)
        for key in set(held) | set(nodes):
            stored = nodes.get(key, 0)
            if stored != held[key]:
                report.add(2, f"chain node {key.hex()} has refcount {stored}, held {held[key]}x")
        counted = "chain nodes it tops"
    else:  # below format 11 a layer counts the chains naming it
        layer_refs = Counter(lid for chain in chains for lid in chain)
        counted = "chains naming it"
    for lid in set(layer_refs) | set(layers):
        stored = layers[lid].refs if lid in layers else 0
        if stored != layer_refs[lid]:
            report.add(2, f"layer {lid} has refcount {stored}, {counted}: {layer_refs[lid]}")
        if lid in layers and layers[lid].built and not sm.layers.exists(lid):
            report.add(1, f"layer {lid} is recorded but missing from layers/")
        elif lid in layers and layers[lid].built and sm.layers.is_image(lid):
            try:  # a torn image mounts, and answers EUCLEAN past the cut: seen without a mount
                images.check_whole(sm.layers.path(lid))
            except images.ImageError as exc:
                report.add(1, f"layer {lid}: {exc.message}")
    for entry in os.listdir(sm.layers_dir):
        if entry not in layers:
            report.add(3, f"layer directory {entry} is not recorded")
        elif not layers[entry].built:
            report.add(
                5,
                f"layer {entry} was placed but not recorded as written (mount the "
                f"store to recover)",
            )

    for problem in index_problems:
        report.add(2, problem)
    parents = {sid: rec.parent for sid, rec in snaps.items()}
    for loop in parent_loops(sorted(parents), parents.get):
        report.add(2, f"snapshots {' -> '.join(loop)} are their own ancestors (a parent loop)")

    # 4: mounts
    expected = {str(sm.tree_path(name)): (name, rec) for name, rec in branches.items()}
    # Below a live branch's tree, a mount is one its code made (a tmpfs, a bind mount): not
    # the store's, and an agent must not be able to make fsck fail at will. Detaching the
    # branch's tree (discard, umount --branches) detaches it along.
    inside_trees = tuple(f"{tree}/" for tree in expected)
    seen: Counter = Counter()
    for m in overlay.mounts_under(sm.mounts_dir):
        lid = Path(m.target).name
        if m.fstype != "erofs" or lid not in layers or not sm.layers.is_image(lid):
            report.add(4, f"mount at {quote(m.target)} is not an image layer's")
    for m in sm.branch_side_mounts():
        if m.source == overlay.PLACEHOLDER_SOURCE and m.target in expected:
            continue  # stands in for an overlay that could not be mounted: reported below
        if m.target.startswith(inside_trees):
            continue
        if m.target not in expected:
            report.add(4, f"mount at {quote(m.target)} is not named by any branch")
            continue
        seen[m.target] += 1
        if not sm.mount_matches(m, *expected[m.target]):
            report.add(4, f"branch {expected[m.target][0]} is mounted on the wrong layers or upper")
    for target, (name, _) in expected.items():
        if seen[target] == 0:
            report.add(4, f"branch {name} is not mounted")
        elif seen[target] > 1:
            report.add(4, f"branch {name} is mounted {seen[target]} times")

    # 5: nothing half-done
    for op in sm.wal.pending():
        report.add(
            5, f"operation {op.kind} {op.op} {op.args} is unfinished (mount the store to recover)"
        )
    for entry in os.listdir(sm.staging_dir):
        report.add(5, f"staging directory {entry} is left over")
    if deep:
        for sid, rec in snaps.items():
            # a commit's layer not written yet has nothing on disk to compare
            if all(_written(layers, lid) for lid in rec.layers):
                _check_layers(sm, sid, rec, report)
    return report


def _written(layers: dict[str, LayerRecord], lid: str) -> bool:
    """Whether a layer's directory is there to compare (a layer with no record is checked
    and reported as such)."""
    return lid not in layers or layers[lid].built


def _check_layers(sm: StateManager, sid: str, rec: SnapshotRecord, report: FsckReport) -> None:
    """The snapshot's layer chain, its images mounted, the whole mounted read-only, must
    show exactly its tree. A layer missing or unreadable is reported, and the check goes on
    to the next snapshot."""
    missing = [lid for lid in rec.layers if not sm.layers.exists(lid)]
    for lid in missing:
        report.add(1, f"snapshot {sid}: layer {lid} of its chain is missing")
    if missing:
        return
    try:
        with sm.layers.mounted(rec.layers, repair=False) as lowers:
            if len(lowers) == 1:
                _compare_layers(sm, sid, rec, lowers[0], report)
                return
            with tempfile.TemporaryDirectory(prefix="cascowfs-fsck-") as mnt:
                overlay.mount_overlay(Path(mnt), lowers, readonly=True)
                try:
                    _compare_layers(sm, sid, rec, Path(mnt), report)
                finally:
                    # detached lazily: a passing reader (a walk of /tmp) must not make it
                    # EBUSY and leak the mount, and nothing of ours is left inside it
                    overlay.unmount(Path(mnt))
    except StoreIOError as exc:
        report.add(1, f"snapshot {sid}: its layers do not mount: {exc}")
    except OSError as exc:  # a layer gone meanwhile, or an image the kernel finds corrupt
        report.add(1, f"snapshot {sid}: its layers cannot be read: {exc}")
    finally:
        sm.layers.unmount_unused()


def _compare_layers(
    sm: StateManager, sid: str, rec: SnapshotRecord, shown: Path, report: FsckReport
) -> None:
    got = _scan_tree(shown)
    if got[1] is None:
        report.add(1, f"snapshot {sid}: layer chain cannot be read")
        return
    got_view = comparable(got[0], got[1])
    want = sm.root_of(rec.root)
    assert want is not None  # every snapshot records its tree
    want_view = comparable(sm.trees, want)
    diffs = sorted(
        k
        for k in got_view.keys() | want_view.keys()
        if got_view.get(k) != want_view.get(k)
        and not _same_bytes_other_id(sm, shown / os.fsdecode(k), got_view.get(k), want_view.get(k))
    )
    if diffs:
        report.add(5, f"snapshot {sid}: its layers differ from its tree at {diffs[:5]}")


_REF = 5  # where a file's content id sits in a ``comparable`` view


def _same_bytes_other_id(
    sm: StateManager, path: Path, got: tuple | None, want: tuple | None
) -> bool:
    """Whether a file differs only in its content id, its bytes the same: content stored by
    an older store format (zero runs as chunks) has another id than a fresh cut gives it."""
    if got is None or want is None or len(got) != len(want) or len(got) <= _REF:
        return False
    if got[:_REF] + got[_REF + 1 :] != want[:_REF] + want[_REF + 1 :]:
        return False
    with open(path, "rb") as f:
        for piece in sm.content.pieces(want[_REF]):
            expected: bytes | None
            if isinstance(piece, int):  # a hole: that many zeros
                expected, length = None, piece
            else:
                expected, length = piece, len(piece)
            while length:
                read = f.read(min(length, STREAM_PIECE))
                if not read or read != (
                    expected[: len(read)] if expected is not None else bytes(len(read))
                ):
                    return False
                if expected is not None:
                    expected = expected[len(read) :]
                length -= len(read)
        return not f.read(1)


def _scan_tree(path: Path) -> tuple[TreeStore, Entry | None]:
    sink = ObjectSink()
    trees: dict[bytes, dict[bytes, Entry]] = {}
    root = finalize(
        scan_directory(path, sink, prepare=identify_content),
        sink,
        remember=listings_into(trees),
    )
    return _MemoryTrees(trees), root


class _MemoryTrees(TreeStore):
    def __init__(self, trees: dict[bytes, dict[bytes, Entry]]) -> None:  # noqa: D107
        self._trees = trees

    def get(self, tree_id, txn=None, extra=None):
        return self._trees[tree_id]


def comparable(trees: TreeStore, root: Entry) -> dict:
    """path -> everything a reader sees, with hard links as groups of paths (a group of one is
    no group: a member left alone by a copy-up keeps its old key)."""
    view: dict = {b"": (root.mode, root.uid, root.gid, root.mtime_ns, root.xattrs)}
    groups: dict[bytes, list[bytes]] = {}
    for path, e in trees.walk(root):
        if e.is_dir:
            view[path] = (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)
        else:
            view[path] = (e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ref, e.rdev, e.xattrs)
            if e.link:
                groups.setdefault(e.link, []).append(path)
    for members in groups.values():
        if len(members) > 1:
            for p in members:
                view[p] = view[p] + (tuple(sorted(members)),)
    return view
