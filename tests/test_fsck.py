"""cascowfs/fsck.py: the store's invariants (docs/architecture.md) checked on a closed store,
each broken for real on disk, found, and named by invariant and object."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cascowfs import images, overlay
from cascowfs.fsck import fsck_store
from cascowfs.layers import remove_within_filesystem
from cascowfs.metadb import MetaDB
from cascowfs.pathquote import quote
from cascowfs.state import StateManager
from conftest import needs_overlay
from support.fuse import CLI, cascow_base, mounted, run_cli
from support.processes import REPO
from support.skips import needs_fuse


@pytest.fixture
def closed_store(tmp_path: Path, track_store) -> Iterator[dict]:
    """A store with an import, a commit on it and a live branch, closed with its branch
    mounted (as a stopped daemon leaves it); what the breakages need to know about it. Its
    mounts go with ``track_store``, a staging directory a breakage left goes here."""
    store = track_store(tmp_path / "store")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content of f")
    (src / "g").write_bytes(b"content of g")
    sm = StateManager.open(store)
    try:
        sm.import_tree(src, "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "g").write_bytes(b"changed g")
        sm.commit("b", "c1")
        sm.settle()
        facts = {"store": store, "root": sm.root_entry("c1").ref,
                 "layers": [p.name for p in sm.layer_chain("c1")],
                 "tree": sm.root_entry("base").ref}
    finally:
        sm.close()
    yield facts
    for entry in os.listdir(store / "staging"):
        shutil.rmtree(store / "staging" / entry)


def _objects(store: Path, change: Callable) -> None:
    db = MetaDB(store / "meta")
    try:
        db.write(lambda txn: change(txn, db.db("objects")))
    finally:
        db.close()


def _missing_object(s: dict) -> str:
    _objects(s["store"], lambda txn, objects: txn.delete(s["root"], db=objects))
    return f"invariant 1: snapshot c1: object {s['root'].hex()} is missing"


def _corrupt_object(s: dict) -> str:
    def flip(txn, objects):
        value = bytearray(txn.get(s["tree"], db=objects))
        value[-1] ^= 0xFF
        txn.put(s["tree"], bytes(value), db=objects)
    _objects(s["store"], flip)
    return f"object {s['tree'].hex()} does not match its id (corrupt)"


def _unreachable_object(s: dict) -> str:
    _objects(s["store"], lambda txn, objects: txn.put(b"\x01" * 32, b"\x00orphan", db=objects))
    return "invariant 3: object " + "01" * 32 + " is not reachable"


def _lost_layer(s: dict) -> str:
    remove_within_filesystem(s["store"] / "layers" / s["layers"][-1])
    return f"invariant 1: layer {s['layers'][-1]} is recorded but missing from layers/"


def _stray_layer(s: dict) -> str:
    (s["store"] / "layers" / "stray").mkdir()
    return "invariant 3: layer directory stray is not recorded"


def _left_staging(s: dict) -> str:
    (s["store"] / "staging" / "op-left").mkdir()
    return "invariant 5: staging directory op-left is left over"


def _unmounted_branch(s: dict) -> str:
    overlay.unmount(s["store"] / "branches" / "b" / "tree", lazy=False)
    return "invariant 4: branch b is not mounted"


def _stray_mount(s: dict) -> str:
    target = s["store"] / "branches" / "ghost"
    target.mkdir()
    lowers = [s["store"].parent / "top", s["store"].parent / "bottom"]
    for layer in lowers:
        layer.mkdir()
    overlay.mount_overlay(target, lowers)
    return f"invariant 4: mount at {target} is not named by any branch"


BREAKAGES = [_missing_object, _corrupt_object, _unreachable_object, _lost_layer, _stray_layer,
             _left_staging, _unmounted_branch, _stray_mount]


def test_a_sound_store_is_clean_and_counted(closed_store):
    report = fsck_store(closed_store["store"], deep=True)
    assert report.ok, report.problems
    assert (report.snapshots, report.branches) == (2, 1) and report.objects > 0


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_each_breakage_is_found_and_named(closed_store, breakage):
    want = breakage(closed_store)
    problems = fsck_store(closed_store["store"]).problems
    assert any(want in p for p in problems), f"wanted {want!r} among {problems}"


def test_only_a_deep_check_compares_layers_with_trees(closed_store, tmp_path):
    layer = closed_store["store"] / "layers" / closed_store["layers"][-1]
    if layer.is_file():  # an image: replaced by the image of another tree
        overlay.unmount_under(closed_store["store"] / "mounts")  # the branch keeps its own
        other = tmp_path / "other"
        (other / "d").mkdir(parents=True)
        (other / "d" / "f").write_bytes(b"not what the CAS holds")
        layer.unlink()
        images.build(other, layer, compress=True)
    else:
        victim = next(p for p in sorted(layer.rglob("*")) if p.is_file())
        os.chmod(victim, 0o600)
        victim.write_bytes(b"not what the CAS holds")
    assert fsck_store(closed_store["store"]).ok
    problems = fsck_store(closed_store["store"], deep=True).problems
    assert any(p.startswith("invariant 5: snapshot ") and "layers differ from its tree" in p
               for p in problems), problems


def test_an_image_with_a_torn_superblock_is_found_with_or_without_a_deep_check(closed_store):
    lid = closed_store["layers"][-1]
    layer = closed_store["store"] / "layers" / lid
    if not layer.is_file():
        pytest.skip("layers are directories here (no EROFS)")
    overlay.unmount_under(closed_store["store"] / "mounts")  # the branch keeps its own
    with open(layer, "r+b") as f:  # the superblock, torn
        f.seek(1024)
        f.write(bytes(128))
    assert f"invariant 1: layer {lid}: layer image {layer} is no EROFS image (damaged " \
        "superblock)" in fsck_store(closed_store["store"]).problems
    problems = fsck_store(closed_store["store"], deep=True).problems
    assert any("its layers do not mount" in p for p in problems), problems


def test_fsck_leaves_a_killed_daemons_write_ahead_log_as_it_found_it(closed_store):
    """fsck looks at a store as it was left: a log with a record torn by a kill and the zeros
    it was overwriting keeps every byte (recovery, not fsck, zeroes and trims it)."""
    log = closed_store["store"] / "wal" / "log"
    body = b'{"args":{"name":"b"},"kind":"discard","op":"0123456789","step":"prepare"}'
    left = log.read_bytes() + f"{zlib.crc32(body):08x} ".encode() + body[:30] + bytes(4096)
    log.write_bytes(left)
    fsck_store(closed_store["store"])
    assert log.read_bytes() == left


@needs_overlay
def test_a_deep_check_reports_a_missing_layer_and_goes_on(closed_store: dict) -> None:
    """A layer gone from layers/ used to end the deep check with a raw ENOENT (exit 3);
    each snapshot whose chain lacks it is reported, and the check goes on."""
    store = closed_store["store"]
    lost = closed_store["layers"][-1]  # the base's: under both chains
    overlay.unmount_under(store / "mounts")  # the branch keeps its own
    remove_within_filesystem(store / "layers" / lost)
    want = [f"invariant 1: snapshot {id}: layer {lost} of its chain is missing"
            for id in ("base", "c1")]
    want.append(f"invariant 1: layer {lost} is recorded but missing from layers/")
    problems = fsck_store(store, deep=True).problems
    assert set(want) <= set(problems), problems
    proc = run_cli("fsck", "--deep", "--json", str(store), check=False)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["ok"] and set(want) <= set(report["problems"]), report


@pytest.mark.parametrize("keys, want", [
    ("shared", "file '[cd]': a hard link of '[ab]' that is another file"),
    ("not by paths", "file 'a': a hard-link group keyed [0-9a-f]{32}, which its 2 member paths "
     "do not give"),
])
def test_hard_link_groups_keyed_otherwise_than_by_their_paths_are_found(
    tmp_path, track_store, monkeypatch, keys, want
):
    """Commits re-key only the hard-link groups their branch touched, so a stored key must be
    the one its members' paths give (imports made with other keys here)."""
    from cascowfs import scan

    store = track_store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for first, second, content in (("a", "b", b"one"), ("c", "d", b"two")):
        (src / first).write_bytes(content)
        os.link(src / first, src / second)
    canonical = scan.link_key
    other_keys = {
        "shared": lambda paths: b"k" * 16,  # both groups under one key
        "not by paths": lambda paths: canonical(paths)[::-1],
    }
    monkeypatch.setattr(scan, "link_key", other_keys[keys])
    sm = StateManager.open(store)
    try:
        sm.import_tree(src, "base")
    finally:
        sm.close()
    monkeypatch.undo()
    assert not any("hard" in p for p in fsck_store(store).problems)  # a deep check's work
    problems = fsck_store(store, deep=True).problems
    assert any(re.search(f"invariant 1: snapshot base: {want}", p) for p in problems), problems


