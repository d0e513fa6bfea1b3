"""The store's accounting under random lifecycles: import / branch / edit / commit / rebase / discard / prune
/ flatten / gc / close-and-reopen, in any order (a hypothesis state machine over a real store).

After every step:
* fsck's checks on the live store hold: every layer refcount equals a recount from scratch
  over the live snapshots and branches, every object they reach exists and verifies, nothing
  unreachable is left unless a collection is pending, every branch is mounted exactly once,
  no staging;
* nothing referenced is gone: every snapshot still reads back (from the CAS) exactly as it was
  committed, and every branch still shows exactly what it showed after its last edit.
Refused operations (an id or name taken, pruning a snapshot a branch is based on, re-basing a
modified branch, unknown names) raise the documented error and change nothing.
At the end everything is discarded and pruned: the store must then hold no object, no layer
and no branch directory at all, and a full fsck of the closed store must be clean.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

import conftest
from conftest import (assert_fsck_clean, assert_same_view, check_live, dir_view,
                      hypothesis_settings, needs_overlay, snapshot_view)
from cascowfs.errors import (BusyError, ExistsError, InvalidArgumentError, NotFoundError)
from cascowfs import trees
from cascowfs.state import StateManager
from cascowfs.tuning import Tuning

pytestmark = needs_overlay

NAMES = ["a", "b", "c", "d.txt", "e"]
CONTENTS = [b"", b"one", b"two\n" * 50, b"z" * 70_000]


def random_tree(rng: random.Random, root: Path, entries: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(entries):
        random_edit(rng, root, creating=True)


def _scan(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    paths = sorted(Path(dp, n) for dp, dns, fns in os.walk(root) for n in dns + fns)
    dirs = [root] + [p for p in paths if p.is_dir() and not p.is_symlink()]
    files = [p for p in paths if p.is_file() and not p.is_symlink()]
    return paths, dirs, files


def random_edit(rng: random.Random, root: Path, *, creating: bool = False) -> str:
    """One random change under ``root`` (a plain directory or a branch tree)."""
    ops = ["write", "write", "mkdir", "symlink", "link"]
    if not creating:
        ops += ["write", "append", "delete", "rename", "chmod", "rmtree", "xattr"]
    op = rng.choice(ops)
    paths, dirs, files = _scan(root)
    if op in ("append", "link", "chmod", "xattr") and not files:
        op = "write"
    if op in ("delete", "rename") and not paths:
        return "nothing"
    if op == "rmtree" and len(dirs) < 2:
        return "nothing"
    if op in ("write", "mkdir", "symlink", "link"):
        new = rng.choice(dirs) / rng.choice(NAMES)
        if os.path.lexists(new):  # replace whatever has that name
            if new.is_dir() and not new.is_symlink():
                shutil.rmtree(new)
            else:
                new.unlink()
            paths, dirs, files = _scan(root)
            if op == "link" and not files:
                op = "write"
    if op == "write":
        new.write_bytes(rng.choice(CONTENTS) + rng.randbytes(rng.randrange(4)))
    elif op == "mkdir":
        new.mkdir()
    elif op == "symlink":
        os.symlink(rng.choice(NAMES), new)
    elif op == "link":
        os.link(rng.choice(files), new)
    elif op == "append":
        with open(rng.choice(files), "ab") as fh:
            fh.write(b"+")
    elif op == "delete":
        victim = rng.choice(paths)
        if victim.is_dir() and not victim.is_symlink():
            shutil.rmtree(victim)
        else:
            victim.unlink()
    elif op == "rename":
        src = rng.choice(paths)
        dst = rng.choice(dirs) / rng.choice(NAMES)
        if src == dst or str(dst).startswith(str(src) + "/") or os.path.lexists(dst):
            return "nothing"
        os.rename(src, dst)
    elif op == "chmod":
        os.chmod(rng.choice(files), rng.choice([0o600, 0o644, 0o755, 0o4755]))
    elif op == "rmtree":
        shutil.rmtree(rng.choice(dirs[1:]))
    elif op == "xattr":
        os.setxattr(rng.choice(files), b"user.k", rng.randbytes(3))
    return op


class StoreLifecycle(RuleBasedStateMachine):
    def __init__(self, base: Path, tuning: Tuning = Tuning()) -> None:
        super().__init__()
        self.tuning = tuning
        self.dir = Path(tempfile.mkdtemp(prefix="lifecycle-", dir=base))
        self.store = self.dir / "store"
        conftest.register_store(self.store)
        self.sm = StateManager.open(self.store, tuning=self.tuning)
        self.snaps: dict[str, dict] = {}      # id -> view at commit/import
        self.branches: dict[str, dict] = {}   # name -> view after its last change
        self.parents: dict[str, str | None] = {}
        self.modified: dict[str, bool] = {}
        self.n = 0

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    # -- rules ------------------------------------------------------------------------------
    @rule(seed=st.integers(0, 2**32), entries=st.integers(0, 12))
    def import_tree(self, seed, entries):
        src = self.dir / self.fresh("src")
        random_tree(random.Random(seed), src, entries)
        sid = self.sm.import_tree(src, self.fresh("imp"))
        view = snapshot_view(self.sm, sid)
        assert_same_view(view, dir_view(src), f"import {sid}")
        self.snaps[sid] = view
        shutil.rmtree(src)

    @rule(data=st.data())
    def create_branch(self, data):
        parent = data.draw(st.sampled_from([None] + sorted(self.snaps)), label="parent")
        name = self.fresh("br")
        info = self.sm.create_branch(name, parent)
        view = dir_view(info.tree)
        if parent is not None:
            assert_same_view(view, self.snaps[parent], f"new branch {name} on {parent}")
        self.branches[name], self.parents[name], self.modified[name] = view, parent, False

    @precondition(lambda self: self.branches)
    @rule(data=st.data(), seed=st.integers(0, 2**32), count=st.integers(1, 6))
    def edit(self, data, seed, count):
        name = data.draw(st.sampled_from(sorted(self.branches)), label="branch")
        rng = random.Random(seed)
        tree = self.sm.branch(name).tree
        note(f"edits in {name}: {[random_edit(rng, tree) for _ in range(count)]}")
        self.branches[name] = dir_view(tree)
        self.modified[name] = True

    @precondition(lambda self: self.branches)
    @rule(data=st.data())
    def commit(self, data):
        name = data.draw(st.sampled_from(sorted(self.branches)), label="branch")
        if self.snaps and data.draw(st.integers(0, 4), label="reuse an id") == 0:
            taken = data.draw(st.sampled_from(sorted(self.snaps)), label="taken id")
            with pytest.raises(ExistsError):
                self.sm.commit(name, taken)
            return
        sid = self.sm.commit(name, self.fresh("c"))
        view = snapshot_view(self.sm, sid)
        assert_same_view(view, self.branches[name], f"commit {sid} of {name}")
        self.snaps[sid] = view
        self.parents[name] = sid
        self.modified[name] = False

    @precondition(lambda self: self.branches)
    @rule(data=st.data())
    def discard(self, data):
        name = data.draw(st.sampled_from(sorted(self.branches)), label="branch")
        tree = self.sm.branch(name).tree
        self.sm.discard(name)
        del self.branches[name], self.parents[name], self.modified[name]
        assert not conftest.mounts_below(tree), f"{tree} still mounted after discard"
        with pytest.raises(NotFoundError):
            self.sm.branch(name)
        with pytest.raises(NotFoundError):
            self.sm.discard(name)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def prune(self, data):
        sid = data.draw(st.sampled_from(sorted(self.snaps)), label="snapshot")
        users = [b for b, p in self.parents.items() if p == sid]
        if users:
            with pytest.raises(BusyError):
                self.sm.prune(sid)
            return
        self.sm.prune(sid)
        del self.snaps[sid]
        with pytest.raises(NotFoundError):
            self.sm.snapshot(sid)
        with pytest.raises(NotFoundError):
            self.sm.prune(sid)

    @precondition(lambda self: self.branches)
    @rule(data=st.data())
    def rebase(self, data):
        name = data.draw(st.sampled_from(sorted(self.branches)), label="branch")
        target = data.draw(st.sampled_from([None] + sorted(self.snaps)), label="new parent")
        if self.modified[name] and self.sm.status(name):
            with pytest.raises(BusyError):
                self.sm.rebase(name, target)
            return
        info = self.sm.rebase(name, target)
        assert info.parent == target
        view = dir_view(info.tree)
        if target is not None:
            assert_same_view(view, self.snaps[target], f"{name} re-based on {target}")
        self.branches[name], self.parents[name], self.modified[name] = view, target, False

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def flatten(self, data):
        sid = data.draw(st.sampled_from(sorted(self.snaps)), label="snapshot")
        self.sm.flatten(sid)
        assert len(self.sm.layer_chain(sid)) == 1

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), seed=st.integers(0, 2**32), depth=st.integers(1, 10))
    def deepen(self, data, seed, depth):
        """branch, edit, commit, discard, again from the new snapshot: a long layer chain."""
        sid = data.draw(st.sampled_from(sorted(self.snaps)), label="from")
        rng = random.Random(seed)
        for _ in range(depth):
            name = self.fresh("deep")
            tree = self.sm.create_branch(name, sid).tree
            random_edit(rng, tree)
            view = dir_view(tree)
            sid = self.sm.commit(name, self.fresh("d"))
            self.sm.discard(name)
            self.snaps[sid] = view
        note(f"chain of {sid}: {len(self.sm.layer_chain(sid))} layers")

    @rule()
    def gc(self):
        self.sm.gc()

    @rule(unmount=st.booleans())
    def reopen(self, unmount):
        self.sm.close(unmount_branches=unmount)
        self.sm = None
        self.sm = StateManager.open(self.store, tuning=self.tuning)

    @rule(data=st.data())
    def refused(self, data):
        """Bad and unknown names: the documented error, and nothing changes (the invariants
        compare everything afterwards)."""
        kind = data.draw(st.integers(0, 4), label="which refusal")
        if kind == 0:
            with pytest.raises(InvalidArgumentError):
                self.sm.create_branch("../x")
        elif kind == 1:
            with pytest.raises(NotFoundError):
                self.sm.create_branch(self.fresh("nb"), "no-such-snapshot")
        elif kind == 2 and self.branches:
            with pytest.raises(ExistsError):
                self.sm.create_branch(sorted(self.branches)[0])
        elif kind == 3 and self.branches:
            with pytest.raises(InvalidArgumentError):
                self.sm.commit(sorted(self.branches)[0], "bad/id")
        elif kind == 4:
            with pytest.raises(NotFoundError):
                self.sm.prune("no-such-snapshot")

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def store_is_consistent(self):
        check_live(self.sm)

    @invariant()
    def nothing_referenced_is_gone(self):
        assert sorted(s.id for s in self.sm.snapshots()) == sorted(self.snaps)
        assert sorted(b.name for b in self.sm.branches()) == sorted(self.branches)
        for sid, view in self.snaps.items():
            assert_same_view(snapshot_view(self.sm, sid), view, f"snapshot {sid}")
        for name, view in self.branches.items():
            info = self.sm.branch(name)
            assert info.parent == self.parents[name]
            assert_same_view(dir_view(info.tree), view, f"branch {name}")

    def teardown(self):
        try:
            if self.sm is None:
                return
            # drop everything: the store must be empty afterwards, not merely consistent
            for b in self.sm.branches():  # what the engine has, even if a rule failed midway
                self.sm.discard(b.name)
            for snap in self.sm.snapshots():
                self.sm.prune(snap.id)
            self.sm.gc()
            check_live(self.sm)
            with self.sm.db.read() as txn:
                objects = sum(1 for _ in self.sm.content.iter_object_ids(txn))
                layers = sum(1 for _ in txn.cursor(db=self.sm.db.db("layers")))
            assert (objects, layers) == (0, 0), \
                f"empty store still holds {objects} objects, {layers} layer records"
            self.sm.close()
            self.sm = None
            assert os.listdir(self.store / "layers") == [], "layer directories left"
            assert os.listdir(self.store / "branches") == [], "branch directories left"
            assert_fsck_clean(self.store, deep=True)
            with conftest.open_store(self.store) as sm:  # the trash goes at the next open
                sm.settle()
                assert os.listdir(self.store / "trash") == [], "trash not emptied after open"
        finally:
            if self.sm is not None:
                self.sm.close(unmount_branches=True)
            conftest.force_unmount_below(self.store)
            shutil.rmtree(self.dir, ignore_errors=True)


def test_the_store_stays_exact_after_any_sequence(tmp_path):
    run_state_machine_as_test(lambda: StoreLifecycle(tmp_path),
                              settings=hypothesis_settings(20, stateful_step_count=30))


def test_pruning_the_base_of_a_branch_keeps_the_branch_whole(sm, tmp_path):
    """A committed branch's parent is its new snapshot, but its mount still reads the layers of
    the snapshot it was created on; pruning that snapshot must not pull anything from under it,
    and gc must then reclaim exactly what nothing names."""
    src = tmp_path / "src"
    random_tree(random.Random(7), src, 30)
    sm.import_tree(src, "base")
    tree = sm.create_branch("b", "base").tree
    (tree / "new").write_bytes(b"new")
    sm.commit("b", "s1")
    before = dir_view(tree)
    sm.prune("base")
    sm.gc()
    check_live(sm)
    assert_same_view(dir_view(tree), before, "branch after its base was pruned")
    (tree / "more").write_bytes(b"more")
    sm.commit("b", "s2")
    assert_same_view(snapshot_view(sm, "s2"), dir_view(tree), "commit after the prune")
    sm.discard("b")
    sm.prune("s1")
    sm.prune("s2")
    sm.gc()
    check_live(sm)
    with sm.db.read() as txn:
        assert not list(sm.content.iter_object_ids(txn)), "objects survive with nothing live"


def test_flatten_after_the_import_under_the_chain_was_pruned(tmp_path):
    """A chain's bottom layer outlives the import that made it (the chain's snapshots name the
    layer); flattening such a chain must not need that import's trees. The manager is reopened
    first so that no tree is served from the in-memory cache."""
    src = tmp_path / "src"
    random_tree(random.Random(3), src, 15)
    store = tmp_path / "store"
    with conftest.open_store(store) as sm:
        sid = sm.import_tree(src, "imp")
        views = {}
        for i in range(3):
            tree = sm.create_branch(f"b{i}", sid).tree
            (tree / f"n{i}").write_bytes(b"x%d" % i)
            sid = sm.commit(f"b{i}", f"d{i}")
            views[sid] = dir_view(tree)
            sm.discard(f"b{i}")
        sm.prune("imp")
        sm.prune("d0")
        sm.gc()
        assert len(sm.layer_chain("d2")) >= 2
    with conftest.open_store(store) as sm:
        sm.flatten("d2")
        assert len(sm.layer_chain("d2")) == 1
        for sid, view in views.items():
            if sm.has_snapshot(sid):
                assert_same_view(snapshot_view(sm, sid), view, sid)
        tree = sm.create_branch("check", "d2").tree
        assert_same_view(dir_view(tree), views["d2"], "a branch on the flattened chain")
        check_live(sm, deep=True)


def test_gc_while_the_background_thread_empties_the_trash(tmp_path, monkeypatch):
    """``prune`` hands its layer to the background thread's trash job; a ``gc`` right after it
    empties the same trash. Forced interleaving: gc finds a trash entry, and before it looks
    at it again the background thread has deleted it. gc must cope (or the two must not run
    at once): it may not fail with FileNotFoundError."""
    import os.path as osp

    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    for i in range(3000):  # a layer that takes the background thread a while to delete
        (src / "many" / f"f{i}").write_bytes(b"%d" % i)
    real_isdir = osp.isdir
    main = threading.main_thread()
    store = tmp_path / "store"

    def isdir(path):
        p = os.fsdecode(path)
        if threading.current_thread() is main and "/trash/" in p:
            deadline = time.monotonic() + 2
            while osp.lexists(p) and time.monotonic() < deadline:
                time.sleep(0.001)  # let the background thread finish this very entry
        return real_isdir(path)

    with conftest.open_store(store) as sm:
        for i in range(3):
            sm.import_tree(src, f"s{i}")
        monkeypatch.setattr(osp, "isdir", isdir)
        try:
            for i in range(3):
                sm.prune(f"s{i}")
                sm.gc()
        finally:
            monkeypatch.undo()
        check_live(sm)


def _tiny_pages_and_slices(monkeypatch) -> Tuning:
    """Page every directory of more than 3 entries, and start a background collection as
    soon as garbage appears, sweeping two objects per transaction: the small trees of these
    tests then exercise paged directories, and collection cycles (marking in their child
    process) overlap operations all the time."""
    monkeypatch.setattr(trees, "PAGED_ABOVE", 3)
    monkeypatch.setattr(trees, "PAGE_AVERAGE", 2)
    return Tuning(sweep_slice=2, collect_after_seconds=0.01)


def test_the_store_stays_exact_with_tiny_pages_and_constant_collection(tmp_path, monkeypatch):
    tuning = _tiny_pages_and_slices(monkeypatch)
    run_state_machine_as_test(lambda: StoreLifecycle(tmp_path, tuning),
                              settings=hypothesis_settings(10, stateful_step_count=30))


@pytest.mark.parametrize("tiny", [False, True], ids=["default", "tiny-pages-and-slices"])
def test_concurrent_agents_keep_the_store_exact(tmp_path, monkeypatch, tiny):
    """Four agents in threads (docs/benchmarks.md's MCTS mix: many branches, some commits, most
    discarded, old snapshots pruned) against one manager, plus a reader: every commit is
    exactly its branch, and afterwards the store passes every check."""
    tuning = _tiny_pages_and_slices(monkeypatch) if tiny else Tuning()
    src = tmp_path / "src"
    random_tree(random.Random(11), src, 25)
    failures: list[str] = []
    with conftest.open_store(tmp_path / "store", tuning=tuning) as sm:
        sm.import_tree(src, "base")
        base_view = snapshot_view(sm, "base")
        done = threading.Event()

        def agent(k: int) -> None:
            rng = random.Random(k)
            mine = ["base"]
            try:
                for i in range(20):
                    name = f"a{k}-{i}"
                    tree = sm.create_branch(name, rng.choice(mine)).tree
                    for _ in range(rng.randrange(1, 5)):
                        random_edit(rng, tree)
                    if rng.random() < 0.5:
                        view = dir_view(tree)
                        sid = sm.commit(name, f"s{k}-{i}")
                        assert_same_view(snapshot_view(sm, sid), view, f"agent {k} commit {sid}")
                        mine.append(sid)
                    sm.discard(name)
                    if len(mine) > 3 and rng.random() < 0.5:
                        sm.prune(mine.pop(1))
            except BaseException as exc:  # reported below, with the agent's number
                failures.append(f"agent {k}: {exc!r}")

        def reader() -> None:
            try:
                while not done.is_set():
                    assert_same_view(snapshot_view(sm, "base"), base_view, "base while agents work")
            except BaseException as exc:
                failures.append(f"reader: {exc!r}")

        agents = [threading.Thread(target=agent, args=(k,)) for k in range(4)]
        watcher = threading.Thread(target=reader)
        watcher.start()
        for t in agents:
            t.start()
        for t in agents:
            t.join()
        done.set()
        watcher.join()
        assert not failures, "\n".join(failures)
        assert sm.branches() == []
        check_live(sm, deep=True)


def test_an_op_whose_chain_a_merge_dropped_is_made_again(sm, monkeypatch):
    """A branch, re-base or reset mounts the snapshot's chain before its APPLY; a merge that
    dropped a layer of it in between refuses the attempt with nothing changed, and the op is
    made again on the chain as it is then. Only an op refused every time fails, EBUSY."""
    from cascowfs.state import CHAIN_ATTEMPTS, ChainChangedError

    tree = sm.create_branch("a").tree
    (tree / "f").write_text("one\n")
    sm.commit("a", "s1")
    real = StateManager._check_chain
    refusals = {"left": 1}

    def merged_meanwhile(self, txn, parent, chain):
        if refusals["left"]:
            refusals["left"] -= 1
            raise ChainChangedError(f"the layers of snapshot {parent} changed meanwhile")
        return real(self, txn, parent, chain)

    monkeypatch.setattr(StateManager, "_check_chain", merged_meanwhile)
    for op in (lambda: sm.create_branch("b", "s1"), lambda: sm.reset("a", "s1"),
               lambda: sm.rebase("b", "s1")):
        refusals["left"] = 1
        info = op()
        assert refusals["left"] == 0 and info.parent == "s1"
    assert (sm.tree_path("b") / "f").read_text() == "one\n"
    refusals["left"] = CHAIN_ATTEMPTS
    with pytest.raises(BusyError, match="changed meanwhile"):
        sm.create_branch("c", "s1")
    assert refusals["left"] == 0
    assert "c" not in [b.name for b in sm.branches()]
    monkeypatch.undo()

    # the merge's deletion can come first: mounting the dropped layer's directory fails
    from cascowfs.overlay import MountError
    real_mount = sm.layers.mount_chain
    gone = {"left": 1, "dropped": True}

    def deleted_once(chain, **kw):
        if gone["left"]:
            gone["left"] -= 1
            raise MountError("overlay mount failed: No such file or directory", errno=2)
        return real_mount(chain, **kw)

    monkeypatch.setattr(sm.layers, "mount_chain", deleted_once)
    monkeypatch.setattr(StateManager, "_chain_dropped", lambda self, chain: gone["dropped"])
    assert sm.create_branch("d", "s1").parent == "s1" and gone["left"] == 0
    gone.update(left=1, dropped=False)  # a layer still recorded: the error is the mount's
    with pytest.raises(MountError):
        sm.create_branch("e", "s1")
    monkeypatch.undo()
    check_live(sm)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EINVAL], ids=["mount-table-full", "other"])
def test_a_branch_whose_overlay_the_kernel_refuses_is_not_created(tmp_path, track_store,
                                                                   monkeypatch, code):
    """A new branch's overlay is attached before its APPLY. A mount table at fs.mount-max
    refuses the attach with ENOSPC (any local user could fill it through snapshot views):
    the branch used to be recorded anyway, `cascowfs branch` exited 0, and its tree was a
    bare directory of the store that root's writes went into. Now the creation fails with
    the errno, naming the branch and the cause, and leaves no record, directory, mount or
    unfinished op; the branches that were there stay mounted."""
    from cascowfs import overlay
    from cascowfs.errors import CascowfsError
    from cascowfs.overlay import MountError

    store = track_store(tmp_path / "store")
    real_attach = overlay.attach

    def refused(fstype, target, mnt_fd):
        if Path(target).parent.name == "victim":
            raise MountError(f"attaching {fstype} at {target} failed: {os.strerror(code)}",
                             errno=code)
        return real_attach(fstype, target, mnt_fd)

    sm = StateManager.open(store)
    try:
        tree = sm.create_branch("a").tree
        (tree / "f").write_text("one\n")
        sm.commit("a", "s1")
        (tree / "uncommitted").write_text("agent work\n")
        view = dir_view(tree)
        monkeypatch.setattr(overlay, "attach", refused)
        with pytest.raises(CascowfsError) as info:
            sm.create_branch("victim", "s1")
        assert info.value.errno == code, info.value
        assert "creating branch victim" in str(info.value), info.value
        assert os.strerror(code) in str(info.value), info.value
        assert ("mount table is full" in str(info.value)) == (code == errno.ENOSPC)
        assert [b.name for b in sm.branches()] == ["a"]
        assert not (sm.branches_dir / "victim").exists()
        assert not [m for m in overlay.all_mounts() if "victim" in m.target]
        assert sm.wal.pending() == []
        assert_same_view(dir_view(tree), view, "the other branch")
        check_live(sm)
        monkeypatch.undo()
        victim = sm.create_branch("victim", "s1").tree
        assert os.path.ismount(victim) and (victim / "f").read_text() == "one\n"
    finally:
        sm.close()
    assert_fsck_clean(store)
    with conftest.open_store(store) as sm:
        check_live(sm)


def test_a_new_branch_refused_at_its_apply_leaves_no_mount(sm, monkeypatch):
    """A new branch's overlay is attached before its APPLY; an APPLY that then fails (its
    snapshot pruned meanwhile) unmounts it before its directory goes to the trash, where a
    mount used to wait for the next operation's housekeeping: fsck counted it as a mount no
    branch names."""
    from cascowfs import overlay

    sm.create_branch("a")
    sm.commit("a", "s1")

    def pruned_meanwhile(self, txn, parent, chain):
        raise NotFoundError(f"snapshot {parent!r} not found")

    monkeypatch.setattr(StateManager, "_check_chain", pruned_meanwhile)
    with pytest.raises(NotFoundError):
        sm.create_branch("victim", "s1")
    assert not [m for m in overlay.all_mounts() if m.target.startswith(str(sm.store))
                and "victim" in m.target]
    assert not (sm.branches_dir / "victim").exists() and sm.wal.pending() == []
    assert [b.name for b in sm.branches()] == ["a"]
    monkeypatch.undo()
    check_live(sm)
