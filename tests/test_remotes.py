"""Remotes (docs/remotes.md): push and pull through a real S3 server on 127.0.0.1 (moto's,
started once per session) and through a file:// directory, with the same tests."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError

from conftest import assert_fsck_clean, dir_view, needs_overlay, open_store, snapshot_view
from support.processes import REPO, child_env
from support.s3server import new_bucket, s3_server, set_credentials
from cascowfs.errors import (BusyError, ExistsError, InvalidArgumentError, NotFoundError,
                             PermissionDeniedError, StoreIOError)
from cascowfs.catalog import Observation
from cascowfs.model import Entry
from cascowfs.scan import link_key
from cascowfs.episodes import label_matcher
from cascowfs.remote import config, locks, objectstore, packs, transfer
from cascowfs.remote.prune import prune
from cascowfs.cas import payload_children, prepare_content
from cascowfs.codec import object_id
from cascowfs.trees import INDEX_VERSION, listing_totals, stored_payload, tree_objects


@pytest.fixture(scope="session")
def s3_endpoint():
    set_credentials()
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path) -> config.RemoteSpec:
    if request.param == "file":
        (tmp_path / "remote").mkdir()  # a push makes it; reading one that is not there: ENOENT
        return config.RemoteSpec("r", f"file://{tmp_path}/remote")
    endpoint = request.getfixturevalue("s3_endpoint")
    return config.RemoteSpec("r", f"s3://{new_bucket(endpoint)}/some/prefix", endpoint)


def made_remote(spec: config.RemoteSpec) -> objectstore.ObjectStore:
    """The remote of ``spec``, its directory made (as a push makes it)."""
    rs = objectstore.open_store(spec)
    rs.create()
    return rs


def make_tree(root: Path, seed: int, files: int = 30) -> Path:
    rng = random.Random(seed)
    (root / "d" / "e").mkdir(parents=True)
    for i in range(files):
        where = root / ("d/e" if i % 3 == 0 else "d" if i % 3 == 1 else "")
        (where / f"f{i}").write_bytes(rng.randbytes(rng.choice([0, 10, 5000, 200_000])))
    (root / "big").write_bytes(rng.randbytes(3 << 20))
    os.symlink("d/f1", root / "link")
    os.setxattr(root / "d" / "f1", "user.note", b"kept")
    return root


def stores(tmp_path: Path, *names: str):
    return [tmp_path / n for n in names]


def _pushed_objects(spec) -> set[bytes]:
    return set(transfer.read_indexes(objectstore.open_store(spec)).packs)


def test_import_push_pull_round_trip(remote, tmp_path):
    src = make_tree(tmp_path / "src", 1)
    rs = objectstore.open_store(remote)
    a, b = stores(tmp_path, "a", "b")
    with open_store(a) as sm:
        sm.import_tree(src, "base", {"task": "t1", "reward": "0.5"})
        stats = transfer.push(sm, rs, ["base"])
        want = snapshot_view(sm, "base")
        info = sm.snapshot("base")
    assert stats.snapshots == ["base"] and stats.packs >= 2  # data and metadata apart
    with open_store(b) as sm:
        got = transfer.pull(sm, rs, ["base"])
        assert got.snapshots == ["base"]
        assert snapshot_view(sm, "base") == want
        pulled = sm.snapshot("base")
        assert (pulled.root, pulled.labels, pulled.parent, pulled.created_ns) == (
            info.root, info.labels, info.parent, info.created_ns)
        sm.settle()  # its layer written from the CAS
    assert_fsck_clean(b)
    listed = transfer.list_snapshots(rs)
    assert [(s.id, s.labels) for s in listed] == [("base", {"task": "t1", "reward": "0.5"})]


def test_a_second_push_sends_only_what_is_new(remote, tmp_path):
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 2), "base")
        sm.import_tree(make_tree(tmp_path / "src2", 2), "same-content")
        transfer.push(sm, rs, ["base"])
        again = transfer.push(sm, rs, ["base", "same-content"])
        assert again.skipped == ["base"] and again.snapshots == ["same-content"]
        # the directories' mtimes differ, every file's content is there already: only the
        # four trees (superroot, root, d, d/e) travel
        assert again.objects == 4 and again.bytes < 8192, again
        assert again.index_read == 0  # the indexes of the first push are cached in the store
        assert transfer.pull(sm, rs, ["base"]).skipped == ["base"]


@needs_overlay
def test_push_with_ancestors_stops_at_a_pruned_one(remote, tmp_path):
    """A search prunes as it goes: the lineage pushed is what is left of it."""
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 2), "root")
        tree = sm.create_branch("b", "root").tree
        for n in range(3):
            (tree / f"step{n}").write_text(str(n))
            sm.commit("b", f"s{n}")
        sm.discard("b")
        sm.prune("root")
        sm.prune("s1")  # a hole in the middle too
        stats = transfer.push(sm, rs, ["s2"], with_ancestors=True)
        assert stats.snapshots == ["s2"]
        stats = transfer.push(sm, rs, ["s0", "s2"], with_ancestors=True)
        assert stats.snapshots == ["s0"] and stats.skipped == ["s2"]
    with open_store(tmp_path / "b") as sm:
        got = transfer.pull(sm, rs, ["s2"], with_ancestors=True)
        assert got.snapshots == ["s2"] and sm.snapshot("s2").parent == "s1"

class _CountedId(str):
    """An id that counts how often it is compared, to see a walk's cost without a clock."""

    compared = 0

    def __eq__(self, other):
        _CountedId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_with_ancestors_follows_each_snapshot_once():
    """A lineage of a long search (thousands of commits) is gathered in time linear in its
    length, shared ancestors once, oldest first."""
    depth = 3000

    def parent_of(id):
        n = int(id[1:])
        return _CountedId(f"s{n - 1}") if n > 0 else None

    _CountedId.compared = 0
    ids = transfer._with_ancestors([_CountedId(f"s{depth - 1}"), _CountedId("s5")], parent_of)
    assert _CountedId.compared < depth  # a walk with list membership compares ~depth²/2 times
    assert ids == [f"s{n}" for n in range(depth)]
    branched = {"t1": "t0", "t0": "s2"}
    ids = transfer._with_ancestors(["t1", "s4"], lambda i: branched.get(i) or parent_of(i))
    assert ids == ["s0", "s1", "s2", "t0", "t1", "s3", "s4"]


@needs_overlay
def test_lineage_labels_and_delta_push(remote, tmp_path):
    """A child of a pushed snapshot sends about its changed bytes; pull --with-ancestors
    brings the parent chain with labels and parents as they were."""
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 3), "base", {"gen": "0"})
        transfer.push(sm, rs, ["base"])
        tree = sm.create_branch("b", "base").tree
        edit = random.Random(9).randbytes(50_000)
        (tree / "d" / "new").write_bytes(edit)
        sm.commit("b", "child", {"gen": "1"})
        (tree / "d" / "f1").write_bytes(b"changed")
        sm.commit("b", "grandchild", {"gen": "2"})
        stats = transfer.push(sm, rs, ["grandchild"], with_ancestors=True)
        assert stats.snapshots == ["child", "grandchild"]
        # the edits, compressed random bytes, plus trees along two paths: < 2x + 64 KiB
        assert stats.bytes < 2 * (len(edit) + 7) + (64 << 10), stats
        views = {i: snapshot_view(sm, i) for i in ("base", "child", "grandchild")}
        sm.discard("b")
    with open_store(tmp_path / "b") as sm:
        got = transfer.pull(sm, rs, ["grandchild"], with_ancestors=True)
        assert got.snapshots == ["base", "child", "grandchild"]
        for i, view in views.items():
            assert snapshot_view(sm, i) == view
        assert sm.snapshot("grandchild").parent == "child"
        assert sm.snapshot("child").parent == "base"
        assert sm.snapshot("child").labels == {"gen": "1"}
        tree = sm.create_branch("w", "grandchild").tree  # mounts the pulled layers
        assert (tree / "d" / "f1").read_bytes() == b"changed"
        assert (tree / "d" / "new").read_bytes() == edit
        sm.discard("w")


