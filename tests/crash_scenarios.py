"""The crash scenarios shared by the kill -9 tests (test_crash_recovery) and the power-cut
tests (test_power_cut): a prepared store, a child process that runs one operation (armed to
SIGKILL itself at a crash point), and what each operation must look like afterwards."""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import assert_same_view, dir_view, mounts_below, snapshot_view
from support.processes import run_until_killed
from support.store_formats import count_layers_by_chain
from cascowfs import collector, overlay
from cascowfs.direct_image import SETTLED_NS
from cascowfs.episodes import FindQuery, Predicate, parse_predicate
from cascowfs.errors import ExistsError, NotFoundError
from cascowfs.metadb import MetaDB
from cascowfs.state import StateManager

# The step after which an operation is durable (its LMDB transaction committed).
# a collection follows an applied prune; a commit's layer is written after the commit
# a label is durable once its WAL record is flushed ("logged"), before LMDB applies it
APPLIED_STEPS = {"logged", "applied", "switched", "marked", "swept", "written", "placed"}
NOT_APPLIED_STEPS = {"prepared", "mounted", "sealing", "chunks", "staged", "moved", "fetched"}

CHILD = r"""
import sys
from cascowfs.episodes import FindQuery
from cascowfs.state import StateManager
from cascowfs.tuning import Tuning
store, op = sys.argv[1], sys.argv[2]
sm = StateManager.open(store, tuning=Tuning(sweep_slice=1) if op == "collect" else Tuning())
if op == "import":
    sm.import_tree(sys.argv[3], "imp", labels={"from": "child"})
elif op == "branch":
    sm.create_branch("nb", "base")
elif op == "commit":
    sm.commit("work", "c1", labels={"k": "v"})
elif op == "rebase":
    sm.rebase("clean", "other")
elif op == "reset":
    sm.reset("work", "other")
elif op == "label":
    sm.label("deep1", {"visits": "7", "value": "0.25"})
    sm.find(FindQuery())  # waits for LMDB to apply it (label_applies.py): label.applied
elif op == "discard":
    sm.discard("work")
elif op == "prune":
    sm.prune("other")
elif op == "flatten":
    sm.flatten("deep2")
elif op == "collect":  # a prune, then a collection cut in the middle of its sweep
    sm.prune("other")
    sm.collect()
elif op == "upgrade":
    pass  # opening a format 7 store (as_format_7) upgraded it
elif op == "pull":  # "other" to a file:// remote, gone from the store, then pulled back
    from cascowfs.remote import config, objectstore, transfer
    remote = objectstore.open_store(config.RemoteSpec("r", f"file://{store}-remote"))
    transfer.push(sm, remote, ["other"])
    sm.prune("other")
    sm.gc()
    transfer.pull(sm, remote, ["other"])
else:
    raise SystemExit(f"unknown op {op}")
sm.close()
print("COMPLETED")
"""


def make_source(root: Path, seed: int, files: int = 12) -> Path:
    """A small tree with every kind of entry the store keeps."""
    rng = random.Random(seed)
    (root / "dir" / "sub").mkdir(parents=True)
    for i in range(3):
        (root / "dir" / "sub" / f"gone{i}").write_bytes(b"to be deleted %d" % i)
    for i in range(files):
        where = rng.choice([root, root / "dir", root / "dir" / "sub"])
        (where / f"f{i}").write_bytes(rng.randbytes(rng.choice([0, 10, 3000, 90_000])))
    (root / "top").write_bytes(b"top %d" % seed)
    os.link(root / "top", root / "hard")
    os.symlink("dir/sub", root / "link")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "dir", b"user.tag", b"seed%d" % seed)
    os.chmod(root / "dir" / "sub", 0o750)
    os.chown(root / "dir", 1000, 1000)
    return root


@dataclass
class Before:
    """Everything observable before the crash."""

    snaps: dict[str, dict] = field(default_factory=dict)
    branches: dict[str, dict] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)
    status: dict[str, list[str]] = field(default_factory=dict)
    chains: dict[str, int] = field(default_factory=dict)
    import_src: Path | None = None
    import_view: dict | None = None


