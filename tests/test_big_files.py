"""Big and sparse files: content streams in bounded pieces, and holes stay holes end to end.

A branch's files are an agent's: a checkpoint bigger than the daemon's memory, a sparse disk
image bigger than the disk. Import, commit, the layer writer and snapshot reads must hold a
bounded window of a file, never the file; a hole must cost no chunk and no disk block in the
store, its layers or its branches, whether the filesystem had it as a hole or as written zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cascowfs import cas, extents
from conftest import REPO, child_env, hypothesis_settings, needs_loop, needs_overlay, open_store
from fusehelpers import fuse_unavailable

MIB = 1 << 20
BLOCK = cas.HOLE_BLOCK


# ----------------------------------------------------------------------------------------
# files with a given layout of data, written zeros and holes
# ----------------------------------------------------------------------------------------
SEGMENT_LENGTHS = [1, 4095, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 200_000, 700_000]
segments = st.lists(st.tuples(st.sampled_from(["data", "zeros", "hole"]),
                              st.sampled_from(SEGMENT_LENGTHS)), min_size=1, max_size=8)


def write_layout(path: Path, layout: list[tuple[str, int]], seed: int) -> bytes:
    """Write ``layout`` into a new file (holes by seeking); returns the bytes it holds."""
    rng = random.Random(seed)
    content = bytearray()
    with open(path, "wb") as f:
        for kind, length in layout:
            if kind == "data":
                piece = rng.randbytes(length)
                f.write(piece)
            elif kind == "zeros":
                piece = bytes(length)
                f.write(piece)
            else:
                piece = bytes(length)
                f.seek(length, os.SEEK_CUR)
            content += piece
        f.truncate(len(content))
    return bytes(content)


def zero_block_bytes(content: bytes) -> int:
    """Bytes in whole grid blocks of zeros: what must be holes, not chunks or disk blocks."""
    return sum(BLOCK for at in range(0, len(content) - BLOCK + 1, BLOCK)
               if content[at:at + BLOCK] == bytes(BLOCK))


def data_runs(content: bytes) -> int:
    runs, in_data = 0, False
    for at in range(0, len(content), BLOCK):
        block = content[at:at + BLOCK]
        is_hole = len(block) == BLOCK and block == bytes(BLOCK)
        runs += not is_hole and not in_data
        in_data = not is_hole
    return runs


def assert_holes_kept(path: Path, content: bytes, what: str) -> None:
    """``path`` allocates no more than its non-hole bytes (plus a block per data run)."""
    allocated = os.stat(path).st_blocks * 512
    bound = len(content) - zero_block_bytes(content) + 4096 * (data_runs(content) + 2)
    assert allocated <= bound, f"{what}: {allocated} bytes allocated, at most {bound} wanted"


def read_back(sm, ref: bytes, size: int, piece: int = MIB) -> bytes:
    return b"".join(sm.read_file(ref, at, piece) for at in range(0, size, piece))


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()


def allocated_bytes(store: Path) -> int:
    """Disk the store takes, its branches (mounts, and uppers: the agents' own files) aside."""
    total = 0
    for dirpath, dirs, files in os.walk(store):
        if Path(dirpath) == store:
            dirs.remove("branches")
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# ----------------------------------------------------------------------------------------
# the content store (no mounts)
# ----------------------------------------------------------------------------------------
def _store(content: cas.ContentStore, data: bytes | list) -> cas.PreparedContent:
    prepared = cas.prepare_content(data)
    content.db.write(lambda txn: content.put_objects(txn, prepared.objects))
    return prepared


@given(layout=segments, seed=st.integers(0, 2**32))
@hypothesis_settings(60)
def test_content_with_any_hole_layout_reads_back_at_any_offset(tmp_path_factory, layout, seed):
    from cascowfs.cas import ContentStore
    from cascowfs.metadb import MetaDB

    path = tmp_path_factory.mktemp("layout") / "f"
    data = write_layout(path, layout, seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = list(extents.read_pieces(fd, len(data)))
    finally:
        os.close(fd)
    assert b"".join(p if isinstance(p, bytes) else bytes(p) for p in pieces) == data
    assert sum(p for p in pieces if isinstance(p, int)) == zero_block_bytes(data)
    db = MetaDB(path.parent / "meta")
    try:
        content = ContentStore(db)
        prepared = _store(content, pieces)
        # the same bytes, read or in memory, sparse or written: one id
        assert prepared.content_id == cas.identify_content(data).content_id
        assert prepared.size == len(data)
        chunk_bytes = sum(len(v) - 2 for _, v in prepared.objects if v[:1] == cas.TYPE_CHUNK)
        assert chunk_bytes <= len(data) - zero_block_bytes(data)
        rng = random.Random(seed)
        for _ in range(8):
            offset = rng.randrange(0, len(data) + 2)
            size = rng.choice([1, 4096, BLOCK, 300_000])
            assert content.read(prepared.content_id, offset, size) == data[offset:offset + size]
        out = path.parent / "written"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            extents.write_pieces(fd, content.pieces(prepared.content_id))
        finally:
            os.close(fd)
        assert out.read_bytes() == data
        assert_holes_kept(out, data, "a file written from the store")
    finally:
        db.close()


def test_zero_runs_become_holes_and_only_their_ragged_edges_are_chunks(content):
    data = os.urandom(100_000) + bytes(5 * BLOCK + 17) + os.urandom(3) + bytes(3 * BLOCK)
    prepared = _store(content, data)
    zero_chunks = sum(len(v) - 2 for _, v in prepared.objects
                      if v[:1] == cas.TYPE_CHUNK and v[2:].count(0) == len(v) - 2)
    assert zero_chunks < 2 * BLOCK * data_runs(data)  # zeros short of a whole grid block
    with content.db.read() as txn:
        listing = txn.get(prepared.content_id, db=content.objects)
    holes = [length for oid, length in cas._LIST_ITEM.iter_unpack(listing[1:]) if oid == cas.HOLE_ID]
    assert sum(holes) == zero_block_bytes(data)
    assert cas.HOLE_ID not in cas.children_of(listing)
    assert content.read(prepared.content_id) == data


def test_a_hole_longer_than_a_list_item_reads_as_zeros_at_any_offset(content):
    size = 2 * cas.HOLE_ITEM_MAX + 3 * BLOCK + 5
    head = b"head" + bytes(BLOCK - 4)
    prepared = _store(content, [head, size - BLOCK - 5, b"tail!"])
    assert prepared.size == size
    # however a run of zeros arrives, it makes the same items
    as_blocks = [head] + [BLOCK] * ((size - BLOCK - 5) // BLOCK) + [b"tail!"]
    assert cas.identify_content(as_blocks).content_id == prepared.content_id

    def expected(offset: int, n: int) -> bytes:
        out = bytearray(max(0, min(n, size - offset)))
        for start, blob in ((0, b"head"), (size - 5, b"tail!")):
            for i, byte in enumerate(blob):
                if offset <= start + i < offset + len(out):
                    out[start + i - offset] = byte
        return bytes(out)

    for offset in (0, 2, BLOCK - 2, cas.HOLE_ITEM_MAX - 1, cas.HOLE_ITEM_MAX + BLOCK, size - 7,
                   size - 2, size + 1):
        assert content.read(prepared.content_id, offset, 9) == expected(offset, 9), offset


def test_a_stream_cuts_the_chunks_of_the_whole_content(content):
    data = os.urandom(2 * cas.EMIT_BYTES + 12345)
    odd = 15 * BLOCK  # pieces of another size than the cutter's window
    odd_pieces = [data[at:at + odd] for at in range(0, len(data), odd)]
    whole = cas.prepare_content(data)
    assert cas.identify_content(odd_pieces).content_id == whole.content_id
    emitted: list = []
    streamed = cas.prepare_content(cas.pieces_of(data), emitted.extend)
    assert streamed.content_id == whole.content_id
    assert sorted(emitted + streamed.objects) == sorted(whole.objects)
    assert len(emitted) >= 1  # batches left before the end


# ----------------------------------------------------------------------------------------
# import -> snapshot read -> branch (layers) -> commit -> read, on real mounts
# ----------------------------------------------------------------------------------------
@needs_overlay
@given(layout=segments, seed=st.integers(0, 2**32))
@hypothesis_settings(15)
def test_any_hole_layout_round_trips_and_stays_sparse(tmp_path_factory, layout, seed):
    base = tmp_path_factory.mktemp("holes")
    src = base / "src"
    src.mkdir()
    data = write_layout(src / "sparse", layout, seed)
    (src / "dense").write_bytes(data)  # the same bytes with its zeros written
    with open_store(base / "store") as sm:
        sm.import_tree(src, "base")
        entries = sm.read_tree(sm.root_entry("base").ref)
        assert entries[b"sparse"].ref == entries[b"dense"].ref
        assert read_back(sm, entries[b"sparse"].ref, len(data)) == data
        with sm.mounted_chain("base") as lowers:  # a background sweep may unmount it else
            for layer in lowers:
                for name in ("sparse", "dense"):
                    assert_holes_kept(layer / name, data, f"import layer's {name}")
        tree = sm.create_branch("b", "base").tree
        assert (tree / "sparse").read_bytes() == data
        with open(tree / "sparse", "r+b") as f:  # a copy-up, then a change at the end
            f.seek(len(data))
            f.write(b"!")
        changed = data + b"!"
        sm.commit("b", "next")
        sm.settle()
        entry = sm.read_tree(sm.root_entry("next").ref)[b"sparse"]
        assert read_back(sm, entry.ref, len(changed)) == changed
        with sm.mounted_chain("next") as lowers:
            delta = lowers[0]
            assert (delta / "sparse").read_bytes() == changed
            assert_holes_kept(delta / "sparse", changed, "commit's delta layer")
        again = sm.create_branch("c", "next").tree
        assert (again / "sparse").read_bytes() == changed
        assert_holes_kept(again / "sparse", changed, "branch of the commit")
        sm.discard("b")
        sm.discard("c")


@needs_overlay
def test_a_16_gib_sparse_file_grows_the_store_by_less_than_1_mib(tmp_path):
    size = 16 << 30

    def source(name: str, sparse: bool) -> Path:
        src = tmp_path / name
        src.mkdir()
        with open(src / "disk.img", "wb") as f:
            f.write(b"boot sector")
            if sparse:
                f.seek(size // 2)
                f.write(b"middle")
                f.truncate(size)
        (src / "small").write_text("x")
        return src

    with open_store(tmp_path / "plain") as sm:
        sm.import_tree(source("plain-src", sparse=False), "base")
        metadata_only = allocated_bytes(tmp_path / "plain")  # open, as the store below
    with open_store(tmp_path / "store") as sm:
        src = source("sparse-src", sparse=True)
        sm.import_tree(src, "base")
        growth = allocated_bytes(tmp_path / "store") - metadata_only
        assert growth < MIB, f"a 16 GiB sparse file took {growth} bytes of store"
        ref = sm.read_tree(sm.root_entry("base").ref)[b"disk.img"].ref
        assert sm.read_file(ref, size // 2 - 3, 12) == bytes(3) + b"middle" + bytes(3)
        assert sm.read_file(ref, size - 128 * 1024, 128 * 1024) == bytes(128 * 1024)
        tree = sm.create_branch("b", "base").tree
        with open(tree / "disk.img", "r+b") as f:
            f.seek(size // 4)
            f.write(b"quarter")
        sm.commit("b", "next")
        sm.settle()
        delta = sm.layer_chain("next")[0]
        # three grid blocks hold data (the start, a quarter, the middle): those and no more
        assert os.stat(delta / "disk.img").st_blocks * 512 <= 3 * BLOCK + 4096
        # overlayfs copies up in 1 MiB pieces around data: a few MiB at most in the upper
        upper = sm.upper_path("b") / "disk.img"
        assert os.stat(upper).st_blocks * 512 <= 4 * MIB
        assert allocated_bytes(tmp_path / "store") - metadata_only < MIB
        sm.discard("b")


# ----------------------------------------------------------------------------------------
# memory: a file far bigger than any buffer, in a child whose RSS is watched
# ----------------------------------------------------------------------------------------
_ROUND_TRIP = r"""
import hashlib, os, sys
from pathlib import Path
from cascowfs.state import StateManager

store, src, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def digest(read):
    h = hashlib.blake2b()
    for at in range(0, size + 7, 4 << 20):
        h.update(read(at, 4 << 20))
    return h.hexdigest()
sm = StateManager.open(store)
try:
    sm.import_tree(src, "base")
    tree = sm.create_branch("b", "base").tree
    with open(tree / "big", "r+b") as f:
        f.seek(size // 2)
        f.write(b"changed")
    sm.commit("b", "next")
    sm.settle()
    ref = sm.read_tree(sm.root_entry("next").ref)[b"big"].ref
    print("snapshot", digest(lambda at, n: sm.read_file(ref, at, n)), flush=True)
    with open(sm.create_branch("c", "next").tree / "big", "rb") as f:
        print("branch", digest(lambda at, n: os.pread(f.fileno(), n, at)), flush=True)
finally:
    sm.close(unmount_branches=True)
"""


def peak_memory(proc: subprocess.Popen) -> dict[str, int]:
    """The largest VmRSS and RssAnon seen in ``proc`` while it runs, sampled every 20 ms."""
    peak = {"VmRSS": 0, "RssAnon": 0}
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    return peak


def rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def test_pages_read_through_the_map_are_released(content):
    values = [os.urandom(MIB) for _ in range(96)]
    for at in range(0, len(values), 32):
        content.db.write(lambda txn: [txn.put(cas.object_id(cas.TYPE_PACK, v), v,
                                              db=content.objects) for v in values[at:at + 32]])
    content.db.release_mapped_pages()
    before = rss_file()
    below = cas.MAP_RELEASE_BYTES // MIB - 1
    for v in values[:below]:
        content.get(cas.object_id(cas.TYPE_PACK, v))
    assert rss_file() - before >= below * MIB // 2  # mapped by the reads (none released yet)
    for v in values[below:]:
        content.get(cas.object_id(cas.TYPE_PACK, v))  # past MAP_RELEASE_BYTES, again and again
    assert rss_file() - before < 2 * cas.MAP_RELEASE_BYTES
    assert [content.get(cas.object_id(cas.TYPE_PACK, v)) for v in values] == values


def test_pages_a_write_transaction_maps_are_released_before_it_commits(content):
    """Storing a batch of objects looks each one up, and a lookup maps the pages around the
    value it finds (a whole large folio of the data file): a batch of a big file's chunks
    would keep all of them mapped until its transaction commits, if they were released only
    then."""
    datas = [os.urandom(MIB) for _ in range(96)]
    objects = [(cas.object_id(cas.TYPE_CHUNK, d), cas.TYPE_CHUNK + cas._UNPACKED + d)
               for d in datas]
    for at in range(0, len(objects), 32):
        content.db.write(lambda txn: [txn.put(oid, value, db=content.objects)
                                      for oid, value in objects[at:at + 32]])
    content.db.release_mapped_pages()
    before = rss_file()

    def store_again(txn) -> int:
        content.put_objects(txn, objects)  # every one present: each looked up, none written
        return rss_file() - before  # before the transaction commits

    assert content.db.write(store_again, "storing again") < 2 * cas.MAP_RELEASE_BYTES
    assert rss_file() - before < 2 * cas.MAP_RELEASE_BYTES


@needs_overlay
def test_import_commit_and_layers_of_a_big_file_stay_in_bounded_memory(tmp_path):
    size = 768 * MIB
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big", "wb") as f:
        for _ in range(size // (8 * MIB)):
            f.write(os.urandom(8 * MIB))
    with open(src / "big", "r+b") as f:
        f.seek(size // 2)
        f.write(b"changed")
    want = file_digest(src / "big")
    with open(src / "big", "r+b") as f:  # back as the import must see it
        f.seek(size // 2)
        f.write(os.urandom(7))
    proc = subprocess.Popen([sys.executable, "-c", _ROUND_TRIP, str(tmp_path / "store"),
                             str(src), str(size)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        peak = peak_memory(proc)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.split() == ["snapshot", want, "branch", want]
    # holding the file once would take all of it; the map's pages are released as it goes
    assert peak["RssAnon"] < size // 2, f"{peak} for a {size >> 20} MiB file"
    assert peak["VmRSS"] < size * 3 // 4, f"{peak} for a {size >> 20} MiB file"


# ----------------------------------------------------------------------------------------
# the benchmark tool, at a small size
# ----------------------------------------------------------------------------------------
@needs_loop
@pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or "")
def test_bench_bigfiles_runs_end_to_end_and_leaves_nothing(tmp_path):
    """It runs through a real mount, checks its reads by hash, writes its JSON and leaves
    nothing mounted; no speed or memory figure is asserted (those are the benchmark's)."""
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "bigfiles.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_bigfiles.py"),
                        "--size-gib", "0.0625", "--sparse-gib", "1", "--out", str(out)],
                       env=dict(os.environ, CASCOWFS_BENCH_IMAGES=str(images)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stderr[-4000:]  # 1: a limit missed, not a failure here
    result = json.loads(out.read_text())
    assert result["big_file"]["size"] == 64 * MIB
    assert {"import", "commit", "branch of commit"} <= result["daemon_memory"]["peaks"].keys()
    assert result["sparse_file"]["size"] == 1 << 30
    assert "daemon VmHWM" in r.stdout
    assert list(images.iterdir()) == []  # the scratch image and its mounts are gone


def test_sparse_files_compare_by_their_data_and_holes_as_zeros(tmp_path):
    """`cascowfs diff` of two kernel views compares a file's bytes: a 16 TiB sparse file
    took about 2.5 h a pair read byte by byte. Holes now compare unread."""
    size = 16 << 30  # 16 GiB: a byte-by-byte regression would take the test seconds more

    def sparse(name: str, writes: dict[int, bytes]) -> int:
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, size)
        for offset, data in writes.items():
            os.pwrite(fd, data, offset)
        return fd

    data = random.Random(3).randbytes(300_000)
    a = sparse("a", {4096: data, size // 2: data})
    b = sparse("b", {4096: data, size // 2: data})
    zeros = sparse("zeros", {4096: data, size // 2: data, 1 << 30: bytes(1 << 20)})
    other = sparse("other", {4096: data, size // 2: data[:-1] + b"!"})
    try:
        assert extents.same_content(a, b, size)
        assert extents.same_content(a, zeros, size)  # written zeros equal a hole
        assert not extents.same_content(a, other, size)
    finally:
        for fd in (a, b, zeros, other):
            os.close(fd)