@needs_overlay
def test_an_observation_travels_with_its_snapshot_and_prune_keeps_it(remote, tmp_path):
    rs = objectstore.open_store(remote)
    data = os.urandom(3 << 20) + bytes(1 << 20) + b"tail"  # chunks and a hole
    trace = tmp_path / "trace.log"
    trace.write_bytes(data)
    os.chmod(trace, 0o640)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 3), "base")
        transfer.push(sm, rs, ["base"])
        sm.create_branch("work", "base")
        fd = os.open(trace, os.O_RDONLY)
        try:
            sm.commit("work", "o", {"reward": "1"}, obs=fd)  # the tree of base, unchanged
        finally:
            os.close(fd)
        sm.discard("work")
        want = sm.observation("o")
        sent = transfer.push(sm, rs, ["o"])
    assert want is not None and sent.snapshots == ["o"]
    assert sent.objects >= 3  # the tree was there: what travelled is the observation
    assert transfer.read_ref(rs, "o").obs == want
    # its packs hold nothing else, so only the ref's observation keeps them
    assert prune(rs, grace=0).packs_deleted == 0
    with open_store(tmp_path / "b") as sm:
        assert transfer.pull(sm, rs, ["o"]).snapshots == ["o"]
        assert sm.observation("o") == want
        assert sm.read_file(bytes.fromhex(want.ref), 0, len(data)) == data
        sm.settle()
    assert_fsck_clean(tmp_path / "b")


def test_a_pulled_observation_must_hold_what_its_ref_says(remote, tmp_path):
    """A ref is another machine's word: an observation whose content is no file content, or
    holds another size than the ref says, is refused (EIO) and no snapshot is recorded."""
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 4), "base")
        transfer.push(sm, rs, ["base"])
        big = sm.read_tree(sm.root_entry("base").ref)[b"big"].ref  # a file's 3 MiB content
    base = transfer.read_ref(rs, "base")
    lies = {
        "tree": (Observation(base.root, 10, 0o644, 0, 0), "is not file content"),
        "size": (Observation(big.hex(), 1, 0o644, 0, 0), f"holds {3 << 20} bytes, not the 1"),
    }
    for id, (obs, _) in lies.items():
        ref = transfer.RemoteSnapshot(id, base.root, None, 0, {}, base.files, base.size, obs)
        rs.put(transfer.ref_key(id), ref.encode())
    with open_store(tmp_path / "b") as sm:
        for id, (_, problem) in lies.items():
            with pytest.raises(StoreIOError, match=f"observation of snapshot {id}.*{problem}"):
                transfer.pull(sm, rs, [id])
            assert not sm.has_snapshot(id)
    assert_fsck_clean(tmp_path / "b")


_GOOD_OBS = {"ref": "ab" * 32, "size": 7, "mode": 0o4750, "uid": 1000, "gid": (1 << 32) - 2}


@pytest.mark.parametrize("field, value", [
    ("created_ns", 10**30), ("created_ns", 1 << 63), ("created_ns", -1),  # no stat time
    ("created_ns", "5"), ("created_ns", 1.5), ("created_ns", True), ("files", -1),
    ("size", None), ("root", "AB" * 32), ("root", "ab" * 31), ("root", 5), ("parent", "../x"),
    ("parent", 5), ("labels", {"obs": "1"}), ("labels", ["a"]), ("labels", "x"), ("labels", 5),
    ("obs", []), ("obs", "x"), ("obs", {k: v for k, v in _GOOD_OBS.items() if k != "gid"}),
    ("obs", dict(_GOOD_OBS, more=1)),
    ("obs", dict(_GOOD_OBS, ref="ab")),  # no content id
    ("obs", dict(_GOOD_OBS, ref="AB" * 32)),  # not as the store spells it
    ("obs", dict(_GOOD_OBS, ref="zz" * 32)),
    ("obs", dict(_GOOD_OBS, ref="")),  # bytes, but no content
    ("obs", dict(_GOOD_OBS, size=0)),  # content, but no bytes
    ("obs", dict(_GOOD_OBS, size=-1)), ("obs", dict(_GOOD_OBS, size=True)),
    ("obs", dict(_GOOD_OBS, size=1.5)), ("obs", dict(_GOOD_OBS, mode=0o10000)),
    ("obs", dict(_GOOD_OBS, uid=-1)), ("obs", dict(_GOOD_OBS, gid=(1 << 32) - 1)),
    ("obs", dict(_GOOD_OBS, uid="0")),
])  # fmt: skip
def test_a_hostile_ref_is_named(tmp_path, field, value):
    """A ref is held to what a store records: a time a stat can show, counts, a content id
    spelled as the store spells it, an observation as a commit records one."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    good = transfer.RemoteSnapshot("s", "0" * 64, None, 0, {}, 0, 0, Observation(**_GOOD_OBS))
    rs.put("snapshots/s", good.encode())
    assert transfer.read_ref(rs, "s") == good
    rs.put("snapshots/s", json.dumps(dict(json.loads(good.encode()), **{field: value})).encode())
    with pytest.raises(StoreIOError, match="snapshots/s does not decode"):
        transfer.read_ref(rs, "s")


@pytest.mark.parametrize("raw, why", [(b"[" * 100_000, "nested too deep"),
                                      (b'{"labels": ' + b"[" * 100_000, "nested too deep"),
                                      (b"[]", "a JSON list, not an object"),
                                      (b"5", "a JSON int, not an object")])
def test_a_ref_that_is_no_object_or_nested_too_deep_does_not_decode(tmp_path, raw, why):
    """JSON nested thousands deep crashed every reader of the ref with a RecursionError; JSON
    that is no object is named as such."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    rs.put("snapshots/s", raw)
    with pytest.raises(StoreIOError, match=f"snapshots/s does not decode: {why}$"):
        transfer.read_ref(rs, "s")
    with pytest.raises(StoreIOError, match=f"snapshots/s does not decode: {why}$"):
        transfer.list_snapshots(rs)


def test_conditional_put_one_of_two_racers_wins(remote):
    rs = objectstore.open_store(remote)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def racer(n: int) -> None:
        barrier.wait()
        try:
            objectstore.open_store(remote).put_new("snapshots/x", f"{n}".encode())
            results.append("won")
        except ExistsError as exc:
            assert "snapshots/x" in str(exc) and remote.url in str(exc)
            results.append("lost")

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]
    assert rs.get("snapshots/x") in [f"{n}".encode() for n in range(8)]


