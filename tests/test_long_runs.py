"""A daemon runs for days, through millions of branch and snapshot names: nothing it keeps in
memory may grow with the names it has seen, only with the branches and snapshots that live."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sized
from pathlib import Path

import trio

from cascowfs.fuse.operations import CascowOperations, CtlHandle
from cascowfs.privacy import Caller
from cascowfs.state import StateManager

ROUNDS = 40


def _containers(root: object, depth: int = 3) -> Iterator[tuple[str, Sized]]:
    """Every dict, set, list and other sized attribute reachable from ``root``'s attributes,
    ``depth`` objects down, by its path of attribute names."""
    seen: set[int] = set()

    def walk(obj: object, path: str, left: int) -> Iterator[tuple[str, Sized]]:
        if id(obj) in seen or left < 0:
            return
        seen.add(id(obj))
        attrs = getattr(obj, "__dict__", None)
        if attrs is None:
            slots = getattr(type(obj), "__slots__", ())
            attrs = {s: getattr(obj, s) for s in slots if hasattr(obj, s)}
        for name, value in attrs.items():
            if isinstance(value, (str, bytes, Path, int, float)):
                continue
            if isinstance(value, (Mapping, set, frozenset, list)):
                yield f"{path}.{name}", value
            elif type(value).__module__.startswith("cascowfs"):
                yield from walk(value, f"{path}.{name}", left - 1)

    yield from walk(root, type(root).__name__, depth)


def _sizes(sm: StateManager) -> dict[str, int]:
    return {path: len(value) for path, value in _containers(sm)}


def _round(sm: StateManager, n: int) -> None:
    """What an agent's step leaves behind once its branch and snapshots are dropped."""
    name = f"agent-{n}"
    tree = sm.create_branch(name, "base").tree
    (tree / f"file-{n}").write_text(str(n))
    snap = sm.commit(name, f"step-{n}", {"reward": str(n / ROUNDS)})
    sm.label(snap, {"visits": str(n)})
    sm.reset(name, "base")
    (tree / "scratch").write_text("x")
    sm.discard(name)
    sm.prune(snap)


def test_names_an_agent_used_and_dropped_leave_nothing_in_memory(sm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    sm.import_tree(src, "base")
    sm.trees._cache_size = sm.content._cache_size = 4  # LRU caches: full after the warm-up
    for n in range(5):
        _round(sm, n)
    before = _sizes(sm)
    for n in range(5, 5 + ROUNDS):
        _round(sm, n)
    after = _sizes(sm)
    grown = {p: (before.get(p, 0), size) for p, size in after.items()
             if size - before.get(p, 0) >= ROUNDS // 2}
    assert not grown, grown


def test_names_sent_through_ctl_and_dropped_leave_nothing_in_the_fuse_layer(
    sm, store, tmp_path, monkeypatch
):
    monkeypatch.setenv("CASCOWFS_SNAPSHOT_VIEWS", "fuse")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    sm.import_tree(src, "base")
    sm.trees._cache_size = sm.content._cache_size = 4
    ops = CascowOperations(sm, store)

    async def rounds(first: int, count: int) -> None:
        handle = CtlHandle(ops.ctl, ops.budgets.opened(0, "open"), admin=True,
                           caller=Caller(0, 0))
        for n in range(first, first + count):
            for command in (f"branch agent-{n} base", f"commit agent-{n} step-{n} reward=1",
                            f"label step-{n} visits={n}", f"reset agent-{n} base",
                            "find reward>0 --limit 1", f"discard agent-{n}",
                            f"prune step-{n}"):
                await ops._ctl_write(handle, command.encode() + b"\n")
                reply = handle.replies.popleft()
                assert not reply.startswith(b"error"), (command, reply)

    trio.run(rounds, 0, 5)
    before = {p: len(v) for p, v in _containers(ops)}
    trio.run(rounds, 5, ROUNDS)
    after = {p: len(v) for p, v in _containers(ops)}
    grown = {p: (before.get(p, 0), size) for p, size in after.items()
             if size - before.get(p, 0) >= ROUNDS // 2}
    assert not grown, grown
