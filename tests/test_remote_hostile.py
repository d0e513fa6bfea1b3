"""A remote written by someone hostile (docs/remotes.md, docs/security.md): keys that are no
index or pack, symbolic links in a directory remote, compressed bombs, parent loops, locks
that do not decode, URLs that say one place and mean another; and what a failed write leaves.
Against a real directory and the S3 server on 127.0.0.1, as tests/test_remotes.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

from conftest import open_store
from fusehelpers import mounted, needs_fuse, run_cli
from test_remotes import made_remote, make_tree, remote, s3_endpoint  # noqa: F401 (fixtures)
from cascowfs import codec
from cascowfs.errors import (BusyError, InvalidArgumentError, NoSpaceError, NotFoundError,
                             StoreIOError)
from cascowfs.fsck import fsck_store
from cascowfs.remote import config, locks, objectstore, packs, transfer
from cascowfs.remote.prune import prune


def _pushed(tmp_path: Path, rs, id: str = "s1") -> Path:
    """Store ``a`` holding snapshot ``id``, pushed to ``rs``."""
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / f"src-{id}", 7, files=6), id)
        transfer.push(sm, rs, [id])
    return tmp_path / "a"


# -- keys that are no index or pack -----------------------------------------------------------
def test_an_index_key_that_is_no_index_name_writes_nothing_and_is_ignored(remote, tmp_path):
    """A key ``index/./../../…/PWNED`` named a file outside the store's index cache, which a
    push or pull wrote (as root) before it checked the index; ``index/sub/x`` made every
    transfer ENOENT naming the cache. Now only names of 64 hex digits are indexes."""
    rs = objectstore.open_store(remote)
    a = _pushed(tmp_path, rs)
    target = tmp_path / "PWNED"
    if remote.scheme == "s3":
        escape = "index/./" + "../" * 24 + str(target).lstrip("/")
        for key in (escape, "index/sub/x", "index/short"):
            rs.client.put_object(Bucket=rs.bucket, Key=rs._key(key), Body=b"* * * * * root x\n")
    else:
        (tmp_path / "remote" / "index" / "sub").mkdir()
        (tmp_path / "remote" / "index" / "sub" / "x").write_bytes(b"junk")
        (tmp_path / "remote" / "index" / "short").write_bytes(b"junk")
    with open_store(tmp_path / "b") as sm:
        assert transfer.pull(sm, rs, ["s1"]).snapshots == ["s1"]
    with open_store(a) as sm:
        assert transfer.push(sm, rs, ["s1"]).skipped == ["s1"]
    assert not target.exists() and not Path(f"{target}.tmp").exists()
    for store in (a, tmp_path / "b"):
        cached = {p.name for p in (store / "remote-cache").rglob("*") if p.is_file()}
        assert cached and all(packs.is_name(name) for name in cached), cached


# -- symbolic links inside a directory remote ---------------------------------------------------
def _old_victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    for path in (victim / "passwd", victim / "sub" / "shadow"):
        path.write_text("precious\n")
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    return victim


def test_prune_follows_no_symlink_out_of_a_directory_remote(tmp_path):
    """``packs`` a symbolic link to another directory: prune listed it by following the link
    and deleted every file there older than its grace. Now EIO naming packs/, nothing
    deleted; a link or a stray file inside packs/ is no pack and stays."""
    victim = _old_victim(tmp_path)
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    (tmp_path / "remote" / "packs").symlink_to(victim)
    with pytest.raises(StoreIOError, match="packs/ is a symbolic link, which a directory "
                                           "remote never follows"):
        prune(rs, grace=0)
    assert sorted(p.name for p in victim.rglob("*")) == ["passwd", "shadow", "sub"]
    assert os.listdir(tmp_path / "remote" / "locks") == []  # its lock released
    (tmp_path / "remote" / "packs").unlink()
    (tmp_path / "remote" / "packs").mkdir()
    (tmp_path / "remote" / "packs" / ("ab" * 32)).symlink_to(victim / "passwd")
    (tmp_path / "remote" / "packs" / "notes").write_text("mine\n")
    os.utime(tmp_path / "remote" / "packs" / "notes", (0, 0))
    assert prune(rs, grace=0).packs_deleted == 0
    assert sorted(os.listdir(tmp_path / "remote" / "packs")) == ["ab" * 32, "notes"]
    assert (victim / "passwd").read_text() == "precious\n"


@pytest.mark.parametrize("linked", ["packs", "index", "tmp", "locks", "snapshots"])
def test_a_push_writes_nothing_through_a_symlink_in_a_directory_remote(tmp_path, linked):
    """A writer of the remote's directory links one of its directories elsewhere: a push (as
    root) wrote its files there. Now EIO naming the link, and nothing lands elsewhere."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / linked).symlink_to(victim)
    rs = objectstore.open_store(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 3, files=4), "s1")
        with pytest.raises(StoreIOError, match=f"{linked}/ is a symbolic link"):
            transfer.push(sm, rs, ["s1"])
    assert os.listdir(victim) == []


