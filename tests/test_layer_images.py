"""Layers as EROFS images (``images.py``, ``layer_builder.py``): each way of mounting them
(file-backed, through a loop device, plain directories) shows every snapshot exactly; an image
is mounted once however many branches stack it and goes when none does; a torn image is
rebuilt; a store of directory layers keeps working and gains images."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import conftest
from conftest import (
    assert_same_view,
    check_live,
    dir_view,
    hypothesis_settings,
    needs_overlay,
    snapshot_view,
)
from cascowfs import fsck, images, overlay
from cascowfs.state import StateManager, unmount_store_mounts
from cascowfs.tuning import Tuning

pytestmark = needs_overlay

MODES = [images.FILE_BACKED, images.LOOP, images.DIRECTORIES]


def _needs(mode: str) -> None:
    if mode != images.DIRECTORIES and images.detect(images.AUTO, Path("/var/tmp")) == "dir":
        pytest.skip("this machine mounts no EROFS image")
    if mode == images.LOOP and not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices here")


def _source(root: Path) -> Path:
    (root / "d" / "e").mkdir(parents=True)
    (root / "f").write_bytes(b"file\n")
    (root / "d" / "big").write_bytes(os.urandom(300_000))
    (root / "d" / "e" / "deep").write_bytes(b"deep")
    (root / "gone").write_bytes(b"deleted by the commit")
    (root / "was-file").write_bytes(b"a file, then a directory")
    os.link(root / "f", root / "d" / "hard")
    os.symlink("../f", root / "d" / "link")
    os.setxattr(root / "f", b"user.note", b"x")
    os.utime(root / "d" / "e" / "deep", ns=(1, 123456789))
    return root


def _edit(tree: Path) -> None:
    (tree / "f").write_bytes(b"changed")
    (tree / "gone").unlink()  # a whiteout in the delta
    (tree / "was-file").unlink()
    (tree / "was-file").mkdir()  # an opaque directory in the delta
    (tree / "was-file" / "inside").write_bytes(b"new")


def _image_mounts(sm) -> list[overlay.MountRecord]:
    return overlay.mounts_under(sm.mounts_dir)


def _chain(sm, sid: str) -> list[str]:
    with sm.db.read() as txn:
        return sm.catalog.snapshot(txn, sid).layers


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_shows_each_snapshot_exactly(tmp_path, mode):
    _needs(mode)
    tuning = Tuning(layer_images=mode, merge_fan_in=2)
    with conftest.open_store(tmp_path / "store", tuning=tuning) as sm:
        sm.import_tree(_source(tmp_path / "src"), "base")
        tree = sm.create_branch("b", "base").tree
        for i in range(3):
            _edit(tree) if i == 0 else (tree / f"n{i}").write_bytes(b"%d" % i)
            sm.commit("b", f"c{i}")
        sm.settle()
        with sm.db.read() as txn:
            spans = {lid: sm.catalog.layer(txn, lid).span for lid in _chain(sm, "c2")}
        assert sorted(spans.values()) == [0, 1, 2], spans  # c2's delta, c0+c1 merged, base
        for lid, span in spans.items():
            # a commit's own delta stays a directory: mkfs.erofs is off the commit's path
            assert sm.layers.is_image(lid) == (mode != images.DIRECTORIES and span != 1), lid
        for sid in ("base", "c0", "c2"):
            other = sm.create_branch(f"on-{sid}", sid).tree
            assert_same_view(dir_view(other), snapshot_view(sm, sid), f"branch on {sid}")
        check_live(sm, deep=True)
        if mode == images.DIRECTORIES:
            assert _image_mounts(sm) == []
        else:
            assert {m.fstype for m in _image_mounts(sm)} == {"erofs"}
            if mode == images.LOOP:
                assert all(m.source.startswith("/dev/loop") for m in _image_mounts(sm))


@contextmanager
def _imported(tmp_path: Path) -> Iterator[tuple[StateManager, str]]:
    """A store of file-backed image layers holding ``_source`` as "base", and its layer."""
    _needs(images.FILE_BACKED)
    tuning = Tuning(layer_images=images.FILE_BACKED)
    with conftest.open_store(tmp_path / "store", tuning=tuning) as sm:
        sm.import_tree(_source(tmp_path / "src"), "base")
        (lid,) = _chain(sm, "base")
        yield sm, lid


def test_an_image_is_mounted_once_and_goes_with_its_last_branch(tmp_path):
    with _imported(tmp_path) as (sm, lid):
        trees = [sm.create_branch(f"b{i}", "base").tree for i in range(3)]
        assert [m.target for m in _image_mounts(sm)] == [str(sm.mounts_dir / lid)]
        assert all((t / "f").read_bytes() == b"file\n" for t in trees)
        for i in range(3):
            sm.discard(f"b{i}")
        sm.settle()
        assert _image_mounts(sm) == []
        sm.prune("base")
        sm.settle()
        assert not sm.layers.exists(lid) and os.listdir(sm.mounts_dir) == []


def test_a_sweep_soon_after_another_leaves_the_image_mounts_to_a_later_one(tmp_path):
    """The trash rounds of a busy mix come back to back; each sweeps the image mounts at most
    once in ``unless_swept_within`` seconds, and ``settle`` sweeps whatever they left."""
    with _imported(tmp_path) as (sm, lid):
        image_mount = [str(sm.mounts_dir / lid)]
        sm.create_branch("b", "base")
        assert [m.target for m in _image_mounts(sm)] == image_mount
        overlay.unmount_stacked(sm.tree_path("b"))  # nothing stacks the image any more
        sm.layers.unmount_unused()
        assert _image_mounts(sm) == []
        sm.create_branch("c", "base")  # mounts it again
        overlay.unmount_stacked(sm.tree_path("c"))
        sm.layers.unmount_unused(unless_swept_within=3600)  # the last sweep was just now
        assert [m.target for m in _image_mounts(sm)] == image_mount
        sm.settle()
        assert _image_mounts(sm) == []


def test_a_burst_of_operations_leaves_one_sweep_of_the_image_mounts_to_the_shutdown(
    tmp_path, monkeypatch
):
    """Every commit and discard asks for a round of the trash and a sweep of the image mounts
    (``unmount_unused``: a walk over every mount and every layer). With the background thread
    held up by a first round, the burst's requests fold into one waiting round instead of one
    each for the shutdown to run; the shutdown leaves exactly the image mounts the live
    branches (and the discarded ones in the trash) stack, and ``umount --branches`` none."""
    _needs(images.FILE_BACKED)
    store = conftest.register_store(tmp_path / "store")
    sm = StateManager.open(store, tuning=Tuning(layer_images=images.FILE_BACKED))
    try:
        sm.import_tree(_source(tmp_path / "src"), "base")
        sm.settle()
        burst_done = threading.Event()
        sweeps = 0
        sweep = sm.layers.unmount_unused

        def held_sweep(**rate: float) -> None:
            nonlocal sweeps
            sweeps += 1
            burst_done.wait()
            sweep(**rate)

        monkeypatch.setattr(sm.layers, "unmount_unused", held_sweep)
        requests = 0
        for lineage in range(8):
            tree = sm.create_branch("grow", "base").tree
            for step in range(8):
                (tree / "f").write_bytes(f"{lineage}.{step}".encode())
                sm.commit("grow", f"s{lineage}.{step}")
                requests += 1
            sm.discard("grow")
            requests += 1
        for j in range(20):
            sm.create_branch(f"live{j}", f"s{j % 8}.{j % 7}")
        burst_done.set()
        sm.close()  # as the daemon does: the branches stay mounted
        # the round that held the thread, the one waiting behind it if it started before
        # close, and close's own sweep (close leaves the trash to the next open)
        assert sweeps <= 3 < requests
        stacked = {
            lower
            for m in overlay.mounts_under(sm.branches_dir) + overlay.mounts_under(sm.trash_dir)
            for lower in overlay.overlay_dirs(m).lowers
            if lower.startswith(f"{sm.mounts_dir}/")  # not the commits' directory layers
        }
        assert stacked and {m.target for m in _image_mounts(sm)} == stacked
        sm = StateManager.open(store, tuning=Tuning(layer_images=images.FILE_BACKED))
        sm.close(unmount_branches=True)  # cascowfs umount --branches
        assert overlay.mounts_under(store) == []
    finally:
        sm.close(unmount_branches=True)
        unmount_store_mounts(store)


def test_a_killed_daemon_leaves_no_image_mount_behind(tmp_path):
    _needs(images.FILE_BACKED)
    tuning = Tuning(layer_images=images.FILE_BACKED)
    store = tmp_path / "store"
    with conftest.open_store(store, tuning=tuning) as sm:
        sm.import_tree(_source(tmp_path / "src"), "base")
        sm.create_branch("keep", "base")
        sm.create_branch("drop", "base")
    script = (
        "import os, sys\n"
        "from cascowfs.state import StateManager\n"
        "from cascowfs.tuning import Tuning\n"
        "sm = StateManager.open(sys.argv[1], tuning=Tuning(layer_images='erofs'))\n"
        "sm.commit('drop', 'c1')\n"
        "sm.create_branch('later', 'c1')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run(
        [os.sys.executable, "-c", script, str(store)], cwd=conftest.REPO, check=False
    )
    assert killed.returncode == -9
    before = {m.target for m in overlay.mounts_under(store / "mounts")}
    assert before, "the killed run left its image mounts"
    with conftest.open_store(store, tuning=tuning) as sm:
        sm.discard("drop")
        sm.discard("later")
        sm.prune("c1")
        sm.settle()
        (base,) = _chain(sm, "base")
        assert [m.target for m in _image_mounts(sm)] == [str(sm.mounts_dir / base)]
        check_live(sm, deep=True)
    assert overlay.mounts_under(store) == []  # umount --branches: the images go too


def test_an_image_that_does_not_mount_is_rebuilt(tmp_path):
    with _imported(tmp_path) as (sm, lid):
        with open(sm.layers.path(lid), "r+b") as f:  # its superblock, torn
            f.seek(1024)
            f.write(bytes(128))
        tree = sm.create_branch("b", "base").tree
        assert_same_view(dir_view(tree), snapshot_view(sm, "base"), "branch on a rebuilt image")
        assert sm.layers.is_image(lid)
        check_live(sm, deep=True)


def test_an_image_cut_short_is_rebuilt_not_served(tmp_path):
    """The kernel mounts an image that lost its end and answers EUCLEAN for the files past
    the cut: such an image is refused before it is mounted, and rebuilt from the CAS."""
    with _imported(tmp_path) as (sm, lid):
        path = sm.layers.path(lid)
        whole = path.stat().st_size
        os.truncate(path, whole // 2)
        with pytest.raises(images.ImageError, match=f"cut short .{whole // 2} of its {whole}"):
            images.check_whole(path)
        problems = fsck.check(sm).problems
        assert any(p.startswith(f"invariant 1: layer {lid}: layer image") and "cut short" in p
                   for p in problems), problems
        tree = sm.create_branch("b", "base").tree
        assert_same_view(dir_view(tree), snapshot_view(sm, "base"), "branch on a rebuilt image")
        assert sm.layers.is_image(lid) and path.stat().st_size >= whole // 2
        images.check_whole(path)
        check_live(sm, deep=True)


def test_a_store_of_directory_layers_keeps_them_and_gains_images(tmp_path):
    _needs(images.FILE_BACKED)
    store = tmp_path / "store"
    with conftest.open_store(store, tuning=Tuning(layer_images=images.DIRECTORIES)) as sm:
        sm.import_tree(_source(tmp_path / "src"), "base")
        sm.create_branch("b", "base")
    tuning = Tuning(layer_images=images.FILE_BACKED, merge_fan_in=2)
    with conftest.open_store(store, tuning=tuning) as sm:
        (old,) = _chain(sm, "base")
        assert sm.layers.path(old).is_dir()
        tree = sm.branch("b").tree
        _edit(tree)
        sm.commit("b", "c0")
        (tree / "n").write_bytes(b"n")
        sm.commit("b", "c1")
        sm.settle()
        new, below = _chain(sm, "c1")  # the two deltas merged into an image
        assert sm.layers.is_image(new) and below == old and sm.layers.path(old).is_dir()
        other = sm.create_branch("c", "c1").tree
        assert_same_view(dir_view(other), snapshot_view(sm, "c1"), "images over directories")
        check_live(sm, deep=True)


def test_a_sparse_tree_stays_a_directory_layer(tmp_path):
    _needs(images.FILE_BACKED)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "disk.img", "wb") as f:
        f.write(b"start")
        f.truncate(64 << 20)
    with conftest.open_store(tmp_path / "store", tuning=Tuning(layer_images="erofs")) as sm:
        sm.import_tree(src, "base")
        (lid,) = _chain(sm, "base")
        assert sm.layers.path(lid).is_dir()
        assert os.stat(sm.layers.path(lid) / "disk.img").st_blocks * 512 < 1 << 20


@pytest.mark.parametrize("holder", ["d/f", "d", "."])
def test_an_entry_with_large_xattrs_keeps_its_layer_a_directory(tmp_path, holder):
    """Whichever entry holds them (a file, a directory, the root): an import's scan finds
    them as it reads, and so does the walk of a layer written from the CAS (a flatten)."""
    _needs(images.FILE_BACKED)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"data")
    os.setxattr(src / holder, b"user.big", b"v" * (images.MAX_XATTR_BYTES + 1))
    with conftest.open_store(tmp_path / "store", tuning=Tuning(layer_images="erofs")) as sm:
        _import_and_flatten_keep_directories(sm, src)
        check_live(sm, deep=True)


def _import_and_flatten_keep_directories(sm: StateManager, src: Path) -> None:
    """Import ``src`` as "base", then flatten it: both layers are directories."""
    sm.import_tree(src, "base")
    (lid,) = _chain(sm, "base")
    assert sm.layers.path(lid).is_dir()
    sm.flatten("base")
    (flat,) = _chain(sm, "base")
    assert flat != lid and sm.layers.path(flat).is_dir()


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_a_name_of_255_bytes_keeps_its_layer_a_directory(tmp_path, monkeypatch, kind):
    """mkfs.erofs 1.5 fails on such a name once it has read the whole tree: the import's scan
    and the walk of a layer written from the CAS both see it first, and run no mkfs.erofs."""
    _needs(images.FILE_BACKED)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    longest = src / "d" / ("n" * 255)
    {"file": lambda: longest.write_bytes(b"data"), "dir": longest.mkdir,
     "symlink": lambda: longest.symlink_to("f")}[kind]()
    (src / "d" / ("s" * 254)).write_bytes(b"one byte shorter")
    runs: list[Path] = []
    build = images.build
    monkeypatch.setattr(images, "build", lambda tree, image, **kw: (runs.append(image),
                                                                      build(tree, image, **kw)))
    with conftest.open_store(tmp_path / "store", tuning=Tuning(layer_images="erofs")) as sm:
        _import_and_flatten_keep_directories(sm, src)
        assert runs == []
        assert_same_view(dir_view(src), snapshot_view(sm, "base"), "a 255-byte name")
        check_live(sm, deep=True)
    os.unlink(longest) if kind != "dir" else os.rmdir(longest)
    with conftest.open_store(tmp_path / "other", tuning=Tuning(layer_images="erofs")) as sm:
        sm.import_tree(src, "base")
        (lid,) = _chain(sm, "base")
        assert sm.layers.is_image(lid), "a name of 254 bytes fits an image"


def test_xattrs_just_within_what_mkfs_erofs_writes_make_an_image(tmp_path):
    _needs(images.FILE_BACKED)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    name = b"user.big"
    os.setxattr(src / "d", name, b"v" * (images.MAX_XATTR_BYTES - len(name)))
    with conftest.open_store(tmp_path / "store", tuning=Tuning(layer_images="erofs")) as sm:
        sm.import_tree(src, "base")
        (lid,) = _chain(sm, "base")
        assert sm.layers.is_image(lid)
        check_live(sm, deep=True)


def _root_file_layouts(image: Path) -> dict[bytes, int]:
    """The EROFS data layout of each file in the root directory of ``image`` (read from the
    on-disk format: superblock at 1 KiB, inodes at 32-byte slots from the metadata block,
    the root's dirents inline after its inode)."""
    raw = image.read_bytes()
    (root_nid,) = struct.unpack_from("<H", raw, 1024 + 14)
    (meta,) = struct.unpack_from("<I", raw, 1024 + 40)  # the first block of inodes

    def inode(nid: int) -> tuple[int, int, int]:  # (layout, offset of its inline data, size)
        at = meta * 4096 + nid * 32
        fmt, icount = struct.unpack_from("<HH", raw, at)
        extended = fmt & 1
        size = struct.unpack_from("<Q" if extended else "<I", raw, at + 8)[0]
        xattrs = 12 + 4 * (icount - 1) if icount else 0
        return (fmt >> 1) & 7, at + (64 if extended else 32) + xattrs, size

    layout, at, size = inode(root_nid)
    assert layout == 2, "a tiny root directory keeps its dirents inline"
    dirents = raw[at : at + size]
    count = struct.unpack_from("<H", dirents, 8)[0] // 12
    layouts = {}
    for i in range(count):
        nid, nameoff, kind = struct.unpack_from("<QHB", dirents, 12 * i)
        end = struct.unpack_from("<H", dirents, 12 * i + 20)[0] if i + 1 < count else size
        name = dirents[nameoff:end].rstrip(b"\0")
        if kind == 1:  # EROFS_FT_REG_FILE
            layouts[name] = inode(nid)[0]
    return layouts


def test_images_keep_no_file_data_beside_inodes(tmp_path):
    """A file's last partial block is not written beside its inode, so that the inodes of a
    directory fill their blocks and a cold stat walk reads fewer of them."""
    _needs(images.FILE_BACKED)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "small").write_bytes(b"x" * 100)
    (tree / "random").write_bytes(os.urandom(5000))  # lz4 cannot shrink it: stored plain
    image = tmp_path / "layer.img"
    images.build(tree, image, compress=True)
    layouts = _root_file_layouts(image)
    assert set(layouts) == {b"small", b"random"}
    assert 2 not in layouts.values(), layouts  # EROFS_INODE_FLAT_INLINE


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="layer images 'zfs'"):
        images.detect("zfs", Path("/var/tmp"))


