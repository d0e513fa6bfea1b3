"""Power cut at every step of every operation, and at random moments (docs/architecture.md).

A power cut drops every write the page cache holds and no sync forced to the disk. The store
lives on a fresh ext4 on a loop device, mounted with ``commit=600`` (so no periodic journal
commit saves unsynced metadata by luck); after the writer is killed, a copy of the disk image
taken *while still mounted* is exactly what the disk held: writes still in the page cache
never reached the image. The original is then torn down, the copy mounted in its place, and
the store reopened. Nothing is faked: the store tells the new mount from the one it last saw
(its page cache id, ``cascowfs/durability.py``) exactly as it tells a boot from the last.

After each cut the store must pass a deep fsck (every snapshot's layer chain, mounted, shows
exactly its tree: a layer torn by the cut fails it), every operation the writer saw return
must have its effect (a returned call is durable: docs/interface.md), and every branch must
have restarted from its parent snapshot (its upper directory is a volatile overlay's, which
nothing syncs: docs/operations.md).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (assert_fsck_clean, check_live, loop_ext4, mounted_image, needs_loop,
                      open_store, run_child, snapshot_view)
from crash_scenarios import (APPLIED_STEPS, CHILD, VERIFY, Before, Returned, as_format_7,
                             prepare_store, run_loop_until_killed)
from cascowfs import durability
from cascowfs.catalog import Counter
from cascowfs.crashpoints import CRASH_POINTS
from cascowfs.state import StateManager
from cascowfs.tuning import Tuning

pytestmark = needs_loop

DISK_MIB = 256
NO_PERIODIC_COMMIT = "commit=600"


def image_after_power_cut(image: Path, cut: Path) -> Path:
    """What the disk ``image`` (mounted now) would hold if the power went now, copied to ``cut``."""
    subprocess.run(["cp", "--sparse=always", str(image), str(cut)], check=True)
    return cut


def as_after_a_reboot(before: Before, op: str, applied: bool) -> Before:
    """What the scenario expects once every branch has restarted from its parent snapshot.
    A commit that applied moves its branch onto the new snapshot, whose content is the
    branch's: that branch keeps its expected view (and its changes are the commit's diff)."""
    for name, parent in before.parents.items():
        if not (op == "commit" and applied and name == "work"):
            before.branches[name] = before.snaps[parent]
            before.status[name] = []
    return before


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_power_cut_at_crash_point(point, tmp_path, track_store):
    op, _, step = point.partition(".")
    fs = tmp_path / "fs"
    with loop_ext4(fs, DISK_MIB, NO_PERIODIC_COMMIT) as disk:
        store = track_store(disk / "store")
        before = prepare_store(store, tmp_path, settled_import=op == "import")
        if op == "upgrade":
            as_format_7(store)
        os.sync()  # what the scenario prepared is on the disk; the operation's writes are not
        args = [str(before.import_src)] if op == "import" else []
        proc = run_child(CHILD, str(store), op, *args, crash_at=point)
        assert proc.returncode == -signal.SIGKILL, (
            f"the child was not killed at {point} (exit {proc.returncode})\n{proc.stderr}")
        cut = image_after_power_cut(fs / "disk.img", fs / "cut.img")
    try:
        with mounted_image(cut, fs / "disk", NO_PERIODIC_COMMIT) as disk:
            store = disk / "store"
            StateManager.open(store).close()
            assert_fsck_clean(store, deep=True)
            with open_store(store) as sm:
                applied = step in APPLIED_STEPS
                VERIFY[op](sm, as_after_a_reboot(before, op, applied), applied)
                check_live(sm, deep=True)
    finally:
        cut.unlink(missing_ok=True)


def test_power_cut_at_random_moments(tmp_path, track_store):
    rng = random.Random(4321)
    fs = tmp_path / "fs"
    images: list[Path] = []
    returned = Returned()
    try:
        with loop_ext4(fs, 4 * DISK_MIB, NO_PERIODIC_COMMIT) as disk:  # six rounds of writes
            StateManager.open(disk / "store").close()
            os.sync()
            images.append(image_after_power_cut(fs / "disk.img", fs / "start.img"))
        for round_no in range(6):
            with mounted_image(images[-1], fs / "disk", NO_PERIODIC_COMMIT) as disk:
                store = track_store(disk / "store")
                out = run_loop_until_killed(store, 100 + round_no,
                                            lambda: time.sleep(rng.uniform(0.3, 1.5)))
                images.append(image_after_power_cut(images[-1], fs / f"cut{round_no}.img"))
            images.pop(-2).unlink()
            returned.note(out)

            with mounted_image(images[-1], fs / "disk", NO_PERIODIC_COMMIT) as disk:
                store = disk / "store"
                StateManager.open(store).close()
                assert_fsck_clean(store, deep=True)
                with open_store(store) as sm:
                    returned.check(sm)
                    for snap in sm.snapshots():
                        snapshot_view(sm, snap.id)  # reads every byte back, checks the totals
                    for branch in sm.branches():
                        assert sm.status(branch.name) == [], f"{branch.name} did not restart clean"
                    check_live(sm)
        assert len(returned.snaps) >= 3, f"the loop did too little to test: {returned.snaps}"
    finally:
        for img in images:
            img.unlink(missing_ok=True)


def layer_inodes(store: Path) -> dict[str, int]:
    return {entry.name: entry.inode() for entry in os.scandir(store / "layers")}


def test_layers_the_background_synced_survive_a_cut_and_are_not_rebuilt(tmp_path, monkeypatch,
                                                                        track_store):
    """The other half of the bargain: once the background syncfs has run, a power cut loses
    nothing and the next open rebuilds nothing (the same layer directories are still there)."""
    fs = tmp_path / "fs"
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(random.Random(i).randbytes(5000))
    try:
        with loop_ext4(fs, DISK_MIB, NO_PERIODIC_COMMIT) as disk:
            store = track_store(disk / "store")
            with open_store(store, tuning=Tuning(layer_sync_seconds=0.1)) as sm:
                sm.import_tree(src, "base")
                tree = sm.create_branch("b", "base").tree
                (tree / "f3").write_bytes(b"edited")
                (tree / "new").write_bytes(b"new")
                sm.commit("b", "c1")
                sm.settle()
                deadline = time.monotonic() + 30
                while True:
                    with sm.db.read() as txn:
                        recorded = sm.catalog.counter(txn, Counter.LAYER_SEQ)
                        synced = sm.catalog.counter(txn, Counter.LAYERS_SYNCED)
                    if synced >= recorded:
                        break
                    assert time.monotonic() < deadline, "the background never synced the layers"
                    time.sleep(0.05)
                views = {sid: snapshot_view(sm, sid) for sid in ("base", "c1")}
                inodes = layer_inodes(store)
                cut = image_after_power_cut(fs / "disk.img", fs / "cut.img")
        with mounted_image(cut, fs / "disk", NO_PERIODIC_COMMIT) as disk:
            store = disk / "store"
            with open_store(store) as sm:
                assert layer_inodes(store) == inodes, "synced layers were rebuilt"
                for sid, view in views.items():
                    assert snapshot_view(sm, sid) == view
                check_live(sm, deep=True)
    finally:
        (fs / "cut.img").unlink(missing_ok=True)


def test_branches_still_mounted_mean_no_reboot_whatever_the_boot_id(tmp_path, monkeypatch, track_store):
    """Branch mounts outlive a daemon, never a reboot: while they are there, a changed boot id
    (a container, a misread) must not reset branches whose upper directories are live."""
    store = track_store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    sm = StateManager.open(store)
    try:
        sm.import_tree(src, "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "a").write_bytes(b"changed, not committed")
    finally:
        sm.close()  # the branch stays mounted, as a stopped daemon leaves it
    monkeypatch.setattr(durability, "boot_id", lambda: "another-boot-id")
    with open_store(store) as sm:
        assert [c.line() for c in sm.status("b")] == ["M a"]
        assert (sm.branch("b").tree / "a").read_bytes() == b"changed, not committed"