def test_a_ref_that_is_a_symlink_is_not_read_through(tmp_path):
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    (tmp_path / "remote" / "snapshots").mkdir()
    (tmp_path / "secret").write_text('{"id": "s1"}')
    (tmp_path / "remote" / "snapshots" / "s1").symlink_to(tmp_path / "secret")
    with pytest.raises(StoreIOError, match="snapshots/s1 is a symbolic link"):
        transfer.read_ref(rs, "s1")
    assert transfer.list_refs(rs) == []  # a listing shows regular files only


def test_a_directory_remote_is_private_whatever_the_umask(tmp_path):
    """A remote holds every pushed file's bytes without their modes, as the store does (whose
    077 umask a push runs under; a prune or another program may not)."""
    rs = objectstore.open_store(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    old = os.umask(0o022)
    try:
        rs.create()
        rs.put(packs.pack_key("ab" * 32), b"bytes")
        rs.put_new(transfer.ref_key("s1"), b"{}")
    finally:
        os.umask(old)
    root = tmp_path / "remote"
    assert (root.stat().st_mode & 0o777) == 0o700
    for path in root.rglob("*"):
        assert (path.stat().st_mode & 0o777) == (0o700 if path.is_dir() else 0o600), path


# -- compressed bombs -------------------------------------------------------------------------
_BOMB = 512 << 20  # declared bytes: more than any pack or index may hold


def _bomb(magic: bytes) -> bytes:
    """``magic`` and a frame of a few hundred KiB that declares (and holds) ``_BOMB`` zeros."""
    comp = zstandard.ZstdCompressor(level=1).compressobj(size=_BOMB)
    zeros = bytes(16 << 20)
    return magic + b"".join([comp.compress(zeros) for _ in range(_BOMB // len(zeros))]
                            + [comp.flush()])


def test_an_index_that_declares_too_much_is_refused_before_it_is_decompressed(remote, tmp_path):
    """A small index, named by its own hash, whose frame declares 512 MiB: every push, pull
    and prune decompressed it whole (2 GiB declared: 2.1 GB of RSS). Now EIO naming it."""
    rs = objectstore.open_store(remote)
    a = _pushed(tmp_path, rs)
    bomb = _bomb(packs.INDEX_MAGIC)
    assert len(bomb) < 1 << 20
    rs.put(packs.index_key(packs.name_of(bomb)), bomb)
    refused = f"index/{packs.name_of(bomb)}: a zstd frame that declares {_BOMB} bytes"
    with open_store(a) as sm, pytest.raises(StoreIOError, match=refused):
        transfer.push(sm, rs, ["s1"])
    with pytest.raises(StoreIOError, match=refused):
        prune(rs)


def test_a_pack_that_declares_more_than_its_index_says_is_refused(remote, tmp_path):
    """A bomb as a pack, with an index that names it and one object of 100 bytes in it."""
    rs = objectstore.open_store(remote)
    bomb = _bomb(packs.PACK_MAGIC)
    pack_name = packs.name_of(bomb)
    oid = bytes(range(32))
    index = packs.INDEX_MAGIC + codec.compress(
        packs._INDEX_HEAD.pack(bytes.fromhex(pack_name), len(bomb))
        + packs._ENTRY.pack(b"T", oid, 100))
    rs.put(packs.pack_key(pack_name), bomb)
    rs.put(packs.index_key(packs.name_of(index)), index)
    ref = transfer.RemoteSnapshot("s1", oid.hex(), None, 0, {}, 0, 0)
    rs.put_new(transfer.ref_key("s1"), ref.encode())
    with open_store(tmp_path / "b") as sm:
        with pytest.raises(StoreIOError, match=f"packs/{pack_name}: a zstd frame that declares "
                                               f"{_BOMB} bytes, more than the 137"):
            transfer.pull(sm, rs, ["s1"])
        assert not sm.has_snapshot("s1")


def test_an_index_naming_objects_no_push_sends_is_refused(tmp_path):
    oid = bytes(32)
    for entry, problem in [(packs._ENTRY.pack(b"T", oid, packs.OBJECT_MAX + 1), "which no push"),
                           (packs._ENTRY.pack(b"X", oid, 1), "which no push"),
                           (packs._ENTRY.pack(b"C", oid, packs.OBJECT_MAX) * 2, "describes a pack")]:
        index = packs.INDEX_MAGIC + codec.compress(packs._INDEX_HEAD.pack(oid, 1) + entry)
        with pytest.raises(StoreIOError, match=problem):
            packs.read_index(index, packs.name_of(index), "r")


def test_a_frame_of_no_declared_size_is_held_to_the_limit():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000))
    assert codec.decompress(frame, 1000) == bytes(1000)
    with pytest.raises(StoreIOError, match="does not decompress"):
        codec.decompress(frame, 999)


# -- parent loops -------------------------------------------------------------------------------
def _forge_ref(rs, id: str, like: str, parent: str | None) -> None:
    d = json.loads(rs.get(transfer.ref_key(like)))
    rs.put(transfer.ref_key(id), json.dumps(dict(d, id=id, parent=parent)).encode())


def test_a_pulled_ref_may_not_close_a_parent_loop(tmp_path):
    """A ref whose parent is itself, two that name each other, or one whose parent descends
    from it here: pulled as they were, the store held a loop (``tree MNT self`` printed
    without end). Now EIO naming the ref, before anything is fetched."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    _pushed(tmp_path, rs)
    _forge_ref(rs, "self", "s1", "self")
    _forge_ref(rs, "c1", "s1", "c2")
    _forge_ref(rs, "c2", "s1", "c1")
    _forge_ref(rs, "child", "s1", "orphan")  # pulled first: its parent is not here
    _forge_ref(rs, "orphan", "s1", "child")
    with open_store(tmp_path / "b") as sm:
        with pytest.raises(StoreIOError, match="snapshots/self would make snapshot self its "
                                               r"own ancestor \(parents self -> self\)"):
            transfer.pull(sm, rs, ["self"])
        with pytest.raises(StoreIOError, match="c2 -> c1 -> c2"):
            transfer.pull(sm, rs, ["c1"], with_ancestors=True)
        assert transfer.pull(sm, rs, ["child"]).snapshots == ["child"]
        with pytest.raises(StoreIOError, match="orphan -> child -> orphan"):
            transfer.pull(sm, rs, ["orphan"])
        assert [s.id for s in sm.snapshots()] == ["child"]
        with pytest.raises(InvalidArgumentError, match="its own ancestor"):  # the store's guard
            sm.receive_snapshot("orphan", sm.snapshot("child").root, "child", {}, 0,
                                lambda add: None)
    assert fsck_store(tmp_path / "b").ok


def _make_loop(sm, parents: dict[str, str]) -> None:
    """Give snapshots the ``parents`` no store operation gives (as an older pull did)."""
    def apply(txn):
        for id, parent in parents.items():
            sm.catalog.put_snapshot(txn, id, replace(sm.catalog.snapshot(txn, id), parent=parent))
    sm.db.write(apply, "a parent loop")


def test_fsck_reports_a_parent_loop(tmp_path):
    with open_store(tmp_path / "s") as sm:
        for id in ("a", "b", "c", "d"):
            sm.import_tree(make_tree(tmp_path / f"src-{id}", 1, files=2), id)
        _make_loop(sm, {"a": "a", "b": "c", "c": "b", "d": "b"})
    problems = fsck_store(tmp_path / "s").problems
    assert problems == ["invariant 2: snapshots a -> a are their own ancestors (a parent loop)",
                        "invariant 2: snapshots b -> c -> b are their own ancestors (a parent "
                        "loop)"], problems


@needs_fuse
def test_tree_shows_a_parent_loop_once_and_ends():
    def populate(fs):
        with open_store(fs.store) as sm:
            for id in ("root", "self", "c1", "c2"):
                sm.import_tree(make_tree(fs.base / f"src-{id}", 1, files=2), id)
            _make_loop(sm, {"self": "self", "c1": "c2", "c2": "c1"})

    with mounted(populate=populate) as fs:
        shown = run_cli("tree", str(fs.mnt), "self", timeout=60).stdout
        assert shown.split() == ["self"], shown
        every = run_cli("tree", str(fs.mnt), timeout=60).stdout
        assert sorted(every.split()) == ["c1", "c2", "root", "self", "└──"], every


# -- what a failed write leaves -----------------------------------------------------------------
def test_a_failed_write_leaves_no_partial_file_and_prune_clears_old_ones(tmp_path):
    """A push to a full disk left its partial pack under tmp/ for good, and so did a kill -9.
    Now a failed write removes its file, and prune removes what is older than its grace."""
    root = tmp_path / "remote"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        rs = objectstore.open_store(config.RemoteSpec("r", f"file://{root}"))
        with open_store(tmp_path / "a") as sm:
            (tmp_path / "src").mkdir()
            (tmp_path / "src" / "big").write_bytes(os.urandom(3 << 20))
            sm.import_tree(tmp_path / "src", "s1")
            with pytest.raises(NoSpaceError, match="remote .*, object packs/"):
                transfer.push(sm, rs, ["s1"])
        assert os.listdir(root / "tmp") == []
        assert os.listdir(root / "locks") == []
        (root / "tmp" / "killed").write_bytes(b"x" * 1000)  # as a kill -9 leaves it
        (root / "tmp" / "fresh").write_bytes(b"x")  # a lock being taken beside the prune
        os.utime(root / "tmp" / "killed", (time.time() - 7200, time.time() - 7200))
        stats = prune(rs)
        assert stats.tmp_deleted == 1 and os.listdir(root / "tmp") == ["fresh"]
    finally:
        subprocess.run(["umount", str(root)], check=True)


# -- locks that do not decode -------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"[]", b'{"time": "abc"}', b'{"time": null}', b"not json",
                                  b'{"time": NaN}', b"5", b"[" * 100_000,
                                  b'{"time": 1, "pad": "' + b"x" * (64 << 10) + b'"}'])
def test_a_lock_that_does_not_decode_holds_until_it_is_stale(remote, tmp_path, body):
    """Such a lock crashed push and pull with a traceback, and left the taker's own lock
    behind. Now it counts as held, as old as the listing says, named in the EBUSY."""
    rs = objectstore.open_store(remote)
    rs.create()
    rs.put("locks/exclusive-odd", body)
    with pytest.raises(BusyError, match="locks/exclusive-odd is held \\(a lock that does not "
                                        "decode"):
        locks.RemoteLock(rs, locks.SHARED).take()
    assert [listed.key for listed in rs.list("locks/")] == ["locks/exclusive-odd"]
    with pytest.raises(BusyError, match="locks/exclusive-odd"):
        prune(rs)
    assert [listed.key for listed in rs.list("locks/")] == ["locks/exclusive-odd"]
    lock = locks.RemoteLock(rs, locks.SHARED, stale_after=-1.0)  # every lock stale
    lock.take()
    lock.release()


def test_prune_deletes_the_locks_of_holders_killed_long_ago(tmp_path):
    """Nobody deleted a killed holder's lock, and every taker read every such lock, forever.
    Now a prune, beside which no lock is held, deletes those not rewritten for twice their
    stale age (whatever their body); a lock merely stale stays."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    now = time.time()
    for name, body, age in [("shared-killed", b'{"time": 0}', 3 * 3600),
                            ("exclusive-odd", b"not json", 3 * 3600),
                            ("shared-late", b'{"time": 0}', 45 * 60)]:
        rs.put(f"locks/{name}", body)
        os.utime(tmp_path / "r" / "locks" / name, (now - age, now - age))
    assert prune(rs).locks_deleted == 2
    assert [listed.key for listed in rs.list("locks/")] == ["locks/shared-late"]


def test_a_ref_that_does_not_decode_can_be_forgotten(remote, tmp_path):
    """``forget`` read the ref first, so one that does not decode (damaged, a newer version's)
    could not be deleted, and every prune failed on it for good."""
    rs = objectstore.open_store(remote)
    _pushed(tmp_path, rs, "s1")
    rs.put("snapshots/bad", b"not json")
    with pytest.raises(StoreIOError, match="snapshots/bad does not decode"):
        prune(rs)
    transfer.forget(rs, "bad")
    assert transfer.list_refs(rs) == ["s1"]
    assert prune(rs).snapshots == 1
    with pytest.raises(NotFoundError, match="no object snapshots/bad"):
        transfer.forget(rs, "bad")


def test_a_taker_that_fails_deletes_its_own_lock(remote, monkeypatch):
    rs = objectstore.open_store(remote)
    rs.create()
    rs.put("locks/exclusive-other", b"{}")

    def broken(key, **bounds):
        raise StoreIOError(f"cannot read {key}")

    monkeypatch.setattr(rs, "get", broken)
    with pytest.raises(StoreIOError, match="cannot read locks/exclusive-other"):
        locks.RemoteLock(rs, locks.SHARED).take()
    assert [listed.key for listed in rs.list("locks/")] == ["locks/exclusive-other"]


# -- URLs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["file:///x%00y", "file:///x/a\tb", "file:///x/a\nb",
                                 "file:///x/a%09b", "file:///x/a%0Ab", "s3://bucket/a\tb"])
