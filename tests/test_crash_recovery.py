"""kill -9 at every step of every operation (docs/architecture.md, Recovery and Guarantees).

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
import subprocess
import sys
import time

import pytest

from conftest import (REPO, alive, assert_fsck_clean, assert_same_view, check_live, child_env,
                      descendant_processes, dir_view, force_unmount_below, mounts_below,
                      needs_overlay, open_store, run_child, snapshot_view)
from crash_scenarios import (APPLIED_STEPS, CHILD, NOT_APPLIED_STEPS, VERIFY, as_format_7,
                             prepare_store, run_loop_until_killed)
from support.processes import read_first_line, run_until_killed
from cascowfs.crashpoints import CRASH_POINTS
from cascowfs.layers import remove_within_filesystem
from cascowfs.state import StateManager

pytestmark = needs_overlay


def test_every_crash_point_has_a_scenario():
    """A new crash point without a scenario here must fail, not be silently skipped."""
    for point in CRASH_POINTS:
        op, _, step = point.partition(".")
        assert op in VERIFY, f"no crash scenario for operation {op!r} ({point})"
        assert step in APPLIED_STEPS | NOT_APPLIED_STEPS, f"unknown step {step!r} ({point})"


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_crash_point(point, tmp_path, track_store):
    op, _, step = point.partition(".")
    if op not in VERIFY or step not in APPLIED_STEPS | NOT_APPLIED_STEPS:
        pytest.fail(f"no scenario for crash point {point}")
    store = track_store(tmp_path / "store")
    try:
        before = prepare_store(store, tmp_path, settled_import=op == "import")
        if op == "upgrade":
            as_format_7(store)
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


def test_crash_leaves_branch_mounts_that_reopen_adopts(tmp_path, track_store):
    """A killed process leaves its branch mounts: reopening must adopt them (same mount, a
    process inside keeps working) rather than stack a second mount or drop the first."""
    store = track_store(tmp_path / "store")
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


def test_a_killed_child_loses_none_of_the_lines_it_printed():
    """Lines a looping child prints right after "open", in the same write (on a loaded machine
    they pile up in the pipe before this process reads "open"), all reach the output the loop
    tests judge the store by: a lost "done N prune ID" makes a prune that returned look like
    lost data, a lost "done N import ID" hides an import from the check."""
    lines = [f"done {n} prune s{n}" for n in range(1, 60)]
    printed = "".join(f"{line}\n" for line in ["open", *lines])  # one write, under PIPE_BUF
    child = f"import sys, time\nsys.stdout.write({printed!r})\nsys.stdout.flush()\ntime.sleep(600)"
    assert run_until_killed(child, [], lambda: None).splitlines() == lines


def test_kill_at_random_moments(tmp_path, track_store):
    store = track_store(tmp_path / "store")
    rng = random.Random(1234)
    try:
        StateManager.open(store).close()
        for round_no in range(10):
            run_loop_until_killed(store, round_no, lambda: time.sleep(rng.uniform(0.05, 0.8)))
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


def test_lost_layer_directories_are_rebuilt_in_place(tmp_path, track_store):
    """Layers are a cache of the CAS: with every layer directory deleted, reopening rebuilds
    each under its own id (chains keep their length: nothing is flattened into full copies),
    and every snapshot and branch, uncommitted changes included, reads back exactly."""
    store = track_store(tmp_path / "store")
    try:
        before = prepare_store(store, tmp_path)
        with open_store(store):
            pass  # branches unmounted, so that their layers can go
        for entry in os.listdir(store / "layers"):
            remove_within_filesystem(store / "layers" / entry)
        with open_store(store) as sm:
            for sid, view in before.snaps.items():
                assert len(sm.layer_chain(sid)) == before.chains[sid], f"{sid} was re-layered"
                assert_same_view(snapshot_view(sm, sid), view, f"snapshot {sid}")
            for name, view in before.branches.items():
                assert_same_view(dir_view(sm.branch(name).tree), view, f"branch {name}")
            for sid, view in before.snaps.items():
                tree = sm.create_branch(f"on-{sid}", sid).tree
                assert_same_view(dir_view(tree), view, f"a new branch on {sid}")
            check_live(sm, deep=True)
    finally:
        force_unmount_below(store)


# ----------------------------------------------------------------------------------------
# kill during a big import: the forked workers
# ----------------------------------------------------------------------------------------

IMPORT_WITH_WORKERS = r"""
import sys
from cascowfs import import_workers
from cascowfs.state import StateManager
import_workers.PROCESS_POOL_MIN_BYTES = 0  # take the process path whatever the size
sm = StateManager.open(sys.argv[1])
print("open", flush=True)
sm.import_tree(sys.argv[2], "big")
print("imported", flush=True)
"""


def _kill_left(pids: list[int]) -> None:
    """SIGKILL whatever of ``pids`` a failed check left running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_killed_import_leaves_no_worker_and_no_lock(tmp_path, track_store):
    """kill -9 of a process in the middle of a big import: its forked workers die with it and
    never held the store lock, so the store opens at once, without the import."""
    store = track_store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):
        (src / f"f{i}").write_bytes(os.urandom(256 << 10))
    proc = subprocess.Popen([sys.executable, "-c", IMPORT_WITH_WORKERS, str(store), str(src)],
                            cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        try:
            assert read_first_line(proc).strip() == "open", proc.stderr.read()
            deadline = time.monotonic() + 30
            while not workers and proc.poll() is None and time.monotonic() < deadline:
                workers = [p for p, _, _ in descendant_processes(proc.pid)]
                time.sleep(0.01)
        finally:
            proc.kill()
            # orphaned workers would hold the pipes open: read with a bound
            out, err = proc.communicate(timeout=20)
        assert workers, f"the import forked no worker before it ended:\n{out}\n{err}"
        assert "imported" not in out, "the import ended before the kill: make the source bigger"
        with open_store(store) as sm:  # StoreLockedError if a worker kept the lock
            assert [s.id for s in sm.snapshots()] == []
            check_live(sm, deep=True)
        deadline = time.monotonic() + 10
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, workers)), f"workers outlived the killed import: {workers}"
    finally:
        _kill_left(workers)
        force_unmount_below(store)


