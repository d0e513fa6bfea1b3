"""kill -9 at every step of every operation (SPEC §5, §7).

For EVERY name in ``cascowfs.crashpoints.CRASH_POINTS``: a child Python process opens a
prepared store and runs the operation with ``CASCOWFS_CRASH_AT=<point>``, so that it SIGKILLs
itself exactly there (the test fails if the child is not killed: a point that is never reached
is a point that is never tested). Branch overlay mounts outlive the child, as they outlive a
killed daemon. Then this process reopens the store (WAL replay, reconciliation) and asserts

* fsck of the closed store is clean, deep check included (all five invariants);
* all-or-nothing for the interrupted operation: killed before its APPLY step it is absent and
  everything it touched is as before (e.g. the branch of an interrupted commit shows the same
  files and the same status); killed after, it is fully there (the snapshot holds exactly the
  branch's content, a new branch from it shows exactly that, the branch's parent moved);
* nothing else changed: every other snapshot and branch reads back exactly as before;
* the operation can then be run again and does the right thing (succeeds if it had been rolled
  back, reports that it exists / is gone if it had been rolled forward).

A last test kills a child that loops over random operations at random moments (not only at
the named points) and checks the store after each kill.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import conftest
from conftest import (REPO, assert_fsck_clean, assert_same_view, check_live, child_env,
                      dir_view, force_unmount_below, mounts_below, needs_overlay, open_store,
                      run_child, snapshot_view)
from cascowfs.crashpoints import CRASH_POINTS
from cascowfs.errors import ExistsError, NotFoundError
from cascowfs.state import StateManager

pytestmark = needs_overlay

# The step after which an operation is durable (its LMDB transaction committed).
APPLIED_STEPS = {"applied", "switched"}
NOT_APPLIED_STEPS = {"prepared", "chunks", "staged"}

CHILD = r"""
import sys
from cascowfs.state import StateManager
store, op = sys.argv[1], sys.argv[2]
sm = StateManager.open(store)
if op == "import":
    sm.import_tree(sys.argv[3], "imp", labels={"from": "child"})
elif op == "branch":
    sm.create_branch("nb", "base")
elif op == "commit":
    sm.commit("work", "c1", labels={"k": "v"})
elif op == "rebase":
    sm.rebase("clean", "other")
elif op == "discard":
    sm.discard("work")
elif op == "prune":
    sm.prune("other")
elif op == "flatten":
    sm.flatten("deep2")
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


def prepare_store(store: Path, work: Path) -> Before:
    """base and other (imports), deep0..deep2 (a chain of 4 layers), branch ``work`` on base
    with uncommitted edits of every kind, branch ``clean`` on base without edits. Closed
    afterwards with the branches left mounted (as a daemon leaves them)."""
    before = Before()
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
        before.import_src = make_source(work / "src2", 2, files=40)
        before.import_view = dir_view(before.import_src)
    finally:
        sm.close()
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


VERIFY = {"import": verify_import, "branch": verify_branch, "commit": verify_commit,
          "rebase": verify_rebase, "discard": verify_discard, "prune": verify_prune,
          "flatten": verify_flatten}


def test_every_crash_point_has_a_scenario():
    """A new crash point without a scenario here must fail, not be silently skipped."""
    for point in CRASH_POINTS:
        op, _, step = point.partition(".")
        assert op in VERIFY, f"no crash scenario for operation {op!r} ({point})"
        assert step in APPLIED_STEPS | NOT_APPLIED_STEPS, f"unknown step {step!r} ({point})"


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_crash_point(point, tmp_path):
    op, _, step = point.partition(".")
    if op not in VERIFY or step not in APPLIED_STEPS | NOT_APPLIED_STEPS:
        pytest.fail(f"no scenario for crash point {point}")
    store = tmp_path / "store"
    conftest._STORES.append(store)
    try:
        before = prepare_store(store, tmp_path)
        args = [str(before.import_src)] if op == "import" else []
        proc = run_child(CHILD, str(store), op, *args, crash_at=point)
        assert proc.returncode == -signal.SIGKILL, (
            f"the child was not killed at {point} (exit {proc.returncode}): the point is not "
            f"reached by {op}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")

        # recovery: reopen (replay + reconcile), close leaving branches mounted, fsck
        StateManager.open(store).close()
        assert_fsck_clean(store, deep=True)

        with open_store(store) as sm:
            VERIFY[op](sm, before, step in APPLIED_STEPS)
            check_live(sm, deep=True)
    finally:
        try:  # the child's mounts and whatever a failed check left behind
            with open_store(store):
                pass
        finally:
            force_unmount_below(store)