def test_a_url_with_a_control_character_is_einval(tmp_path, url):
    """A percent-encoded NUL crashed with a traceback; a TAB or newline, which URL parsing
    drops, pointed elsewhere (``a<TAB>b`` wrote to ``ab``)."""
    with pytest.raises(InvalidArgumentError, match="control character"):
        config.check_url(url)
    with pytest.raises(InvalidArgumentError, match="control character"):
        config.resolve(tmp_path, url)


def test_reading_a_directory_remote_that_is_not_there_creates_nothing(tmp_path):
    """A pull from a mistyped path made the directory, with locks/ and tmp/, and then failed;
    ls-snapshots printed nothing. Now ENOENT naming it, and only a push makes it."""
    typo = tmp_path / "typo"
    rs = objectstore.open_store(config.RemoteSpec("r", f"file://{typo}"))
    missing = f"remote r \\(file://{typo}\\): no directory {typo}"
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 3, files=4), "s1")
        for read in (lambda: transfer.pull(sm, rs, ["s1"]), lambda: transfer.list_snapshots(rs),
                     lambda: prune(rs), lambda: transfer.forget(rs, "s1")):
            with pytest.raises(NotFoundError, match=missing):
                read()
            assert not typo.exists()
        assert transfer.push(sm, rs, ["s1"]).snapshots == ["s1"]
    assert [s.id for s in transfer.list_snapshots(rs)] == ["s1"]