def test_two_stores_push_the_same_id_with_different_trees(remote, tmp_path):
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as a, open_store(tmp_path / "b") as b:
        a.import_tree(make_tree(tmp_path / "s1", 4), "same")
        b.import_tree(make_tree(tmp_path / "s2", 5), "same")
        errors: list[Exception] = []

        def push(sm) -> None:
            try:
                transfer.push(sm, objectstore.open_store(remote), ["same"])
            except ExistsError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=push, args=(sm,)) for sm in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 1 and "snapshot same" in str(errors[0]), errors
        winner = transfer.read_ref(rs, "same").root
        assert winner in (a.snapshot("same").root, b.snapshot("same").root)


def test_two_stores_push_concurrently_and_share_objects(remote, tmp_path):
    src = make_tree(tmp_path / "src", 6)
    sms = []
    with open_store(tmp_path / "a") as a, open_store(tmp_path / "b") as b:
        for n, sm in enumerate((a, b)):
            sm.import_tree(src, f"from-{n}", {"n": str(n)})
            sms.append(sm)
        failures: list[BaseException] = []

        def push(sm, id) -> None:
            try:
                transfer.push(sm, objectstore.open_store(remote), [id])
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=push, args=(sm, f"from-{n}")) for n, sm in enumerate(sms)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        want = snapshot_view(a, "from-0")
    with open_store(tmp_path / "c") as c:
        transfer.pull(c, objectstore.open_store(remote), ["from-0", "from-1"])
        assert snapshot_view(c, "from-0") == want == snapshot_view(c, "from-1")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupted_pack_is_an_error_naming_it(remote, tmp_path, damage):
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 7), "base")
        transfer.push(sm, rs, ["base"])
    for listed in rs.list("packs/"):
        data = bytearray(rs.get(listed.key))
        if damage == "flip":
            data[len(data) // 2] ^= 0x40
        else:
            del data[len(data) // 2 :]
        rs.put(listed.key, bytes(data))
    with open_store(tmp_path / "b") as sm:
        with pytest.raises(StoreIOError) as caught:
            transfer.pull(sm, rs, ["base"])
        assert "packs/" in str(caught.value) and remote.url in str(caught.value)
        assert "corrupt or truncated" in str(caught.value)
        assert not sm.has_snapshot("base")
    assert_fsck_clean(tmp_path / "b")


def test_a_corrupted_data_pack_fetched_ahead_is_an_error_naming_it(remote, tmp_path,
                                                                   monkeypatch):
    """Data packs are fetched ahead on the pull's threads: a damaged one still fails the
    pull naming it, and nothing of the snapshot is recorded."""
    monkeypatch.setattr(packs, "PACK_TARGET", 1 << 20)
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 12), "base")
        transfer.push(sm, rs, ["base"])
    data_packs = [
        listed.key for listed in rs.list("packs/")
        if any(kind == b"C" for kind, _, _ in packs.read_pack(
            rs.get(listed.key), listed.key.removeprefix("packs/"), "t"))
    ]
    damaged = data_packs[len(data_packs) // 2]
    data = bytearray(rs.get(damaged))
    data[-1] ^= 0x01
    rs.put(damaged, bytes(data))
    with open_store(tmp_path / "b") as sm:
        with pytest.raises(StoreIOError) as caught:
            transfer.pull(sm, rs, ["base"])
        assert damaged in str(caught.value) and remote.url in str(caught.value)
        assert not sm.has_snapshot("base")
    assert_fsck_clean(tmp_path / "b")


def test_an_object_not_matching_its_id_is_refused():
    builder = packs.PackBuilder()
    builder.add(b"C", bytes(32), b"not what the id says")
    name, data, _, _ = builder.seal()
    with pytest.raises(StoreIOError, match=f"object {'00' * 32} in packs/{name}"):
        list(packs.read_pack(data, name, "r"))


PUSH_CHILD = r"""
import os, signal, sys
from cascowfs.state import StateManager
from cascowfs.remote import config, objectstore, transfer
store, url, endpoint, kill_after = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
rs = objectstore.open_store(config.RemoteSpec("r", url, endpoint))
put, sent = rs.put, []
def dying_put(key, data):
    if key.startswith("packs/") and len(sent) >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-push, a pack about to go
    put(key, data)
    if key.startswith("index/"):
        sent.append(key)
rs.put = dying_put
sm = StateManager.open(store)
transfer.push(sm, rs, ["base"])
print("COMPLETED")
"""


def test_an_interrupted_push_resumes_without_resending(remote, tmp_path, monkeypatch):
    """kill -9 of the pushing process after two packs landed: the next push sends only the
    rest, and the remote never showed a half snapshot meanwhile."""
    monkeypatch.setattr(packs, "PACK_TARGET", 1 << 20)
    a = tmp_path / "a"
    with open_store(a) as sm:
        src = make_tree(tmp_path / "src", 8, files=20)
        for i in range(4):
            (src / f"more{i}").write_bytes(random.Random(i).randbytes(1 << 20))
        sm.import_tree(src, "base")
    code = "from cascowfs.remote import packs; packs.PACK_TARGET = 1 << 20\n" + PUSH_CHILD
    proc = subprocess.run(
        [sys.executable, "-c", code, str(a), remote.url, remote.endpoint_url or "", "2"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rs = objectstore.open_store(remote)
    assert transfer.list_refs(rs) == []  # no ref before everything landed
    landed = _pushed_objects(remote)
    with open_store(a) as sm:
        stats = transfer.push(sm, rs, ["base"])
        assert stats.snapshots == ["base"]
        total = len(_pushed_objects(remote))
        assert landed and stats.objects == total - len(landed)  # only what had not landed
        want = snapshot_view(sm, "base")
    with open_store(tmp_path / "b") as sm:
        transfer.pull(sm, rs, ["base"])
        assert snapshot_view(sm, "base") == want
    # the pack the kill cut off (a file remote may hold it whole, no index names it) goes
    # with a prune past its grace period
    stats = prune(rs, grace=0, stale_after=0)
    assert stats.packs_kept == len(rs.list("packs/")) == len(rs.list("index/"))


def _indexes_are_closed(rs) -> set[str]:
    """Every pack an index names is there, and every object an index names has its
    children named too; returns the names of those packs."""
    known = transfer.read_indexes(rs)
    reader = transfer.PackReader(rs, known, transfer.TransferStats())
    try:
        for oid, kind in known.kinds.items():
            if kind != b"C":
                assert all(c in known.packs for c in payload_children(*reader.get(oid, "t")))
    finally:
        reader.close()
    named = {index.pack for index in known.indexes}
    assert named <= {listed.key.removeprefix("packs/") for listed in rs.list("packs/")}
    return named


def test_a_failed_upload_stops_the_push_naming_the_pack(remote, tmp_path, monkeypatch):
    """A data pack's upload fails on its thread while the metadata pack naming its chunks is
    in flight: the push raises an error naming the remote and that pack, writes no ref and
    no index that names an object whose children are missing; the next push sends only
    the packs that had not landed."""
    monkeypatch.setattr(packs, "PACK_TARGET", 1 << 20)
    monkeypatch.setattr(transfer, "UPLOADS", 16)  # every pack in flight at once
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        src = make_tree(tmp_path / "src", 9, files=20)
        for i in range(4):
            (src / f"more{i}").write_bytes(random.Random(i).randbytes(1 << 20))
        sm.import_tree(src, "base")
        put, packs_put, failed = rs.put, [], []
        count, metadata_going = threading.Lock(), threading.Event()
        fail_at = {"pack": 2}

        def failing_put(key: str, data: bytes) -> None:
            if not key.startswith("packs/"):
                return put(key, data)
            name = key.removeprefix("packs/")
            if all(kind != b"C" for kind, _, _ in packs.read_pack(data, name, "t")):
                metadata_going.set()
            with count:
                packs_put.append(key)
                fail = len(packs_put) == fail_at["pack"]
            if fail:
                failed.append(key)
                metadata_going.wait(60)  # fail once the metadata pack is on its way
                with rs._errors(key):
                    if remote.scheme == "file":
                        raise OSError(errno.EIO, "injected")
                    raise EndpointConnectionError(endpoint_url=remote.endpoint_url)
            return put(key, data)

        rs.put = failing_put
        with pytest.raises(StoreIOError) as caught:
            transfer.push(sm, rs, ["base"])
        assert remote.url in str(caught.value) and failed[0] in str(caught.value)
        assert metadata_going.is_set()
        assert transfer.list_refs(rs) == []
        landed = _indexes_are_closed(rs)
        assert failed[0].removeprefix("packs/") not in landed
        packs_put.clear()
        fail_at["pack"] = 0  # none fails now: the push's pack puts are only counted
        stats = transfer.push(sm, rs, ["base"])
        assert stats.snapshots == ["base"]
        assert not landed & {key.removeprefix("packs/") for key in packs_put}
        _indexes_are_closed(rs)
        want = snapshot_view(sm, "base")
    with open_store(tmp_path / "b") as sm:
        transfer.pull(sm, rs, ["base"])
        assert snapshot_view(sm, "base") == want


def test_prune_reclaims_what_no_ref_reaches(remote, tmp_path):
    rs = objectstore.open_store(remote)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "s1", 10), "one")
        sm.import_tree(make_tree(tmp_path / "s2", 11), "two")
        transfer.push(sm, rs, ["one", "two"])
        want = snapshot_view(sm, "two")
    before = len(rs.list("packs/"))
    transfer.forget(rs, "one")
    with pytest.raises(NotFoundError, match="snapshots/one"):
        transfer.forget(rs, "one")
    stats = prune(rs)
    assert stats.packs_deleted >= 1 and stats.bytes_deleted > 0
    assert len(rs.list("packs/")) == before - stats.packs_deleted
    with open_store(tmp_path / "b") as sm:
        transfer.pull(sm, rs, ["two"])
        assert snapshot_view(sm, "two") == want


@pytest.mark.parametrize("again", ["same-snapshot", "same-content"])
def test_a_push_after_a_prune_resends_what_the_prune_took(remote, tmp_path, again):
    """Prune kept a metadata pack for one live tree (``keep/``, in both snapshots) and deleted
    the data pack of the forgotten snapshot's file; the kept pack's index still named that
    file's chunk list, so a later push of the same content skipped it as there, and wrote a
    ref no pull could read. Now what a kept pack's objects reach is kept."""
    rs = objectstore.open_store(remote)
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    os.symlink("x", src / "keep" / "l")  # a tree naming no chunk
    old = random.Random(1).randbytes(3 << 20)
    (src / "big").write_bytes(old)
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(src, "one")
        transfer.push(sm, rs, ["one"])
        (src / "big").write_bytes(random.Random(2).randbytes(3 << 20))
        sm.import_tree(src, "two")
        transfer.push(sm, rs, ["two"])
        transfer.forget(rs, "one")
        stats = prune(rs, grace=0)
        assert stats.packs_kept >= 2  # both metadata packs: one for keep/ only
        _indexes_are_closed(rs)
        if again == "same-content":
            (tmp_path / "src2").mkdir()
            (tmp_path / "src2" / "big").write_bytes(old)
            sm.import_tree(tmp_path / "src2", "three")
        id = "one" if again == "same-snapshot" else "three"
        assert transfer.push(sm, rs, [id]).snapshots == [id]
        want = snapshot_view(sm, id)
    _indexes_are_closed(rs)
    with open_store(tmp_path / "b") as sm:
        transfer.pull(sm, rs, [id, "two"])
        assert snapshot_view(sm, id) == want
    assert_fsck_clean(tmp_path / "b")


def test_prune_racing_pushes_never_loses_a_pushed_snapshot(remote, tmp_path):
    """Pushes and prunes in loops at once: each prune either runs alone or backs off with
    EBUSY naming the lock, each push waits a prune out; every snapshot a push reported
    stays whole on the remote."""
    ids = [f"s{i}" for i in range(6)]
    with open_store(tmp_path / "a") as sm:
        for i, id in enumerate(ids):
            sm.import_tree(make_tree(tmp_path / f"src{i}", 20 + i, files=8), id)
        pushed: list[str] = []
        outcomes: list[str] = []
        done = threading.Event()

        def pusher() -> None:
            try:  # a failure leaves ``pushed`` short, which the test reports
                for id in ids:
                    pushed.extend(transfer.push(sm, objectstore.open_store(remote), [id]).snapshots)
                    if id == "s2":
                        transfer.forget(objectstore.open_store(remote), "s1")
                        pushed.remove("s1")
            finally:
                done.set()

        def pruner() -> None:
            while not done.is_set():
                try:
                    prune(objectstore.open_store(remote), grace=0)
                    outcomes.append("ran")
                except BusyError as exc:
                    outcomes.append("busy" if "locks/shared-" in str(exc) else repr(exc))
                except BaseException as exc:
                    outcomes.append(repr(exc))

        threads = [threading.Thread(target=pusher), threading.Thread(target=pruner)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        views = {id: snapshot_view(sm, id) for id in pushed}
    assert pushed == ["s0", "s2", "s3", "s4", "s5"]
    assert set(outcomes) <= {"ran", "busy"}, outcomes
    prune(objectstore.open_store(remote), grace=0)
    with open_store(tmp_path / "b") as sm:
        transfer.pull(sm, objectstore.open_store(remote), pushed)
        for id in pushed:
            assert snapshot_view(sm, id) == views[id]


def test_a_prune_lock_holds_pushes_back_and_a_stale_one_does_not(remote, tmp_path):
    rs = objectstore.open_store(remote)
    held = locks.RemoteLock(rs, locks.EXCLUSIVE)
    held.take()
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 30, files=3), "x")
        with pytest.raises(BusyError, match="locks/exclusive-"):
            locks.RemoteLock(rs, locks.SHARED).take(wait=0.2)
        assert len(rs.list("locks/")) == 1  # the push took its lock back
        pusher = threading.Thread(target=transfer.push, args=(sm, rs, ["x"]))
        pusher.start()  # waits for the prune's lock to go
        pusher.join(0.5)
        assert pusher.is_alive() and transfer.list_refs(rs) == []
        held.release()
        pusher.join()
        assert transfer.list_refs(rs) == ["x"]
        held = locks.RemoteLock(rs, locks.EXCLUSIVE)
        held.take()
        locks.RemoteLock(rs, locks.SHARED, stale_after=0).take()  # a killed holder's lock
    held.release()