def prepare_store(store: Path, work: Path, *, settled_import: bool = False) -> Before:
    """base and other (imports), deep0..deep2 (a chain of 4 layers), branch ``work`` on base
    with uncommitted edits of every kind, branch ``clean`` on base without edits. Closed
    afterwards with the branches left mounted (as a daemon leaves them). ``settled_import``:
    the source of the import under test is left alone for SETTLED_NS before this returns, so
    that the import writes its image straight from it (``direct_image.py``), as a root import
    of a settled tree does."""
    before = Before()
    before.import_src = make_source(work / "src2", 2, files=40)
    settled_at = time.monotonic() + (SETTLED_NS / 1e9 + 0.1 if settled_import else 0)
    sm = StateManager.open(store)
    try:
        sm.import_tree(make_source(work / "src0", 0), "base")
        sm.import_tree(make_source(work / "src1", 1), "other")
        parent = "base"
        for i in range(3):
            tree = sm.create_branch(f"tmp{i}", parent).tree
            (tree / f"deep{i}").write_bytes(b"deep %d" % i)
            (tree / "dir" / "sub" / f"gone{i}").unlink()  # a whiteout in each delta
            parent = sm.commit(f"tmp{i}", f"deep{i}")
            sm.discard(f"tmp{i}")
        tree = sm.create_branch("work", "base").tree
        (tree / "new").write_bytes(b"new file")
        (tree / "big").write_bytes(random.Random(5).randbytes(300_000))
        with open(tree / "dir" / "sub" / sorted(os.listdir(tree / "dir" / "sub"))[0], "ab") as fh:
            fh.write(b"appended")
        os.rename(tree / "dir", tree / "moved")
        os.unlink(tree / "fifo")
        os.chmod(tree / "moved" / "sub", 0o700)
        os.setxattr(tree / "new", b"user.x", b"1")
        os.link(tree / "new", tree / "new-link")
        os.symlink("new", tree / "new-sym")
        sm.create_branch("clean", "base")
        sm.settle()  # layer merges run in the background after each commit
        for s in sm.snapshots():
            before.snaps[s.id] = snapshot_view(sm, s.id)
            before.chains[s.id] = len(sm.layer_chain(s.id))
        for b in sm.branches():
            before.branches[b.name] = dir_view(b.tree)
            before.parents[b.name] = b.parent
            before.status[b.name] = [c.line() for c in sm.status(b.name)]
        assert before.status["work"] and not before.status["clean"]
        assert before.chains["deep2"] >= 2, "deep2 must have a chain for flatten to replace"
        before.import_view = dir_view(before.import_src)
    finally:
        sm.close()
    time.sleep(max(0.0, settled_at - time.monotonic()))
    return before


# ----------------------------------------------------------------------------------------
# what each operation must look like afterwards
# ----------------------------------------------------------------------------------------
def unchanged_except(sm, before: Before, snaps: set[str] = set(), branches: set[str] = set()):
    for sid, view in before.snaps.items():
        if sid not in snaps:
            assert_same_view(snapshot_view(sm, sid), view, f"untouched snapshot {sid}")
    for name, view in before.branches.items():
        if name not in branches:
            info = sm.branch(name)
            assert info.parent == before.parents[name], f"branch {name} changed parent"
            assert_same_view(dir_view(info.tree), view, f"untouched branch {name}")
            assert [c.line() for c in sm.status(name)] == before.status[name]


def branch_shows(sm, sid: str, view: dict, name: str = "verify") -> None:
    """A new branch on ``sid`` (mounted on its layer chain) shows ``view``; then goes."""
    tree = sm.create_branch(name, sid).tree
    try:
        assert_same_view(dir_view(tree), view, f"a new branch on {sid}")
    finally:
        sm.discard(name)


def verify_import(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before)
    if applied:
        assert_same_view(snapshot_view(sm, "imp"), before.import_view, "recovered import")
        assert sm.snapshot("imp").labels == {"from": "child"}
        branch_shows(sm, "imp", before.import_view)
        with pytest.raises(ExistsError):
            sm.import_tree(before.import_src, "imp")
    else:
        assert "imp" not in {s.id for s in sm.snapshots()}
        sm.import_tree(before.import_src, "imp")
        assert_same_view(snapshot_view(sm, "imp"), before.import_view, "import after rollback")


