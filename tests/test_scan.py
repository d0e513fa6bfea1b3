"""cascowfs/scan.py: real directories turned into snapshot trees. ``scan_directory`` (an import,
mirrored into a layer from the bytes it hashed) and ``apply_upper`` (a branch's overlayfs upper
laid over its base) must give exactly the tree a reader of the directory sees."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_same_view, dir_view, needs_overlay, snapshot_view
from cascowfs import layers, overlay
from cascowfs.model import Entry
from cascowfs.scan import ObjectSink, apply_upper, finalize, scan_directory
from cascowfs.trees import STORED, TreeStore


class _Tree:
    """The read path ``snapshot_view`` walks, over a bare content store."""

    def __init__(self, content, root: Entry) -> None:
        self.content, self.trees, self.root = content, TreeStore(content), root

    def root_entry(self, _id: str) -> Entry:
        return self.root

    def read_tree(self, tree_id: bytes) -> dict[bytes, Entry]:
        return self.trees.get(tree_id)

    def read_file(self, content_id: bytes, offset: int, size: int) -> bytes:
        return self.content.read(content_id, offset, size)

    def snapshot(self, _id: str) -> SimpleNamespace:
        return SimpleNamespace(files=self.root.tree_files, size=self.root.tree_bytes)


def _stored(content, node, sink: ObjectSink) -> _Tree:
    """Finalize a scanned tree, store its objects (``sink`` holds those of the scan), and read
    it back from the store."""
    root = finalize(node, sink)
    objects = sink.take()
    content.db.write(lambda txn: content.put_objects(txn, objects))
    return _Tree(content, root)


def _source(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a.py").write_bytes(b"a = 1\n")
    (root / "pkg" / "big.bin").write_bytes(os.urandom(1 << 20))  # several chunks
    (root / "pkg" / "sub" / "same").write_bytes(b"a = 1\n")    # the same content again
    (root / "nul").write_bytes(b"")
    (root / "name with\nnewline \xe9").write_bytes(b"odd")
    (root / os.fsdecode(b"not-utf8-\xff")).write_bytes(b"bytes")
    os.link(root / "a.py", root / "pkg" / "hard")
    os.symlink("../a.py", root / "pkg" / "link")
    os.symlink("/dangling/target", root / "dangling")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "a.py", b"user.k", b"\x00binary\xff")
    os.chmod(root / "pkg" / "sub", 0o750)
    os.utime(root / "pkg", ns=(7, 1_000_000_007))
    return root


def test_a_scanned_tree_reads_back_as_the_directory_and_its_mirror(content, tmp_path):
    src = _source(tmp_path / "src")
    want = dir_view(src)
    sink = ObjectSink()
    tree = _stored(content, scan_directory(src, sink, mirror_to=tmp_path / "layer"), sink)
    assert_same_view(snapshot_view(tree, "scanned"), want, "scanned tree")
    assert_same_view(dir_view(tmp_path / "layer"), want, "mirrored layer")
    assert tree.root.tree_files == sum(1 for n in want.values() if n.kind == "f")


def _scanned_root(content, src: Path) -> Entry:
    sink = ObjectSink()
    return _stored(content, scan_directory(src, sink), sink).root


def test_scanning_is_deterministic_and_sees_every_change(content, tmp_path):
    src = _source(tmp_path / "src")
    first = _scanned_root(content, src)
    assert _scanned_root(content, src) == first
    (src / "pkg" / "sub" / "same").write_bytes(b"a = 2\n")
    os.utime(src / "pkg" / "sub" / "same", ns=(0, 0))
    os.utime(src / "pkg" / "sub", ns=(0, 0))
    os.utime(src / "pkg", ns=(7, 1_000_000_007))
    assert _scanned_root(content, src).ref != first.ref


def test_only_a_directory_is_scanned(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        scan_directory(tmp_path / "file", ObjectSink())
    with pytest.raises(FileNotFoundError):
        scan_directory(tmp_path / "missing", ObjectSink())


def test_a_sink_keeps_new_objects_once_and_flushes_in_batches():
    batches: list[list[tuple[bytes, bytes]]] = []
    sink = ObjectSink(batches.append, batch_bytes=10)
    sink.add([(b"a", b"1234"), (b"stored", STORED), (b"a", b"1234")])
    assert batches == [] and sink.pending_bytes == 4
    sink.add([(b"b", b"1234567")])
    assert batches == [[(b"a", b"1234"), (b"b", b"1234567")]] and sink.pending_bytes == 0
    sink.add([(b"c", b"1")])
    sink.flush()
    sink.flush()  # nothing pending: no empty batch
    assert batches[1:] == [[(b"c", b"1")]]
    keeper = ObjectSink()
    keeper.add([(b"d", b"x" * 100)])
    keeper.flush()  # no writer: the objects stay until taken
    assert keeper.take() == [(b"d", b"x" * 100)] and keeper.take() == []


def _edit_through_the_mount(mnt: Path) -> None:
    """Changes that give the upper every form overlayfs has: copy-ups, whiteouts, an opaque
    directory, a renamed (redirected) directory, a new hard link, metadata-only changes."""
    (mnt / "a.py").write_bytes(b"a = 3\n")
    os.unlink(mnt / "nul")
    os.unlink(mnt / "fifo")
    (mnt / "pkg" / "sub" / "same").unlink()
    os.rmdir(mnt / "pkg" / "sub")
    (mnt / "pkg" / "sub").mkdir()                      # deleted and made again: opaque
    (mnt / "pkg" / "sub" / "fresh").write_bytes(b"fresh")
    os.rename(mnt / "pkg", mnt / "moved")              # a redirect
    os.link(mnt / "moved" / "big.bin", mnt / "big-again")
    os.chmod(mnt / "empty-dir", 0o700)
    os.utime(mnt / "dangling", ns=(3, 3), follow_symlinks=False)


def _edited_in_a_branch(content, tmp_path: Path, src: Path, edit, then):
    """Import ``src``, mount a branch of it (overlayfs over its materialized layer), ``edit``
    through the mount; the base, the upper and what ``then`` found in the mount."""
    sink = ObjectSink()
    base = _stored(content, scan_directory(src, sink), sink)
    lower, upper, work, mnt = (tmp_path / d for d in ("lower", "upper", "work", "mnt"))
    layers.materialize(base.trees, content, base.root, lower)
    for d in (upper, work, mnt):
        d.mkdir()
    layers.set_root_metadata(upper, base.root)
    overlay.mount_overlay(mnt, [lower], upper, work)
    try:
        edit(mnt)
        return base, upper, then(mnt)
    finally:
        overlay.unmount(mnt, lazy=False)


@needs_overlay
def test_an_upper_over_its_base_gives_what_the_branch_shows(content, tmp_path):
    base, upper, want = _edited_in_a_branch(
        content, tmp_path, _source(tmp_path / "src"), _edit_through_the_mount, dir_view
    )
    for cache in (None, {}):
        sink = ObjectSink()
        node = apply_upper(base.trees, base.root, upper, sink, file_cache=cache)
        assert_same_view(snapshot_view(_stored(content, node, sink), "branch"), want,
                         "upper over base")


def _link_keys(trees: TreeStore, root: Entry) -> dict[bytes, bytes]:
    """Every hard-link member's key by its path."""
    keys, stack = {}, [(root, b"")]
    while stack:
        entry, path = stack.pop()
        for name, child in trees.get(entry.ref).items():
            cpath = path + b"/" + name if path else name
            if child.is_dir:
                stack.append((child, cpath))
            elif child.link:
                keys[cpath] = child.link
    return keys