def _taken(rs, kind: str) -> str:
    """Whether a lock of ``kind`` could be taken now ("taken", released again) or not."""
    lock = locks.RemoteLock(rs, kind)
    try:
        lock.take()
    except BusyError:
        return "busy"
    lock.release()
    return "taken"


class _Clock:
    """The clock of locks.py (``monkeypatch.setattr(locks, "time", clock)``), which a test
    moves on by hand: no test waits real minutes, or real seconds on a loaded machine."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    monotonic = time

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


class _ClockedRemote:
    """Remote ``rs`` whose listing gives a lock the time of ``clock`` when it was written last,
    as S3 gives its server's time: the remote's clock, moved on with the lock holders'."""

    def __init__(self, rs, clock: _Clock) -> None:
        self._rs, self._clock, self.written = rs, clock, {}

    def __getattr__(self, name):
        return getattr(self._rs, name)

    def put(self, key, data):
        self._rs.put(key, data)
        if key.startswith("locks/"):
            self.written[key] = self._clock.now

    def list(self, prefix):
        return [dataclasses.replace(listed, modified=self.written.get(listed.key, listed.modified))
                for listed in self._rs.list(prefix)]


def _long_reads(rs: _ClockedRemote, clock: _Clock, prefix: str, probe) -> list[str]:
    """Make ``rs``'s first read of a key under ``prefix`` take longer than a lock's stale age
    (on ``clock``), and its second call ``probe`` as it starts; returns what probe said."""
    get, reads, probed, guard = rs._rs.get, [], [], threading.Lock()

    def long_get(key, **kw):
        if key.startswith(prefix):
            with guard:
                reads.append(key)
                n = len(reads)
            if n == 1:
                clock.now += locks.STALE_AFTER + 60
            elif n == 2:
                probed.append(probe())
        return get(key, **kw)

    rs.get = long_get
    return probed