def verify_branch(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before)
    if applied:
        info = sm.branch("nb")
        assert info.parent == "base"
        assert_same_view(dir_view(info.tree), before.snaps["base"], "recovered branch")
        assert sm.status("nb") == []
        with pytest.raises(ExistsError):
            sm.create_branch("nb", "base")
    else:
        assert "nb" not in {b.name for b in sm.branches()}
        assert not mounts_below(sm.store / "branches" / "nb")
        info = sm.create_branch("nb", "base")
        assert_same_view(dir_view(info.tree), before.snaps["base"], "branch after rollback")


def verify_commit(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before, branches={"work"})
    info = sm.branch("work")
    assert_same_view(dir_view(info.tree), before.branches["work"],
                     "the committed branch itself (processes in it must not be disturbed)")
    if applied:
        assert info.parent == "c1" and info.last_commit == "c1"
        assert sm.status("work") == []
        assert_same_view(snapshot_view(sm, "c1"), before.branches["work"], "recovered commit")
        meta = sm.snapshot("c1")
        assert (meta.parent, meta.labels) == ("base", {"k": "v"})
        assert [c.line() for c in sm.diff("base", "c1")] == before.status["work"]
        branch_shows(sm, "c1", before.branches["work"])
        with pytest.raises(ExistsError):
            sm.commit("work", "c1")
    else:
        assert "c1" not in {s.id for s in sm.snapshots()}
        assert info.parent == "base"
        assert [c.line() for c in sm.status("work")] == before.status["work"]
        sm.commit("work", "c1")
        assert_same_view(snapshot_view(sm, "c1"), before.branches["work"], "commit after rollback")
        branch_shows(sm, "c1", before.branches["work"])


def verify_rebase(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before, branches={"clean"})
    info = sm.branch("clean")
    assert sm.status("clean") == []
    if applied:
        assert info.parent == "other"
        assert_same_view(dir_view(info.tree), before.snaps["other"], "recovered re-base")
    else:
        assert info.parent == "base"
        assert_same_view(dir_view(info.tree), before.snaps["base"], "branch after rolled back re-base")
        info = sm.rebase("clean", "other")
        assert_same_view(dir_view(info.tree), before.snaps["other"], "re-base after rollback")


def verify_reset(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before, branches={"work"})
    info = sm.branch("work")
    if applied:
        assert info.parent == "other" and sm.status("work") == []
        assert_same_view(dir_view(info.tree), before.snaps["other"], "recovered reset")
    else:
        assert info.parent == "base"
        assert_same_view(dir_view(info.tree), before.branches["work"], "branch after rolled back reset")
        assert [c.line() for c in sm.status("work")] == before.status["work"]
        info = sm.reset("work", "other")
        assert_same_view(dir_view(info.tree), before.snaps["other"], "reset after rollback")
    assert {s.id for s in sm.snapshots()} == set(before.snaps)  # a reset makes no snapshot


def verify_label(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before)
    labels = sm.snapshot("deep1").labels
    if applied:
        assert labels == {"visits": "7", "value": "0.25"}
    else:
        assert labels == {}
        assert sm.find(FindQuery(predicates=(Predicate("visits"),))) == []
        sm.label("deep1", {"visits": "7", "value": "0.25"})
    assert sm.find(FindQuery(predicates=(Predicate("visits"),))) == ["deep1"]
    assert sm.find(FindQuery(predicates=(parse_predicate("value<0.5"),))) == ["deep1"]


def verify_discard(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before, branches={"work"})
    if applied:
        assert "work" not in {b.name for b in sm.branches()}
        assert not mounts_below(sm.store / "branches" / "work")
        with pytest.raises(NotFoundError):
            sm.discard("work")
    else:
        info = sm.branch("work")
        assert_same_view(dir_view(info.tree), before.branches["work"], "branch after rolled back discard")
        assert [c.line() for c in sm.status("work")] == before.status["work"]
        sm.discard("work")


def verify_prune(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before, snaps={"other"})
    if applied:
        assert "other" not in {s.id for s in sm.snapshots()}
        with pytest.raises(NotFoundError):
            sm.prune("other")
    else:
        assert_same_view(snapshot_view(sm, "other"), before.snaps["other"], "snapshot after rolled back prune")
        branch_shows(sm, "other", before.snaps["other"])
        sm.prune("other")
    sm.gc()