def test_crash_leaves_branch_mounts_that_reopen_adopts(tmp_path):
    """A killed process leaves its branch mounts: reopening must adopt them (same mount, a
    process inside keeps working) rather than stack a second mount or drop the first."""
    store = tmp_path / "store"
    conftest._STORES.append(store)
    try:
        before = prepare_store(store, tmp_path)
        proc = run_child(CHILD, str(store), "commit", crash_at="commit.switched")
        assert proc.returncode == -signal.SIGKILL
        tree = store / "branches" / "work" / "tree"
        ids_before = [m.mount_id for m in mounts_below(tree)]
        assert len(ids_before) == 1, f"expected the branch mount to survive the kill: {ids_before}"
        fd = os.open(tree / "new", os.O_RDONLY)  # a process working inside the branch
        try:
            with open_store(store) as sm:
                assert [m.mount_id for m in mounts_below(tree)] == ids_before, \
                    "reopen replaced a live, correct branch mount"
                assert os.pread(fd, 100, 0) == b"new file"
                assert_same_view(dir_view(tree), before.branches["work"], "adopted branch")
        finally:
            os.close(fd)
    finally:
        force_unmount_below(store)


# ----------------------------------------------------------------------------------------
# kill at random moments
# ----------------------------------------------------------------------------------------
LOOP = r"""
import os, random, sys
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
    snaps = sorted(s.id for s in sm.snapshots())
    branches = sorted(b.name for b in sm.branches())
    parents = {b.parent for b in sm.branches()}
    op = rng.choice(["branch", "edit", "edit", "commit", "commit", "discard", "prune", "flatten",
                     "import", "rebase"])
    try:
        if op == "import" or not snaps:
            src = Path(store).parent / f"loop-src-{seed}-{n}"
            src.mkdir()
            for i in range(rng.randrange(1, 30)):
                (src / f"f{i}").write_bytes(rng.randbytes(rng.choice([5, 500, 50_000])))
            sm.import_tree(src, f"i{seed}-{n}")
        elif op == "branch" or not branches:
            sm.create_branch(f"b{seed}-{n}", rng.choice(snaps))
        elif op == "edit":
            tree = sm.branch(rng.choice(branches)).tree
            for i in range(rng.randrange(1, 20)):
                (tree / f"e{n}-{i}").write_bytes(rng.randbytes(rng.choice([5, 5000, 200_000])))
            names = sorted(os.listdir(tree))
            if names and rng.random() < 0.5:
                victim = tree / rng.choice(names)
                if victim.is_file():
                    victim.unlink()
        elif op == "commit":
            sm.commit(rng.choice(branches), f"c{seed}-{n}")
        elif op == "discard":
            sm.discard(rng.choice(branches))
        elif op == "prune":
            free = [s for s in snaps if s not in parents]
            if len(free) > 2:
                sm.prune(rng.choice(free))
        elif op == "flatten":
            sm.flatten(rng.choice(snaps))
        elif op == "rebase":
            sm.rebase(rng.choice(branches), rng.choice(snaps + [None]))  # EBUSY if modified
    except CascowfsError as exc:
        print("refused", op, exc, flush=True)
    print("done", n, op, flush=True)
"""


def test_kill_at_random_moments(tmp_path):
    store = tmp_path / "store"
    conftest._STORES.append(store)
    rng = random.Random(1234)
    try:
        StateManager.open(store).close()
        for round_no in range(10):
            proc = subprocess.Popen([sys.executable, "-c", LOOP, str(store), str(round_no)],
                                    cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                assert proc.stdout.readline().strip() == "open", proc.stderr.read()
                time.sleep(rng.uniform(0.05, 0.8))
            finally:
                proc.kill()
                out, err = proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL, f"the loop died on its own:\n{err}"
            assert "Traceback" not in err, err
            StateManager.open(store).close()
            assert_fsck_clean(store, deep=True)
            sm = StateManager.open(store)
            try:
                for s in sm.snapshots():
                    snapshot_view(sm, s.id)  # reads every byte back, checks the totals
                for b in sm.branches():
                    sm.status(b.name)
                check_live(sm)
            finally:
                sm.close()  # branches stay mounted for the next round, as a daemon leaves them
        for entry in os.listdir(tmp_path):
            if entry.startswith("loop-src-"):
                shutil.rmtree(tmp_path / entry)
    finally:
        try:
            with open_store(store):
                pass
        finally:
            force_unmount_below(store)