@pytest.mark.parametrize("work", ["prune", "pull", "push"])
def test_a_long_prune_pull_or_push_keeps_its_lock(remote, tmp_path, monkeypatch, work):
    """Only a push between packs rewrote its lock: a prune or a pull reading packs, or a push
    reading the indexes of a big remote, for longer than the stale age lost it, and a push
    ran beside the prune (or a prune beside the pull or push). Now a holder rewrites its
    lock at every step: the second read, after a first of 31 minutes, finds it held."""
    clock = _Clock()
    monkeypatch.setattr(locks, "time", clock)
    rs = _ClockedRemote(objectstore.open_store(remote), clock)
    with open_store(tmp_path / "a") as sm:
        for i in range(2):  # a metadata pack each: a prune reads two packs
            sm.import_tree(make_tree(tmp_path / f"src{i}", 40 + i, files=3), f"s{i}")
        transfer.push(sm, rs, ["s0", "s1"])
        want = snapshot_view(sm, "s0")
    if work == "prune":
        probed = _long_reads(rs, clock, "packs/", lambda: _taken(rs, locks.SHARED))
        prune(rs, grace=0)
    elif work == "pull":
        probed = _long_reads(rs, clock, "packs/", lambda: _taken(rs, locks.EXCLUSIVE))
        with open_store(tmp_path / "b") as sm:
            transfer.pull(sm, rs, ["s0"])
            assert snapshot_view(sm, "s0") == want
    else:  # a store that has read no index of the remote reads them all
        probed = _long_reads(rs, clock, "index/", lambda: _taken(rs, locks.EXCLUSIVE))
        with open_store(tmp_path / "b") as sm:
            sm.import_tree(make_tree(tmp_path / "src2", 42, files=3), "s2")
            transfer.push(sm, rs, ["s2"])
    assert probed == ["busy"]


def test_a_locks_age_is_the_remotes_not_its_holders_clock(remote, monkeypatch):
    """A holder's clock hours behind made its fresh lock stale for every other machine (a
    prune ran beside its push); one hours ahead held the others back for hours. Now a lock
    is as old as the remote's listing says: its body's time is for people only."""
    clock = _Clock()
    monkeypatch.setattr(locks, "time", clock)
    rs = _ClockedRemote(made_remote(remote), clock)
    body = {"host": "vm-3", "pid": 4242, "time": clock.now - 7200}
    rs.put("locks/exclusive-behind", json.dumps(body).encode())
    with pytest.raises(BusyError, match=r"locks/exclusive-behind is held \(pid 4242 on vm-3\)"):
        locks.RemoteLock(rs, locks.SHARED).take()
    rs.delete("locks/exclusive-behind")
    rs.put("locks/exclusive-ahead", json.dumps(dict(body, time=clock.now + 7200)).encode())
    assert _taken(rs, locks.SHARED) == "busy"
    clock.now += locks.STALE_AFTER - 1
    assert _taken(rs, locks.SHARED) == "busy"
    clock.now += 2  # not rewritten for longer than the stale age, by the remote's clock
    assert _taken(rs, locks.SHARED) == "taken"


def test_transfers_at_once_share_the_index_cache(tmp_path, monkeypatch, caplog):
    """Two transfers of the daemon's threads reading the same new index wrote one temporary
    file, and one's cleanup deleted the other's: a push or pull failed with ENOENT. Now each
    keeps its copies, and neither deletes the other's temporary file."""
    caplog.set_level("WARNING", logger="cascowfs.remote")
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 50, files=3), "s")
        transfer.push(sm, rs, ["s"])
    names = sorted(listed.key.removeprefix("index/") for listed in rs.list("index/"))
    cache = tmp_path / "cache"
    rename, other = os.rename, []

    def racing_rename(src, dst):
        if not other:  # another transfer runs whole between this one's write and rename
            other.append(None)
            other[0] = transfer.read_indexes(rs, cache)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    known = transfer.read_indexes(rs, cache)
    monkeypatch.undo()
    assert known.packs and known.packs == other[0].packs
    assert sorted(os.listdir(cache)) == names  # both copies in, no temporary file left
    assert transfer.read_indexes(rs, cache).bytes_read == 0
    assert not caplog.records  # no copy failed to be kept