def verify_flatten(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before)
    chain = len(sm.layer_chain("deep2"))
    if applied:
        assert chain == 1, f"flatten rolled forward, yet deep2 has {chain} layers"
    else:
        assert chain == before.chains["deep2"], "a rolled back flatten changed the chain"
        sm.flatten("deep2")
        assert len(sm.layer_chain("deep2")) == 1
    branch_shows(sm, "deep2", before.snaps["deep2"])


def verify_collect(sm, before: Before, applied: bool) -> None:
    """A collection cut short deletes only garbage (everything live reads back, checked by
    fsck's deep check too), and the next one takes the rest."""
    assert applied, "a collection runs only after its prune applied"
    verify_prune(sm, before, applied)  # ends with a gc: the rest of the garbage goes
    with sm.db.read() as txn:
        assert not collector.garbage(txn, sm.db.dbs)
        assert not sm.collection_pending(txn)


def as_format_7(store: Path) -> None:
    """Rewrite a closed store as format 7 left it: each branch's upper/ and work/ beside its
    tree, mounted from there if it was mounted (a branch mount outlives its daemon)."""
    for name in sorted(os.listdir(store / "branches")):
        bdir = store / "branches" / name
        mounts = [m for m in overlay.all_mounts() if m.target == str(bdir / "tree")]
        overlay.unmount_stacked(bdir / "tree")
        os.rename(bdir / "private" / "upper", bdir / "upper")
        shutil.rmtree(bdir / "private")  # a volatile mount wants a fresh work dir
        (bdir / "work").mkdir()
        if mounts:
            lowers = [Path(p) for p in overlay.overlay_dirs(mounts[-1]).lowers]
            overlay.mount_overlay(bdir / "tree", lowers, bdir / "upper", bdir / "work")
    db = MetaDB(store / "meta")
    try:
        db.write(lambda txn: (count_layers_by_chain(db, txn),
                              txn.put(b"format", b"7", db=db.db("meta"))))
    finally:
        db.close()


def verify_upgrade(sm, before: Before, applied: bool) -> None:
    unchanged_except(sm, before)
    for name in before.branches:
        bdir = sm.branches_dir / name
        assert sorted(os.listdir(bdir)) == ["private", "tree"], name
        [mount] = [m for m in overlay.all_mounts() if m.target == str(bdir / "tree")]
        assert overlay.overlay_dirs(mount).upper == str(bdir / "private" / "upper")


def verify_pull(sm, before: Before, applied: bool) -> None:
    """The child pushed "other", pruned it (and collected its objects) and pulled it back."""
    from cascowfs.remote import config, objectstore, transfer

    unchanged_except(sm, before, snaps={"other"})
    remote = objectstore.open_store(config.RemoteSpec("r", f"file://{sm.store}-remote"))
    if applied:
        assert transfer.pull(sm, remote, ["other"]).skipped == ["other"]
    else:
        assert "other" not in {s.id for s in sm.snapshots()}
        assert transfer.pull(sm, remote, ["other"]).snapshots == ["other"]
    assert_same_view(snapshot_view(sm, "other"), before.snaps["other"], "pulled snapshot")
    branch_shows(sm, "other", before.snaps["other"])


VERIFY = {"import": verify_import, "branch": verify_branch, "commit": verify_commit,
          "rebase": verify_rebase, "reset": verify_reset, "label": verify_label,
          "discard": verify_discard, "prune": verify_prune, "flatten": verify_flatten,
          "collect": verify_collect, "upgrade": verify_upgrade, "pull": verify_pull}