IMPORT_PRINTING_IMAGE_MODE = r"""
import sys
from cascowfs.state import StateManager
sm = StateManager.open(sys.argv[1])
print(sm.layers.image_mode, flush=True)
sm.import_tree(sys.argv[2], "big")
print("imported", flush=True)
"""


def test_a_killed_import_leaves_no_mkfs_erofs_writing_its_image(tmp_path, track_store):
    """kill -9 of an import while mkfs.erofs writes its layer's image (stopped there, so it
    cannot finish on its own): the kernel kills mkfs.erofs with it, and the store opens
    without the import and with its staging empty."""
    store = track_store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4000):
        (src / f"f{i}").write_bytes(os.urandom(16 << 10))
    proc = subprocess.Popen([sys.executable, "-c", IMPORT_PRINTING_IMAGE_MODE, str(store),
                             str(src)], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    mkfs: list[int] = []
    try:
        try:
            mode = read_first_line(proc).strip()
            if mode == "dir":
                pytest.skip("layers are directories here: no mkfs.erofs runs")
            deadline = time.monotonic() + 60
            while not mkfs and proc.poll() is None and time.monotonic() < deadline:
                mkfs = [pid for pid, _, cmd in descendant_processes(proc.pid)
                        if "mkfs.erofs" in cmd]
                time.sleep(0.005)
            for pid in mkfs:
                os.kill(pid, signal.SIGSTOP)
        finally:
            proc.kill()
            out, err = proc.communicate(timeout=20)
        assert mkfs, f"no mkfs.erofs seen before the import ended:\n{out}\n{err}"
        deadline = time.monotonic() + 10
        while any(map(alive, mkfs)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, mkfs)), f"mkfs.erofs outlived the killed import: {mkfs}"
        with open_store(store) as sm:
            assert [s.id for s in sm.snapshots()] == []
            assert os.listdir(store / "staging") == []
            check_live(sm, deep=True)
        assert_fsck_clean(store, deep=True)
    finally:
        _kill_left(mkfs)
        force_unmount_below(store)