def test_an_index_cache_that_cannot_be_written_fails_no_transfer(tmp_path, caplog):
    """The cache is only a cache: a store whose cache cannot be written (here a file where
    its directory belongs; a full disk) pulls and pushes all the same."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(make_tree(tmp_path / "src", 51, files=3), "s")
        transfer.push(sm, rs, ["s"])
        want = snapshot_view(sm, "s")
    with open_store(tmp_path / "b") as sm:
        (tmp_path / "b" / "remote-cache").write_bytes(b"")
        assert transfer.pull(sm, rs, ["s"]).snapshots == ["s"]
        assert snapshot_view(sm, "s") == want
        sm.import_tree(make_tree(tmp_path / "src2", 52, files=3), "t")
        assert transfer.push(sm, rs, ["t"]).snapshots == ["t"]
    assert "cannot keep index" in caplog.text
    with open_store(tmp_path / "c") as sm:  # copies that cannot be read: read from the remote
        cache = transfer.index_cache(sm, rs.spec.url)
        for listed in rs.list("index/"):
            (cache / listed.key.removeprefix("index/")).mkdir(parents=True)
        assert transfer.pull(sm, rs, ["s"]).index_read > 0
        assert snapshot_view(sm, "s") == want


def test_a_pull_fetches_ahead_no_pack_it_does_not_take(tmp_path, monkeypatch):
    """Content met twice (the same files in two directories) was not in the store yet the
    second time (the pull's objects are buffered), so its packs were fetched ahead again and
    never taken: each held a download slot and a decoded pack to the end of the pull,
    uncounted."""
    monkeypatch.setattr(packs, "PACK_TARGET", 8 << 10)  # a data pack per file
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
    for i in range(8):
        data = random.Random(i).randbytes(12 << 10)
        (src / "a" / f"f{i}").write_bytes(data)
        (src / "b" / f"f{i}").write_bytes(data)
    (src / "b" / "more").write_bytes(random.Random(9).randbytes(12 << 10))  # another tree
    with open_store(tmp_path / "a") as sm:
        sm.import_tree(src, "s")
        transfer.push(sm, rs, ["s"])
        want = snapshot_view(sm, "s")
    get, fetched = rs.get, []

    def counted_get(key, **kw):
        if key.startswith("packs/"):
            fetched.append(key)
        return get(key, **kw)

    rs.get = counted_get
    with open_store(tmp_path / "b") as sm:
        stats = transfer.pull(sm, rs, ["s"])
        assert snapshot_view(sm, "s") == want
    assert len(fetched) == stats.packs  # each fetch taken (the metadata pack perhaps twice)
    assert len(set(fetched)) == 10  # 9 data packs, 1 metadata


def test_config_add_ls_rm_and_hostile_names(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    spec = config.add(store, "origin", "s3://bucket-1/p", "http://127.0.0.1:9")
    assert config.load(store) == {"origin": spec}
    assert oct(os.stat(store / config.CONFIG_FILE).st_mode & 0o777) == "0o600"
    with pytest.raises(ExistsError):
        config.add(store, "origin", "file:///x")
    for bad in ("", "-x", "a/b", "..", "a" * 65, "a b", "é"):
        with pytest.raises(Exception, match="invalid remote name"):
            config.add(store, bad, "file:///x")
    for url in ("http://x", "file://host/x", "file:relative", "s3://UPPER", "s3://b?x=1", "s3://"):
        with pytest.raises(Exception, match="remote URL"):
            config.check_url(url)
    with pytest.raises(Exception, match="endpoint"):
        config.check_url("file:///x", "http://e")
    assert config.resolve(store, "file:///y").url == "file:///y"
    config.remove(store, "origin")
    with pytest.raises(NotFoundError, match="no remote 'origin'"):
        config.resolve(store, "origin")


def test_ref_names_that_are_no_ids_are_ignored_and_bad_refs_named(tmp_path):
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    rs.put("snapshots/..hidden", b"{}")
    rs.put("snapshots/good", b"not json")
    rs.put("snapshots/other", transfer.RemoteSnapshot("x", "0" * 64, None, 0, {}, 0, 0).encode())
    assert transfer.list_refs(rs) == ["good", "other"]
    with pytest.raises(StoreIOError, match="snapshots/good does not decode"):
        transfer.read_ref(rs, "good")
    with pytest.raises(StoreIOError, match="describes another snapshot"):
        transfer.read_ref(rs, "other")
    with pytest.raises(NotFoundError, match="no object snapshots/none"):
        transfer.read_ref(rs, "none")


def test_ls_snapshots_predicates_are_finds():
    """``remote ls-snapshots --find`` takes ``find``'s predicates and holds them the same way."""
    match = label_matcher(["reward>=0.5", "task=t1", "has:done", "x!=1"])
    assert match({"reward": "0.7", "task": "t1", "done": "", "x": "2"}, False)
    assert not match({"reward": "0.2", "task": "t1", "done": "", "x": "2"}, False)
    assert match({"reward": "high", "task": "t1", "done": "", "x": "2"}, False)  # "h" > "0"
    assert not match({"reward": "0.9", "task": "t1", "x": "2"}, False)
    assert not match({"reward": "0.9", "task": "t1", "done": ""}, False)  # x!=1 needs an x
    # has:obs asks for a large observation, as find does: no label can stand in for it
    with_obs = label_matcher(["has:obs", "task=t1"])
    assert with_obs({"task": "t1"}, True)
    assert not with_obs({"task": "t1", "obs": ""}, False)
    for bad in ["done", "=v", "has:", "obs=1"]:
        with pytest.raises(InvalidArgumentError, match="predicate|observation"):
            label_matcher([bad])


def _remote_with_tree(rs, entries: dict, objects: tuple = (), *, subtrees: tuple = (),
                      root_totals: tuple | None = None) -> None:
    """A ref ``hostile`` on ``rs`` whose root directory holds ``entries`` (files empty, but
    those of ``objects``: (kind, id, payload) sent beside the trees, and the trees of the
    listings ``subtrees``), with the totals of ``entries`` or ``root_totals``."""
    root = _dir(b"", entries, *(root_totals or ()))
    superroot, root_objects = tree_objects({b"": root})
    builder = packs.PackBuilder()
    for kind, oid, payload in objects:
        builder.add(kind, oid, payload)
    trees = [tree_objects(listing)[1] for listing in (entries, *subtrees)]
    for oid, value in sum(trees, []) + root_objects:
        builder.add(b"T", oid, bytes(stored_payload(value)))
    pack_name, pack, index_name, index = builder.seal()
    rs.put(packs.pack_key(pack_name), pack)
    rs.put(packs.index_key(index_name), index)
    ref = transfer.RemoteSnapshot("hostile", superroot.hex(), None, 0, {}, 0, 0)
    rs.put_new(transfer.ref_key("hostile"), ref.encode())


# VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted CAP_DAC_READ_SEARCH (bit 2)
_CAP_DAC_READ_SEARCH = bytes.fromhex("01000002" "04000000" "00000000" "00000000" "00000000")


def _file(name: bytes, mode: int = stat.S_IFREG | 0o644, uid: int = 0, **kw) -> Entry:
    return Entry(name, mode, uid, 0, 0, 0, **kw)


def _dir(name: bytes, listing: dict, *totals: int, ref: bytes | None = None) -> Entry:
    """A directory entry naming the tree of ``listing`` (or ``ref``), with ``totals`` (files,
    bytes, hard-link members below) or, for those not given, the listing's own."""
    files, size, links = (*totals, *listing_totals(listing.values())[len(totals):])
    return Entry(name, stat.S_IFDIR | 0o755, 0, 0, 0, 0, ref or tree_objects(listing)[0],
                 tree_files=files, tree_bytes=size, tree_links=links)


@pytest.mark.parametrize(
    "entry, problem",
    [
        (_file(b".."), "not a file name"),
        (_file(b"."), "not a file name"),
        (_file(b"a/b"), "not a file name"),
        (_file(b"x\0y"), "not a file name"),
        (_file(b"dev", stat.S_IFCHR | 0o666, rdev=0x0101), "a device node"),
        (_file(b"disk", stat.S_IFBLK | 0o660, rdev=0x0800), "a device node"),
        (_file(b"su", stat.S_IFREG | 0o4755), "set-id and owned by root"),
        (_file(b"sg", stat.S_IFREG | 0o2755), "set-id and owned by root"),
        (_file(b"o", xattrs=((b"trusted.overlay.redirect", b"/etc"),)), "overlayfs or cascowfs"),
        (_file(b"c", xattrs=((b"user.cascowfs.label.x", b"1"),)), "overlayfs or cascowfs"),
        # cap_dac_read_search+ep, as setcap writes it, on a file of a user's: a root set-id bit
        (_file(b"cap", uid=1000, xattrs=((b"security.capability", _CAP_DAC_READ_SEARCH),)),
         "security.capability, which grants privilege at exec"),
        (_file(b"smack", uid=1000, xattrs=((b"security.SMACK64EXEC", b"_"),)),
         "security.SMACK64EXEC, which grants privilege at exec"),
        (_file(b"l", stat.S_IFLNK | 0o777), "target is no path"),
        (_file(b"l", stat.S_IFLNK | 0o777, ref=b"a\0b"), "target is no path"),
        (Entry(b"l", stat.S_IFLNK | 0o777, 0, 0, 0, 4096, b"x" * 4096), "target is no path"),
        (_file(b"l", stat.S_IFLNK | 0o777, ref=b"target"), "size is not its target's length"),
        (_file(b"p", stat.S_IFIFO | 0o644, ref=b"x"), "FIFO or socket with content"),
        (Entry(b"s", stat.S_IFSOCK | 0o644, 0, 0, 0, 3), "FIFO or socket with content"),
        (_file(b"z", 0o644), "no file type"),
        (_file(b"z", 0o170644), "no file type"),
    ],
)
def test_a_hostile_tree_is_refused_before_anything_is_stored(tmp_path, entry, problem):
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    _remote_with_tree(rs, {entry.name: entry, b"fine": _file(b"fine", uid=1000)})
    with open_store(tmp_path / "b") as sm:
        with pytest.raises(StoreIOError, match=f"remote .*: tree [0-9a-f]{{64}}, entry .*{problem}"):
            transfer.pull(sm, rs, ["hostile"])
        assert not sm.has_snapshot("hostile")


def _refused_beside_local_content(where: Path, entries: dict, objects: tuple, problem: str):
    """A pull of a ref whose root holds ``entries`` (``_remote_with_tree``) into a store that
    has the content b"already here": EIO matching ``problem``, nothing recorded."""
    rs = made_remote(config.RemoteSpec("r", f"file://{where}/remote"))
    _remote_with_tree(rs, entries, objects)
    (where / "src").mkdir(parents=True)
    (where / "src" / "x").write_bytes(b"already here")
    with open_store(where / "store") as sm:
        sm.import_tree(where / "src", "mine")
        with pytest.raises(StoreIOError, match=problem):
            transfer.pull(sm, rs, ["hostile"])
        assert not sm.has_snapshot("hostile")


def test_a_pulled_file_must_be_as_big_as_its_content(tmp_path):
    """A tree's file size and its content are two words of the remote's: a snapshot read by
    the daemon and its layer written from the CAS would show two different files."""
    hello = prepare_content(b"hello")
    empty_tree, _ = tree_objects({})
    local = prepare_content(b"already here")
    cases = {
        "no content": (Entry(b"f", stat.S_IFREG | 0o644, 0, 0, 0, 5), "of 5 bytes whose .* 0"),
        "short": (Entry(b"f", stat.S_IFREG | 0o644, 0, 0, 0, 3, hello.content_id), "holds 5"),
        "a tree": (Entry(b"f", stat.S_IFREG | 0o644, 0, 0, 0, 0, empty_tree), "is a tree"),
        # content the pulling store has already: read from there
        "local": (Entry(b"f", stat.S_IFREG | 0o644, 0, 0, 0, 99, local.content_id), "holds 12"),
    }
    chunk = (b"C", hello.content_id, b"hello")
    tree = (b"T", empty_tree, bytes(stored_payload(tree_objects({})[1][0][1])))
    for case, (entry, problem) in cases.items():
        _refused_beside_local_content(tmp_path / case, {b"f": entry}, (chunk, tree),
                                      f"entry 'f': .*{problem}")
    # the same file told right comes through
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/right"))
    right = Entry(b"f", stat.S_IFREG | 0o644, 0, 0, 0, 5, hello.content_id)
    _remote_with_tree(rs, {b"f": right}, (chunk,))
    with open_store(tmp_path / "store-right") as sm:
        transfer.pull(sm, rs, ["hostile"])
        assert snapshot_view(sm, "hostile")[b"f"].data == b"hello"


def test_a_pulled_directory_must_name_a_tree(tmp_path):
    """A directory, or a page of a big one, that names file content: the snapshot could be
    neither listed nor written as a layer."""
    hello = prepare_content(b"hello")
    local = prepare_content(b"already here")
    chunk = (b"C", hello.content_id, b"hello")
    index = bytes([INDEX_VERSION]) + hello.content_id  # a big directory's one page: a chunk
    index_id = object_id(b"T", index)
    cases = {
        "content": (hello.content_id, (chunk,), f"entry 'd': {hello.content_id.hex()}"),
        "local": (local.content_id, (), f"entry 'd': {local.content_id.hex()}"),
        "page": (index_id, (chunk, (b"T", index_id, index)), f"tree {index_id.hex()}: {hello.content_id.hex()}"),
    }
    for case, (ref, objects, problem) in cases.items():
        directory = Entry(b"d", stat.S_IFDIR | 0o755, 0, 0, 0, 0, ref)
        _refused_beside_local_content(tmp_path / case, {b"d": directory}, objects,
                                      f"{problem}.*is not a tree")


def test_a_pulled_hard_link_group_is_one_file(tmp_path):
    """A layer makes a group's members one inode, the first one written: members that differ
    would show one file in a branch and others through the daemon."""
    hello = prepare_content(b"hello")
    chunk = (b"C", hello.content_id, b"hello")
    key = link_key([b"a", b"b"])

    def member(name: bytes, **kw) -> Entry:
        fields = dict(mode=stat.S_IFREG | 0o644, uid=1000, gid=0, mtime_ns=7, size=5,
                      ref=hello.content_id, link=key)
        return Entry(name, **{**fields, **kw})

    for case, other in {"mode": member(b"b", mode=stat.S_IFREG | 0o755),
                        "owner": member(b"b", uid=0), "time": member(b"b", mtime_ns=8),
                        "content": member(b"b", size=0, ref=b""),
                        "xattrs": member(b"b", xattrs=((b"user.x", b"1"),))}.items():
        rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/{case}"))
        _remote_with_tree(rs, {b"a": member(b"a"), b"b": other}, (chunk,))
        with open_store(tmp_path / f"store-{case}") as sm:
            with pytest.raises(StoreIOError, match="file 'b': a hard link of 'a' that is another file"):
                transfer.pull(sm, rs, ["hostile"])
            assert not sm.has_snapshot("hostile")
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/right"))
    _remote_with_tree(rs, {b"a": member(b"a"), b"b": member(b"b")}, (chunk,))
    with open_store(tmp_path / "store-right") as sm:
        transfer.pull(sm, rs, ["hostile"])
        view = snapshot_view(sm, "hostile")
        assert view[b"a"].data == view[b"b"].data == b"hello"


def test_a_pulled_hard_link_group_is_keyed_by_its_paths(tmp_path):
    """A commit re-keys only the groups its branch touched: a key its paths do not give
    could be the key a branch's own new group gets, and join two files into one."""
    cases = {
        "another's key": ({n: _file(n, uid=1000, link=link_key([b"x", b"y"]))
                           for n in (b"a", b"b")}, "file 'a': a hard-link group keyed"),
        "lone": ({b"a": _file(b"a", uid=1000, link=link_key([b"a"]))},
                 "file 'a': a hard-link group keyed .* its 1 member paths do not give"),
    }
    for case, (entries, problem) in cases.items():
        rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/{case}"))
        _remote_with_tree(rs, entries)
        with open_store(tmp_path / f"store-{case}") as sm:
            with pytest.raises(StoreIOError, match=f"remote .*: snapshot hostile, {problem}"):
                transfer.pull(sm, rs, ["hostile"])
            assert not sm.has_snapshot("hostile")


def test_a_pulled_hard_link_group_is_one_file_with_the_trees_here(tmp_path):
    """A group may span a tree the store had and one pulled: its members are one file."""
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "z").write_bytes(b"already here")
    for name in ("sub/x", "sub/y"):
        os.link(tmp_path / "src" / "z", tmp_path / "src" / name)
    with open_store(tmp_path / "store") as sm:
        sm.import_tree(tmp_path / "src", "mine")
        root = sm.read_tree(sm.root_entry("mine").ref)
        z = root[b"z"]
        assert z.link == link_key([b"sub/x", b"sub/y", b"z"])
        new = _file(b"new", uid=1000)  # so that the root is a tree the store lacks
        for case, member in {"another file": z._replace(ref=b"", size=0), "right": z}.items():
            rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/{case}"))
            _remote_with_tree(rs, {b"sub": root[b"sub"], b"z": member, b"new": new})
            if case == "right":
                transfer.pull(sm, rs, ["hostile"])
                assert snapshot_view(sm, "hostile")[b"z"].links == (b"sub/x", b"sub/y", b"z")
                continue
            with pytest.raises(StoreIOError, match="snapshot hostile, file 'sub/x': a hard link "
                               "of 'z' that is another file"):
                transfer.pull(sm, rs, ["hostile"])
            assert not sm.has_snapshot("hostile")