# A child that loops over random operations until killed; prints what each did
LOOP = r"""
import errno, os, random, sys
from pathlib import Path
from cascowfs.errors import CascowfsError
from cascowfs.state import StateManager
store, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
sm = StateManager.open(store)
print("open", flush=True)
n = 0
while True:
    n += 1
    op = rng.choice(["branch", "edit", "edit", "commit", "commit", "discard", "prune", "flatten",
                     "import", "rebase"])
    target = ""
    try:
        snaps = sorted(s.id for s in sm.snapshots())
        branches = sorted(b.name for b in sm.branches())
        parents = {b.parent for b in sm.branches()}
        if op == "import" or not snaps:
            op, target = "import", f"i{seed}-{n}"
            src = Path(store).parent / f"loop-src-{seed}-{n}"
            try:  # next to the store: a failing disk fails these writes
                src.mkdir()
                for i in range(rng.randrange(1, 30)):
                    (src / f"f{i}").write_bytes(rng.randbytes(rng.choice([5, 500, 50_000])))
            except OSError as exc:
                print("refused", op, errno.errorcode[exc.errno], exc, flush=True)
                continue
            sm.import_tree(src, target)
        elif op == "branch" or not branches:
            op, target = "branch", f"b{seed}-{n}"
            sm.create_branch(target, rng.choice(snaps))
        elif op == "edit":
            tree = sm.branch(rng.choice(branches)).tree
            try:  # the branch's own files: a failing disk fails these writes
                for i in range(rng.randrange(1, 20)):
                    (tree / f"e{n}-{i}").write_bytes(rng.randbytes(rng.choice([5, 5000, 200_000])))
                names = sorted(os.listdir(tree))
                if names and rng.random() < 0.5:
                    victim = tree / rng.choice(names)
                    if victim.is_file():
                        victim.unlink()
            except OSError as exc:
                print("refused", op, errno.errorcode[exc.errno], exc, flush=True)
                continue
        elif op == "commit":
            target = f"c{seed}-{n}"
            sm.commit(rng.choice(branches), target)
        elif op == "discard":
            target = rng.choice(branches)
            print("doing", n, op, target, flush=True)  # gone or not, if cut short here
            sm.discard(target)
        elif op == "prune":
            free = [s for s in snaps if s not in parents]
            if len(free) > 2:
                target = rng.choice(free)
                print("doing", n, op, target, flush=True)
                sm.prune(target)
        elif op == "flatten":
            sm.flatten(rng.choice(snaps))
        elif op == "rebase":
            sm.rebase(rng.choice(branches), rng.choice(snaps + [None]))  # EBUSY if modified
    except CascowfsError as exc:
        print("refused", op, errno.errorcode[exc.errno], exc, flush=True)
        continue
    print("done", n, op, target, flush=True)
"""


@dataclass
class Returned:
    """What the output of LOOP children says the store must and must not hold: every call
    that returned is durable; a discard or prune cut short may or may not have happened."""

    snaps: set[str] = field(default_factory=set)
    branches: set[str] = field(default_factory=set)
    gone_snaps: set[str] = field(default_factory=set)
    gone_branches: set[str] = field(default_factory=set)

    def note(self, stdout: str) -> None:
        in_flight = None
        for line in stdout.splitlines(keepends=True):
            words = line.split()
            if not line.endswith("\n") or len(words) != 4:
                continue
            op, target = words[2], words[3]
            if words[0] == "doing":
                in_flight = (op, target)
                continue
            if words[0] != "done":
                continue
            in_flight = None
            if op in ("import", "commit"):
                self.snaps.add(target)
            elif op == "prune":
                self.snaps.discard(target)
                self.gone_snaps.add(target)
            elif op == "branch":
                self.branches.add(target)
            elif op == "discard":
                self.branches.discard(target)
                self.gone_branches.add(target)
        if in_flight:
            (self.snaps if in_flight[0] == "prune" else self.branches).discard(in_flight[1])

    def check(self, sm) -> None:
        snaps = {s.id for s in sm.snapshots()}
        branches = {b.name for b in sm.branches()}
        assert self.snaps <= snaps, f"returned, then lost: {self.snaps - snaps}"
        assert not self.gone_snaps & snaps, f"pruned, then back: {self.gone_snaps & snaps}"
        assert self.branches <= branches, f"returned, then lost: {self.branches - branches}"
        assert not self.gone_branches & branches, f"discarded, then back: {self.gone_branches & branches}"


def run_loop_until_killed(store: Path, seed: int, meanwhile: Callable[[], None]) -> str:
    """Run LOOP on ``store`` until killed (``run_until_killed``): ``meanwhile`` runs once it
    has opened the store. Returns what it printed."""
    return run_until_killed(LOOP, [str(store), str(seed)], meanwhile)