# -- mounts an agent makes --------------------------------------------------------------------
@contextmanager
def _mounts(*points: tuple[list[str], Path]) -> Iterator[None]:
    """``mount ARGS POINT`` for each, each point made first; all lazily detached at the end
    (one a discard or an unmount took along is gone already)."""
    made: list[Path] = []
    try:
        for args, point in points:
            point.mkdir(exist_ok=True)
            subprocess.run(["mount", *args, str(point)], check=True)
            made.append(point)
        yield
    finally:
        for point in reversed(made):
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def _below(path: Path) -> list[str]:
    return [m.target for m in overlay.mounts_under(path)]


@needs_fuse
def test_a_mount_an_agent_makes_in_its_branch_tree_is_its_own_and_goes_with_the_branch():
    """A tmpfs and a bind mount inside a live branch's tree are the agent's business: fsck
    names no problem for them (an agent could otherwise fail fsck at will), a discard of the
    branch takes them along, and so does `umount --branches`. A stray mount whose name holds
    an escape sequence and a newline is a problem, printed escaped on one line."""
    hostile = "ghost\x1b[2J\ninvariant 0: all clear; store verified\x9b"
    with mounted() as fs, cascow_base() as elsewhere:
        mnt, store = str(fs.mnt), fs.store
        (elsewhere / "shared").mkdir()
        trees = {name: Path(run_cli("branch", mnt, name).stdout.strip()) for name in "ab"}
        agents = [m for tree in trees.values() for m in (
            (["-t", "tmpfs", "-o", "size=1m", "tmpfs"], tree / "scratch"),
            (["--bind", str(elsewhere / "shared")], tree / "scratch" / "bound"))]
        with _mounts(*agents):
            run_cli("discard", mnt, "a")
            assert not [t for t in _below(fs.base) if "/scratch" in t and "/a/" in t]
            fs.stop()  # the branches stay mounted, b's tree with the agent's mounts in it
            assert str(trees["b"] / "scratch" / "bound") in _below(store)
            proc = run_cli("fsck", str(store))
            assert proc.stdout == "" and proc.stderr.startswith("clean"), proc
            with _mounts((["-t", "tmpfs", "-o", "size=1m", "tmpfs"],
                          store / "branches" / hostile)):
                proc = _raw_cli("fsck", str(store))
                assert proc.returncode == 1, proc
                out = proc.stdout.decode("utf-8")
                assert out.endswith("\n") and out[:-1].isprintable(), out
                stray = quote(str(store / "branches" / hostile))
                assert out == f"invariant 4: mount at {stray} is not named by any branch\n"
            run_cli("umount", "--branches", str(store))
            assert _below(store) == []
        fs.start()


def _raw_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=120, cwd=REPO)