def test_a_pulled_directory_carries_the_totals_of_its_tree(tmp_path):
    """A directory entry's totals are what `show`, `episodes` and the snapshot's xattrs report
    of the files below it: a remote's word for them must be what the tree holds."""
    hello = prepare_content(b"hello")
    chunk = (b"C", hello.content_id, b"hello")
    inner = {b"f": Entry(b"f", stat.S_IFREG | 0o644, 1000, 0, 0, 5, hello.content_id)}
    key = link_key([b"l/a", b"l/b"])  # where the right pull puts them
    linked = {n: _file(n, uid=1000, ref=b"", link=key) for n in (b"a", b"b")}
    big = {b"%03d" % i: _file(b"%03d" % i, uid=1000) for i in range(100)}  # paged
    assert len(tree_objects(big)[1]) > 1
    cases = {
        "files": ({b"d": _dir(b"d", inner, 2)}, {}, "entry 'd': .* 2 files of 5 bytes and 0 "
                  "hard-link members whose tree holds 1 files of 5 bytes and 0"),
        "bytes": ({b"d": _dir(b"d", inner, 1, 4)}, {}, "entry 'd': .* 4 bytes .* 5 bytes"),
        "links": ({b"d": _dir(b"d", linked, 2, 0, 0)}, {}, "entry 'd': .* 0 hard-link .* 2 hard"),
        "pages": ({b"d": _dir(b"d", big, 99)}, {}, "entry 'd': .* 99 files .* 100 files"),
        "named twice": ({b"d": _dir(b"d", inner), b"e": _dir(b"e", inner, 0, 0)}, {},
                        "entry 'e': .* 0 files of 0 bytes .* 1 files of 5"),
        "root": ({b"d": _dir(b"d", inner)}, {"root_totals": (1, 6, 0)}, "entry '': .* 6 bytes"),
    }
    for case, (entries, kw, problem) in cases.items():
        rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/{case}"))
        _remote_with_tree(rs, entries, (chunk,), subtrees=(inner, linked, big), **kw)
        with open_store(tmp_path / f"store-{case}") as sm:
            with pytest.raises(StoreIOError, match=f"remote .*: tree [0-9a-f]{{64}}, {problem}"):
                transfer.pull(sm, rs, ["hostile"])
            assert not sm.has_snapshot("hostile")
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/right"))
    entries = {b"d": _dir(b"d", inner), b"e": _dir(b"e", inner), b"l": _dir(b"l", linked),
               b"p": _dir(b"p", big)}
    _remote_with_tree(rs, entries, (chunk,), subtrees=(inner, linked, big))
    with open_store(tmp_path / "store-right") as sm:
        transfer.pull(sm, rs, ["hostile"])
        info = sm.snapshot("hostile")
        assert (info.files, info.size) == (104, 10)
        assert sm.root_entry("hostile").tree_links == 2