# names and xattr values a branch may create: any byte but "/" and NUL, up to NAME_MAX
_names = st.binary(min_size=1, max_size=255).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
_xattrs = st.dictionaries(
    st.binary(min_size=1, max_size=40).filter(lambda k: b"\0" not in k).map(
        lambda k: b"user." + k
    ),
    st.binary(max_size=900),  # 3 of them stay under images.MAX_XATTR_BYTES
    max_size=3,
)


@given(
    entries=st.lists(st.tuples(_names, st.binary(max_size=5000), _xattrs), max_size=12),
    deleted=st.integers(0, 12),
)
@hypothesis_settings(15)
def test_any_names_and_xattrs_round_trip_through_images(tmp_path_factory, entries, deleted):
    _needs(images.FILE_BACKED)
    base = tmp_path_factory.mktemp("names")
    src = base / "src"
    (src / "dir").mkdir(parents=True)
    made = []
    for name, content, xattrs in entries:
        path = os.path.join(os.fsencode(src / "dir"), name)
        if os.path.lexists(path):
            continue
        with open(path, "wb") as f:
            f.write(content)
        for key, value in xattrs.items():
            os.setxattr(path, key, value)
        made.append(name)
    tuning = Tuning(layer_images="erofs", merge_fan_in=2)
    with conftest.open_store(base / "store", tuning=tuning) as sm:
        sm.import_tree(src, "base")
        tree = sm.create_branch("b", "base").tree
        for name in made[:deleted]:  # whiteouts of hostile names in the merged image
            os.unlink(os.path.join(os.fsencode(tree / "dir"), name))
        sm.commit("b", "mid")
        (tree / "more").write_bytes(b"more")
        sm.commit("b", "next")
        sm.settle()
        assert len(_chain(sm, "next")) == 2  # the two deltas merged
        assert all(sm.layers.is_image(lid) for lid in _chain(sm, "next"))
        for sid in ("base", "next"):
            other = sm.create_branch(f"on-{sid}", sid).tree
            assert_same_view(dir_view(other), snapshot_view(sm, sid), f"branch on {sid}")
        check_live(sm, deep=True)
