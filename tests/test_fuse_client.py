"""``cascowfs.Client`` on a real mount: an agent loop, the same errors as Python exceptions
(and as the builtin ``OSError`` subclasses), a distinct error when no daemon serves the mount,
``Branch`` as a context manager, no file held open while idle, thread safety, and a diff over
the mount that agrees with the engine's own."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

import cascowfs
from cascowfs import (BusyError, Client, DaemonNotRunningError, ExistsError,
                      InvalidArgumentError, NotFoundError, PermissionDeniedError)
from cascowfs.model import Change

from fusehelpers import Cascow, cascow_base, make_source_tree, mounted, needs_fuse
from support.metrics import fuse_requests

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


def test_label_reads_no_reply_unless_it_fails(fs):
    with Client(fs.mnt) as c:
        first = fuse_requests(fs.mnt)
        before = fuse_requests(fs.mnt)
        scrape = before["read"] - first["read"]  # the reads of one scrape, counted by the next
        for n in range(20):
            c.label("root", {"visits": str(n)})
        after = fuse_requests(fs.mnt)
        assert after["write"] - before["write"] == 20
        assert after["read"] - before["read"] <= scrape + 1  # the scrape's own reads alone
        assert c.snapshot("root").labels["visits"] == "19"
        with pytest.raises(NotFoundError) as info:
            c.label("no-such-snapshot", {"visits": "1"})
        assert "no-such-snapshot" in str(info.value)  # the daemon's message, not just strerror
        c.label("root", {"visits": ""})
        assert "visits" not in c.snapshot("root").labels


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


def test_errors_are_also_the_builtin_os_errors(fs):
    """An agent catches what it would catch after any file call; errno and message kept."""
    with Client(fs.mnt) as c:
        cases = [(lambda: c.branch("x", "no-such-snapshot"), FileNotFoundError, NotFoundError,
                  errno.ENOENT, "no-such-snapshot"),
                 (lambda: c.commit("no-such-branch"), FileNotFoundError, NotFoundError,
                  errno.ENOENT, "no-such-branch"),
                 (lambda: c.snapshot("nope"), FileNotFoundError, NotFoundError, errno.ENOENT,
                  "nope"),
                 (lambda: c.import_tree(fs.base / "src", "root"), FileExistsError, ExistsError,
                  errno.EEXIST, "root"),
                 (lambda: c.branch("bad name", "root"), OSError, InvalidArgumentError,
                  errno.EINVAL, "bad name")]
        for call, builtin, ours, code, named in cases:
            with pytest.raises(builtin) as info:
                call()
            exc = info.value
            assert isinstance(exc, ours) and isinstance(exc, cascowfs.CascowfsError)
            assert exc.errno == code and exc.strerror == os.strerror(code)
            assert named in str(exc) and str(exc) == exc.message
        c.branch("held", "root")
        with pytest.raises(BusyError) as busy:
            c.prune("root")
        assert isinstance(busy.value, OSError) and busy.value.errno == errno.EBUSY
        c.discard("held")


def test_a_caller_that_may_not_change_state_gets_permission_error(fs):
    """Forked and made nobody: the daemon's EPERM is a ``PermissionError``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                Client(fs.mnt).branch("as-nobody", "root")
                os.write(write, b"no error")
            except PermissionError as exc:
                ok = isinstance(exc, PermissionDeniedError) and exc.errno == errno.EPERM
                os.write(write, b"ok" if ok else repr(exc).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and said == b"ok", said
    assert "as-nobody" not in Client(fs.mnt).branches()


def test_a_mount_point_without_a_daemon_is_daemon_not_running():
    with cascow_base() as base:
        plain = Client(base)  # a directory, nothing mounted on it
        for call in (plain.snapshots, plain.branches, lambda: plain.branch("b", "s"),
                     lambda: plain.snapshot("s"), lambda: plain.command("gc")):
            with pytest.raises(DaemonNotRunningError) as info:
                call()
            assert str(base) in str(info.value) and info.value.errno == errno.ENOTCONN
            assert isinstance(info.value, ConnectionError)
    with mounted() as fs:
        (fs.base / "src").mkdir()
        (fs.base / "src" / "f").write_text("f\n")
        c = Client(fs.mnt)
        c.import_tree(fs.base / "src", "base")
        tree = c.branch("w", "base")
        fs.kill9()  # the FUSE mount stays, dead: the kernel answers ENOTCONN
        for call in (c.snapshots, lambda: c.snapshot("base"), lambda: c.commit("w"),
                     lambda: c.status("w"), lambda: c.diff(None, "base")):
            with pytest.raises(DaemonNotRunningError) as info:
                call()
            assert str(fs.mnt) in str(info.value), info.value
        assert (tree / "f").read_text() == "f\n"  # the branch itself lives on
        fs.start()  # the next daemon clears the dead mount; the same client works again
        assert c.snapshots() == ["base"] and c.branches() == ["w"]


def test_an_idle_client_does_not_keep_the_mount_busy():
    with mounted() as fs:
        (fs.base / "src").mkdir()
        c = Client(fs.mnt)  # never closed, never leaves scope
        c.import_tree(fs.base / "src", "base")
        c.branch("w", "base")
        c.discard("w")
        fs.stop()  # `cascowfs umount`: EBUSY if the client held ctl open
        assert not fs.running
        fs.start()
        assert c.snapshots() == ["base"]


def test_branch_context_manager_discards_unless_committed(fs):
    with Client(fs.mnt) as c:
        with c.new_branch("scoped", "root") as b:
            assert b.name == "scoped" and b.parent == "root" and b.last_commit is None
            assert b.tree == c.tree("scoped")
            (b.tree / "scratch").write_text("x")
            assert b.status == [Change("scratch", "A")]
        assert "scoped" not in c.branches()

        with pytest.raises(RuntimeError):
            with c.new_branch("failing", "root") as b:
                raise RuntimeError("the agent's action failed")
        assert "failing" not in c.branches()

        with c.new_branch("kept", "root") as b:
            (b.tree / "result").write_text("good\n")
            new = b.commit(labels={"reward": "1"})
            assert b.parent == new and b.last_commit == new and b.status == []
        assert "kept" in c.branches() and c.parent("kept") == new
        assert (c.snapshot_path(new) / "result").read_text() == "good\n"
        assert c.snapshot(new).labels == {"reward": "1"}

        with c.new_branch("gone", "root") as b:
            b.discard()  # discarded inside: leaving the block has nothing left to do
        assert "gone" not in c.branches()

        with c.new_branch("reused", "root") as b:
            b.discard()
            c.branch("reused", "root")  # another agent's, under the same name
        assert "reused" in c.branches()  # not the block's to discard
        c.discard("reused")

        with c.new_branch("empty") as b:
            assert b.parent is None and os.listdir(b.tree) == []
        with pytest.raises(ExistsError):
            c.new_branch("kept", "root")
        c.discard("kept")
        c.prune(new)


def test_names_and_label_keys_are_checked_before_they_reach_the_mount(fs):
    """The client builds paths and ctl words from names: one that is no id or name must not
    reach past MNT (``..`` made a directory beside the mount, and read a tree outside it),
    and a label key must not become another word of the command (``obs`` made the daemon
    store a file the caller named as the observation)."""
    outside = fs.base / "escape"
    with Client(fs.mnt) as c:
        before = set(c.snapshots())
        tree = c.branch("keys", "root")
        (tree / "f").write_text("x")
        refused = {
            "branch ../../escape": lambda: c.branch("../../escape"),
            "snapshot ..": lambda: c.snapshot(".."),
            "snapshot ''": lambda: c.snapshot(""),
            "diff outside": lambda: c.diff("../../src", "root"),
            "status a/b": lambda: c.status("a/b"),
            "tree ..": lambda: c.tree(".."),
            "parent .": lambda: c.parent("."),
            "observation ..": lambda: c.observation_path(".."),
            "label a=b": lambda: c.label("root", {"a=b": "c"}),
            "label obs": lambda: c.label("root", {"obs": "@/etc/hostname"}),
            "commit id x=y": lambda: c.commit("keys", "x=y"),
            "commit obs label": lambda: c.commit("keys", labels={"obs": "@/etc/hostname"}),
            "commit id obs=@": lambda: c.commit("keys", "obs=@/etc/hostname"),
            "import obs label": lambda: c.import_tree(fs.base / "src", "i2",
                                                      {"obs": "@/etc/hostname"}),
        }
        for what, call in refused.items():
            with pytest.raises(InvalidArgumentError) as caught:
                call()
            assert isinstance(caught.value, OSError) and caught.value.errno == errno.EINVAL, what
        assert not outside.exists()
        assert set(c.snapshots()) == before and c.snapshot("root").labels == {"kind": "import"}
        assert c.last_commit("keys") is None
        c.discard("keys")