def test_a_forked_child_does_not_hold_the_store_lock(tmp_path, track_store):
    """Whatever the engine forks (import workers) closes its copy of the store lock, so a child
    that lingers after its parent let go of the store keeps nobody out."""
    store = track_store(tmp_path / "store")
    release_r, release_w = os.pipe()
    sm = StateManager.open(store)
    child = os.fork()
    if child == 0:  # the child only waits: it must not run any of pytest's code
        os.read(release_r, 1)
        os._exit(0)
    try:
        sm.close()
        with open_store(store) as again:  # StoreLockedError if the child kept the lock
            check_live(again)
    finally:
        os.write(release_w, b"x")
        os.waitpid(child, 0)
        os.close(release_r)
        os.close(release_w)
        force_unmount_below(store)


# ----------------------------------------------------------------------------------------
# re-base and reset: the SWITCH, done or not, at the next open
# ----------------------------------------------------------------------------------------

REPOINT_CHILD = r"""
import os, signal, sys
from cascowfs.errors import NoSpaceError
from cascowfs.state import StateManager
store, base, other, how = sys.argv[1:5]
sm = StateManager.open(store)
sm.import_tree(base, "base")
sm.import_tree(other, "other")
tree = sm.create_branch("work", "base").tree
if how == "same-chain":  # reset onto the snapshot it is on, killed after its APPLY
    (tree / "dropped").write_text("changes the reset drops")
    sm.reset("work", "base")
elif how == "between-attach-and-drop":
    def killed(staged):
        (tree / "after").write_text("written once the new overlay is attached")
        os.kill(os.getpid(), signal.SIGKILL)
    sm._drop_staged = killed
    sm.reset("work", "other")
else:  # "<kind> without finalize": the op returns, its FINALIZE not written
    kind = how.split()[0]
    finalize, prepare, ops = sm.wal.finalize, sm.wal.prepare, set()
    def spying_prepare(k, **args):
        op = prepare(k, **args)
        if k == kind:
            ops.add(op)
        return op
    def failing_finalize(op):
        if op in ops:
            raise NoSpaceError("writing the write-ahead log: no space left (injected)")
        finalize(op)
    sm.wal.prepare, sm.wal.finalize = spying_prepare, failing_finalize
    getattr(sm, kind)("work", "other")
    (tree / "after").write_text("uncommitted work")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(
    "how",
    ["same-chain", "between-attach-and-drop", "reset without finalize", "rebase without finalize"],
)
def test_a_killed_repoint_is_settled_by_what_staging_still_holds(how, tmp_path, track_store):
    """The next open finishes a re-base or reset past its APPLY without losing what the
    branch holds: killed before its SWITCH, the old overlay (which may stack the very chain
    and upper path the record names, on a reset onto its own snapshot) must go with the
    changes the reset drops; killed once its new overlay is attached, or after the op
    returned without its FINALIZE, what was written into the branch since must stay."""
    store = track_store(tmp_path / "store")
    base, other = tmp_path / "src-base", tmp_path / "src-other"
    for src, word in ((base, "base"), (other, "other")):
        src.mkdir()
        (src / "which").write_text(f"{word}\n")
    try:
        crash_at = "reset.applied" if how == "same-chain" else None
        proc = run_child(REPOINT_CHILD, str(store), str(base), str(other), how, crash_at=crash_at)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        StateManager.open(store).close()  # recovery, leaving the branch mounted
        assert_fsck_clean(store, deep=True)
        with open_store(store) as sm:
            tree = sm.branch("work").tree
            if how == "same-chain":
                assert sm.branch("work").parent == "base"
                assert not (tree / "dropped").exists()
                assert sm.status("work") == []
            else:
                assert sm.branch("work").parent == "other"
                assert (tree / "which").read_text() == "other\n"
                assert [c.line() for c in sm.status("work")] == ["A after"]
            assert len(mounts_below(tree)) == 1
            check_live(sm, deep=True)
    finally:
        force_unmount_below(store)
