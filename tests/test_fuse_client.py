"""``cascowfs.Client`` on a real mount: an agent loop, the same errors as Python exceptions,
thread safety, and a diff over the mount that agrees with the engine's own."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import cascowfs
from cascowfs import (BusyError, Client, ExistsError, InvalidArgumentError, NotFoundError)
from cascowfs.model import Change

from fusehelpers import Cascow, make_source_tree, mounted, needs_fuse

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def fs():
    def populate(fs: Cascow) -> None:
        make_source_tree(fs.base / "src", stdlib_slice=40)  # json and email

    with mounted(populate=populate) as fs:
        with Client(fs.mnt) as client:
            assert client.import_tree(fs.base / "src", "root", {"kind": "import"}) == "root"
        yield fs


def test_agent_loop(fs):
    """Expand a node three ways, keep the best, drop the rest: the MCTS step."""
    with Client(fs.mnt) as c:
        trees = {f"try{i}": c.branch(f"try{i}", "root") for i in range(3)}
        for i, (name, tree) in enumerate(trees.items()):
            (tree / "attempt.txt").write_text(f"attempt {i}\n")
            assert c.status(name) == [Change("attempt.txt", "A")]
        kept = c.commit("try1", "step-1", {"reward": "0.9", "action": "write attempt"})
        assert kept == "step-1"
        c.discard("try0")
        c.discard("try2")
        assert c.branches() == ["try1"]
        info = c.snapshot("step-1")
        assert info.parent == "root" and info.labels == {"reward": "0.9", "action": "write attempt"}
        assert info.files == c.snapshot("root").files + 1
        assert len(info.root) == 64
        b = c.branch_info("try1")
        assert b.parent == "step-1" and b.last_commit == "step-1" and b.tree == trees["try1"]
        assert c.parent("try1") == "step-1"
        assert (c.snapshot_path("step-1") / "attempt.txt").read_text() == "attempt 1\n"
        generated = c.commit("try1")
        assert generated in c.snapshots() and c.last_commit("try1") == generated
        c.discard("try1")
        c.prune(generated)
        c.prune("step-1")
        assert c.snapshots() == ["root"]


def test_errors_are_the_engine_exceptions(fs):
    with Client(fs.mnt) as c:
        c.branch("dup", "root")
        with pytest.raises(ExistsError):
            c.branch("dup", "root")
        with pytest.raises(ExistsError):
            c.branch("dup")  # mkdir path
        with pytest.raises(NotFoundError):
            c.branch("x", "no-such-snapshot")
        with pytest.raises(InvalidArgumentError):
            c.branch("bad name", "root")
        with pytest.raises(InvalidArgumentError):
            c.commit("dup", "bad/id")
        with pytest.raises(ExistsError) as info:
            c.commit("dup", "root")
        assert "root" in str(info.value)  # the daemon's message, not just strerror
        with pytest.raises(BusyError):
            c.prune("root")
        (c.tree("dup") / "f").write_text("x")
        c.commit("dup", "other")
        (c.tree("dup") / "g").write_text("y")
        with pytest.raises(BusyError):
            c.rebase("dup", "root")
        with pytest.raises(NotFoundError):
            c.discard("nope")
        with pytest.raises(NotFoundError):
            c.status("nope")
        with pytest.raises(NotFoundError):
            c.snapshot("nope")
        with pytest.raises(cascowfs.CascowfsError):
            c.command("nonsense")
        c.discard("dup")
        c.prune("other")


def test_one_client_shared_by_threads(fs):
    errors: list[BaseException] = []
    with Client(fs.mnt) as c:
        def work(i: int) -> None:
            try:
                for j in range(5):
                    name = f"t{i}-{j}"
                    tree = c.branch(name, "root")
                    (tree / "mark").write_text(name)
                    c.discard(name)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert c.branches() == []


def test_diff_over_the_mount(fs):
    with Client(fs.mnt) as c:
        tree = c.branch("d", "root")
        (tree / "json" / "__init__.py").write_text("changed\n")
        (tree / "new-dir" / "deep").mkdir(parents=True)
        (tree / "new-dir" / "deep" / "f").write_text("f\n")
        os.chmod(tree / "email", 0o700)
        (tree / "email" / "charset.py").unlink()
        c.commit("d", "d1")
        expected = [Change("email", "M"), Change("email/charset.py", "D"),
                    Change("json/__init__.py", "M"), Change("new-dir", "A"),
                    Change("new-dir/deep", "A"), Change("new-dir/deep/f", "A")]
        assert c.diff("root", "d1") == expected
        assert c.diff("d1", "root") == sorted(
            Change(ch.path, {"A": "D", "D": "A", "M": "M"}[ch.kind]) for ch in expected)
        assert c.diff("root", "root") == []
        assert len(c.diff(None, "root")) == len(list(Path(c.snapshot_path("root")).rglob("*")))
        c.discard("d")
        c.prune("d1")
