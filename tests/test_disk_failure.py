"""A store disk that fails under the daemon (docs/architecture.md, Guarantees: EIO gives the
caller a clean errno and loses nothing committed).

The failure is the kernel's own: ext4's shutdown ioctl (``EXT4_IOC_SHUTDOWN``, what xfstests'
"godown" uses) with ``NOLOGFLUSH``. From that instant every write to the filesystem, and every
read the page cache cannot answer, fails with EIO, and whatever the journal had not committed
is gone, as in a power cut. The writer must keep running and answer EIO; once the disk is
mounted again (a new mount: the store sees that its page cache was lost), the store must pass
a deep fsck and hold every operation that returned before the failure.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import struct
import time
from pathlib import Path

import pytest

from conftest import (check_live, force_unmount_below, make_ext4_image, mounted_image,
                      mounts_below, needs_loop, open_store, register_store, snapshot_view)
from cascowfs.errors import CascowfsError, StoreIOError
from cascowfs.state import StateManager
from crash_scenarios import Returned, run_loop_until_killed
from fusehelpers import Cascow, cascow_base, needs_fuse

pytestmark = needs_loop

EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def fail_disk(mountpoint: Path) -> None:
    """Make the ext4 mounted at ``mountpoint`` fail every I/O from now on, journal unflushed."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


@needs_fuse
def test_a_failed_disk_gives_eio_through_the_file_interface_and_loses_nothing(tmp_path,
                                                                              track_store):
    img = make_ext4_image(tmp_path / "disk.img", 128)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_text(f"file {i}\n")
    with cascow_base() as base:
        fs = Cascow(base)
        with mounted_image(img, tmp_path / "disk") as disk:
            fs.store = track_store(disk / "store")
            try:
                fs.start()
                fs.sh(f'echo "import base {src}" > $MNT/ctl; mkdir $MNT/branches/b; '
                      'echo base > $MNT/branches/b/parent; echo x > $MNT/branches/b/tree/f1; '
                      'echo c1 > $MNT/branches/b/commit; echo y > $MNT/branches/b/tree/f2')
                # A branch on c1 writes c1's layer now, which the daemon would otherwise write
                # in the background right after the commit: a write that meets the failed
                # disk stops LMDB (MDB_PANIC), and then even what it holds in memory answers
                # EIO, which this test does not look at.
                fs.sh('mkdir $MNT/branches/p; echo c1 > $MNT/branches/p/parent; '
                      'rmdir $MNT/branches/p')
                fail_disk(disk)
                for call in ('echo c2 > $MNT/branches/b/commit', 'mkdir $MNT/branches/b2',
                             f'echo "import i2 {src}" > $MNT/ctl', 'rmdir $MNT/snapshots/base',
                             'rmdir $MNT/branches/b', 'cat $MNT/branches/b/status'):
                    proc = fs.sh(call, check=False, timeout=60)
                    assert proc.returncode != 0 and os.strerror(errno.EIO) in proc.stderr, (
                        f"{call}: expected EIO, got {proc.returncode}: {proc.stderr}")
                assert fs.running, f"the daemon died of a failed disk\n{fs.log_text()}"
                # what the daemon already holds in memory it still serves
                assert fs.sh("cat $MNT/snapshots/c1/f1").stdout == "x\n"
                fs.stop(branches=True)  # the store cannot be opened, its branches go anyway
                assert not mounts_below(fs.store), "umount --branches left branch mounts"
            finally:
                fs.teardown()
                force_unmount_below(disk)
    try:
        with mounted_image(img, tmp_path / "disk") as disk:
            with open_store(disk / "store") as sm:
                assert {s.id for s in sm.snapshots()} == {"base", "c1"}
                assert snapshot_view(sm, "c1")[b"f1"].data == b"x\n"
                branch = sm.branch("b")
                assert branch.parent == "c1" and sm.status("b") == []
                assert (branch.tree / "f1").read_bytes() == b"x\n"
                check_live(sm, deep=True)
    finally:
        img.unlink()


def test_a_disk_failing_at_random_moments_loses_nothing_returned(tmp_path, track_store):
    rng = random.Random(777)
    img = make_ext4_image(tmp_path / "disk.img", 1024)
    returned = Returned()
    try:
        for round_no in range(4):
            with mounted_image(img, tmp_path / "disk") as disk:
                store = track_store(disk / "store")
                def fail_meanwhile(disk: Path = disk) -> None:
                    time.sleep(rng.uniform(0.3, 1.5))
                    fail_disk(disk)
                    time.sleep(0.5)  # the loop must keep running on the failed disk

                out = run_loop_until_killed(store, 200 + round_no, fail_meanwhile)
                last_calls = out.splitlines()[-20:]  # all made on the failed disk
                assert any(line.startswith("refused") and line.split()[2] == "EIO"
                           for line in last_calls), f"no EIO after the disk failed:\n{last_calls}"
                returned.note(out)
                force_unmount_below(store)
            with mounted_image(img, tmp_path / "disk") as disk:
                with open_store(disk / "store") as sm:
                    returned.check(sm)
                    for snap in sm.snapshots():
                        snapshot_view(sm, snap.id)  # reads every byte back, checks the totals
                    check_live(sm, deep=True)
        assert len(returned.snaps) >= 3, f"the loop did too little to test: {returned.snaps}"
    finally:
        img.unlink()


def test_a_reset_on_a_failed_disk_raises_the_store_error_not_its_cleanup(tmp_path):
    """The disk fails once a reset has staged its directories: the reset fails, and moving
    its staging into the trash fails too. The caller gets the operation's StoreIOError
    (EIO), not the cleanup's raw OSError, and the store opens again with the branch as it
    was."""
    img = make_ext4_image(tmp_path / "disk.img", 128)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("base\n")
    try:
        with mounted_image(img, tmp_path / "disk") as disk:
            sm = StateManager.open(register_store(disk / "store"))
            try:
                sm.import_tree(src, "base")
                sm.create_branch("b", "base")
                sm.layers.join()
                stage = sm.stage_branch_dirs

                def stage_then_fail(snap):
                    staged = stage(snap)
                    fail_disk(disk)
                    return staged

                sm.stage_branch_dirs = stage_then_fail
                with pytest.raises(StoreIOError) as raised:
                    sm.reset("b", "base")
                assert raised.value.errno == errno.EIO
            finally:
                try:
                    sm.close(unmount_branches=True)
                except CascowfsError:
                    pass  # the disk is gone; the reopen below is what counts
                force_unmount_below(disk)
        with mounted_image(img, tmp_path / "disk") as disk:
            with open_store(disk / "store") as sm:
                assert sm.branch("b").parent == "base" and sm.status("b") == []
                check_live(sm, deep=True)
    finally:
        img.unlink()