def test_a_pulled_directory_naming_a_tree_here_carries_its_totals(tmp_path):
    """A tree the pulling store had is read as it recorded it, one level down and no deeper."""
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "x").write_bytes(b"already here")
    (tmp_path / "src" / "y").write_bytes(b"and here")
    with open_store(tmp_path / "store") as sm:
        sm.import_tree(tmp_path / "src", "mine")
        here = sm.root_entry("mine")
        for case, totals in {"wrong": (2, 19), "right": (2, 20)}.items():
            rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/{case}"))
            _remote_with_tree(rs, {b"d": _dir(b"d", {}, *totals, 0, ref=here.ref)})
            if case == "wrong":
                with pytest.raises(StoreIOError, match="entry 'd': .* 19 bytes .* 20 bytes"):
                    transfer.pull(sm, rs, ["hostile"])
                assert not sm.has_snapshot("hostile")
            else:
                transfer.pull(sm, rs, ["hostile"])
                assert sm.snapshot("hostile").size == 20


@needs_overlay
def test_what_a_branch_could_make_itself_is_pulled(tmp_path):
    """A user's own set-id file, a FIFO, a socket, symbolic links (to anywhere, as long as
    Linux allows), user xattrs and an SELinux label are no privilege: they come through."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/r"))
    far = b"/" + b"x" * 4094
    _remote_with_tree(rs, {
        b"mine": _file(b"mine", stat.S_IFREG | 0o4755, uid=1000),
        b"fifo": _file(b"fifo", stat.S_IFIFO | 0o644),
        b"sock": _file(b"sock", stat.S_IFSOCK | 0o755),
        b"etc": Entry(b"etc", stat.S_IFLNK | 0o777, 0, 0, 0, 11, b"/etc/shadow"),
        b"far": Entry(b"far", stat.S_IFLNK | 0o777, 0, 0, 0, len(far), far),
        b"x": _file(b"x", xattrs=((b"user.note", b"1"),)),
        b"label": _file(b"label", xattrs=((b"security.selinux", b"user_u:object_r:user_t:s0"),)),
    })
    with open_store(tmp_path / "b") as sm:
        assert transfer.pull(sm, rs, ["hostile"]).snapshots == ["hostile"]
        listing = sm.read_tree(sm.root_entry("hostile").ref)
        assert sorted(listing) == [b"etc", b"far", b"fifo", b"label", b"mine", b"sock", b"x"]
        assert listing[b"mine"].mode == stat.S_IFREG | 0o4755
        info = sm.create_branch("w", "hostile")  # its layer is written: a branch shows it
        assert os.readlink(info.tree / "far") == far.decode()
        sm.discard("w")


def test_through_ctl_only_root_names_a_remote_by_url():
    from cascowfs.fuse import control
    from cascowfs.privacy import Caller
    from cascowfs.wire import parse_command

    cmd = parse_command(b"push file:///root/elsewhere s1")
    with pytest.raises(PermissionDeniedError, match="only root gives a URL"):
        control.execute(None, cmd, Caller(uid=1000, gid=1000))  # type: ignore[arg-type]
