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
from support.s3server import new_bucket, s3_server, set_credentials
from test_remotes import make_tree
from cascowfs import codec
from cascowfs.errors import (BusyError, InvalidArgumentError, NoSpaceError, NotFoundError,
                             StoreIOError)
from cascowfs.fsck import fsck_store
from cascowfs.remote import config, locks, objectstore, packs, transfer
from cascowfs.remote.prune import prune


@pytest.fixture(scope="module")
def s3_endpoint():
    set_credentials()
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path) -> config.RemoteSpec:
    if request.param == "file":
        (tmp_path / "remote").mkdir()
        return config.RemoteSpec("r", f"file://{tmp_path}/remote")
    endpoint = request.getfixturevalue("s3_endpoint")
    return config.RemoteSpec("r", f"s3://{new_bucket(endpoint)}/some/prefix", endpoint)


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
