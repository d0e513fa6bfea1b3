"""Nodes a listing makes for entries the kernel never takes (``readdir`` in
cascowfs/fuse/operations.py, ``InodeTable.unlisted`` in inodes.py). READDIRPLUS gives the
kernel a nodeid for each entry that fits its buffer, and only those does it ever forget: a node
made for the entry that did not fit stayed in the inode table for
good, one a ``getdents`` at any offset by any user. Run on the daemon's operations, unmounted,
with a ``readdir_reply`` that takes a few entries a call as the kernel's buffer does."""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from cascowfs.fuse.inodes import SNAPSHOTS_INO
from cascowfs.fuse.operations import CascowOperations

NOBODY = SimpleNamespace(uid=65534, gid=65534, pid=os.getpid())  # any local user


class Kernel:
    """``readdir_reply`` as the kernel's buffer takes entries: ``room`` a call, then False.
    ``took``: the nodeids it was given (not of "." and ".."), which it forgets later."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.left = 0
        self.took: list[int] = []
        self.refused = 0

    def reply(self, token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if not self.left:
            self.refused += 1
            return False
        self.left -= 1
        if name not in (b".", b".."):
            self.took.append(attr.st_ino)
        return True


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    kernel = Kernel(room=5)
    monkeypatch.setattr(pyfuse3, "readdir_reply", kernel.reply)
    return kernel


async def list_at(ops: CascowOperations, ino: int, starts: Iterable[int], kernel: Kernel) -> None:
    """Open directory ``ino``, read it from each of ``starts`` (``lseek`` then ``getdents``),
    close it, and forget every entry the kernel took, as the kernel does in time."""
    fh = await ops.opendir(ino, NOBODY)
    for start in starts:
        kernel.left = kernel.room
        await ops.readdir(fh, start, object())
    await ops.releasedir(fh)
    await ops.forget([(taken, 1) for taken in kernel.took])
    kernel.took.clear()


def test_entries_that_did_not_fit_leave_no_node(sm, store, tmp_path, kernel):
    """Directories and files of a snapshot: each call's first entry past the buffer is new,
    as when a user reads on from offsets of its own choosing."""
    src = tmp_path / "src"
    for i in range(120):
        (src / f"d{i:03}").mkdir(parents=True)
        (src / f"d{i:03}" / "x").write_text(str(i))
        (src / f"f{i:03}").write_text(str(i))
    sm.import_tree(src, "base")
    ops = CascowOperations(sm, store)

    async def main() -> None:
        root = await ops.lookup(SNAPSHOTS_INO, b"base", NOBODY)
        before = len(ops.table)
        starts = range(0, 237, kernel.room + 2)  # 242 entries: each call leaves one out
        await list_at(ops, root.st_ino, starts, kernel)
        assert kernel.refused == len(starts)
        assert len(ops.table) == before

    trio.run(main)


def test_snapshot_roots_that_did_not_fit_leave_no_node(sm, store, tmp_path, kernel):
    """A root of ``snapshots/`` holds its snapshot's labels."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        sm.import_tree(src, f"s{i}", labels={"note": "x" * 1000})
    ops = CascowOperations(sm, store)
    kernel.room = 2

    async def main() -> None:
        before = len(ops.table)
        await list_at(ops, SNAPSHOTS_INO, range(0, 12, 3), kernel)
        assert kernel.refused == 4
        assert len(ops.table) == before

    trio.run(main)


def test_an_entry_the_kernel_knows_keeps_its_node_when_it_does_not_fit(
    sm, store, tmp_path, kernel
):
    """Only a node the kernel never saw may go: a directory it looked up keeps its nodeid."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    sm.import_tree(src, "base")
    ops = CascowOperations(sm, store)
    kernel.room = 2  # "." and "..", then "d" does not fit

    async def main() -> None:
        root = await ops.lookup(SNAPSHOTS_INO, b"base", NOBODY)
        known = await ops.lookup(root.st_ino, b"d", NOBODY)
        await list_at(ops, root.st_ino, [0], kernel)
        assert kernel.refused == 1
        assert ops.table.get(known.st_ino) is not None
        assert (await ops.lookup(root.st_ino, b"d", NOBODY)).st_ino == known.st_ino
        await ops.forget([(known.st_ino, 2)])
        assert ops.table.get(known.st_ino) is None

    trio.run(main)