def _linked_source(root: Path) -> Path:
    """Two hard-link groups, a big one spread over two directories and a pair, and files
    that belong to none."""
    for d in ("g/x", "g/y", "pair", "plain"):
        (root / d).mkdir(parents=True)
    (root / "g" / "x" / "m0").write_bytes(b"group")
    for n in range(1, 40):
        os.link(root / "g" / "x" / "m0", root / "g" / ("x", "y")[n % 2] / f"m{n}")
    (root / "pair" / "p").write_bytes(b"pair")
    os.link(root / "pair" / "p", root / "pair" / "q")
    (root / "plain" / "f").write_bytes(b"plain")
    return root


_LINK_EDITS = {  # name -> (an edit through the branch, whether it touches a base group)
    "unrelated": (lambda m: (m / "plain" / "new").write_bytes(b"new"), False),
    "own group": (lambda m: [(m / "plain" / "n").write_bytes(b"n"),
                             os.link(m / "plain" / "n", m / "plain" / "n2")], False),
    "copy-up": (lambda m: (m / "pair" / "q").open("ab").write(b"+"), True),
    "unlink": (lambda m: (m / "g" / "y" / "m1").unlink(), True),
    "link": (lambda m: os.link(m / "g" / "x" / "m0", m / "plain" / "m-again"), True),
    "rename": (lambda m: os.rename(m / "g" / "y", m / "plain" / "y"), True),
    "opaque": (lambda m: [(m / "pair" / n).unlink() for n in ("p", "q")]
               + [os.rmdir(m / "pair"), (m / "pair").mkdir()], True),
    "type": (lambda m: [(m / "pair" / "p").unlink(), (m / "pair" / "p").mkdir()], True),
}


@needs_overlay
@pytest.mark.parametrize("edit", sorted(_LINK_EDITS))
def test_a_commit_keys_link_groups_as_an_import_and_skips_untouched_ones(
    content, tmp_path, monkeypatch, edit
):
    """The hard-link keys of a commit are those a fresh import of the branch gives; and a
    commit that touches no member of its base's groups does not walk them again, which
    cost every commit over a base with 60,000 members some 100 ms."""
    from cascowfs import scan

    change, touches = _LINK_EDITS[edit]
    base, upper, imported = _edited_in_a_branch(
        content, tmp_path, _linked_source(tmp_path / "src"), change,
        lambda mnt: _scanned_root(content, mnt),
    )
    walked = []
    canonicalize = scan.canonicalize_links
    monkeypatch.setattr(scan, "canonicalize_links", lambda *a: walked.append(canonicalize(*a)))
    sink = ObjectSink()
    committed = _stored(content, apply_upper(base.trees, base.root, upper, sink), sink).root
    keys = _link_keys(base.trees, committed)
    assert keys and keys == _link_keys(base.trees, imported)
    assert bool(walked) == touches


def test_a_directory_opened_below_a_walk_must_have_the_owner_and_mode_it_listed(tmp_path):
    """A directory deleted and another made at its name may take its inode number back:
    the walk's lstat of root's directory must not pass for the agent's new one."""
    from cascowfs import beneath
    from cascowfs.errors import BusyError

    (tmp_path / "d").mkdir()
    os.chown(tmp_path / "d", 65534, 65534)
    now = os.lstat(tmp_path / "d")
    top = beneath.open_top(os.fsencode(tmp_path), os.lstat(tmp_path))
    try:
        os.close(beneath.open_below(top, b"d", now, b"d"))  # the very directory: opened
        fields = list(now)
        fields[4] = fields[5] = 0  # listed as root's, with the number the agent's holds
        seen = os.stat_result(fields)
        with pytest.raises(BusyError, match="d: replaced since the walk saw it"):
            beneath.open_below(top, b"d", seen, b"d")
    finally:
        os.close(top)
