"""Object ids and zstd frames (``codec.py``), and the layering it makes possible: ``cas.py``
and ``trees.py`` both build on it, and ``trees.py`` never imports ``cas.py`` at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cascowfs import codec
from cascowfs.errors import StoreIOError

from conftest import hypothesis_settings

KINDS = (codec.TYPE_CHUNK, codec.TYPE_PACK, codec.TYPE_LIST, codec.TYPE_TREE)
PACKAGE = Path(codec.__file__).parent


@hypothesis_settings(200)
@given(payload=st.binary(max_size=4096))
def test_the_same_payload_under_two_kinds_never_shares_an_id(payload):
    ids = {codec.object_id(kind, payload) for kind in KINDS}
    assert len(ids) == len(KINDS)
    assert all(len(i) == codec.ID_SIZE for i in ids)


@hypothesis_settings(200)
@given(
    payload=st.binary(max_size=1 << 16),
    level=st.sampled_from([codec.ZSTD_LEVEL, codec.IMPORT_ZSTD_LEVEL]),
)
def test_frames_decompress_to_what_was_compressed(payload, level):
    assert codec.decompress(codec.compress(payload, level)) == payload
    assert codec.decompress(codec.compress(memoryview(payload), level)) == payload


@hypothesis_settings(100)
@given(garbage=st.binary(min_size=1, max_size=256))
def test_bytes_that_are_no_frame_fail_as_a_store_error(garbage):
    frame = codec.compress(b"x" * 100)
    with pytest.raises(StoreIOError, match="does not decompress"):
        codec.decompress(b"\x00" + garbage + frame[::-1])


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules imported at module level outside ``if TYPE_CHECKING``, modules imported
    inside functions) by the package module at ``path``."""
    tree = ast.parse(path.read_text())
    top, nested = set(), set()

    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.ImportFrom):
            return {node.module or ""} | {f"{node.module}.{a.name}" if node.module else a.name
                                          for a in node.names}
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        return set()

    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            continue
        top |= names(stmt)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                nested |= names(inner)
    return top, nested


def test_trees_builds_on_codec_and_cas_on_trees_without_a_cycle():
    trees_top, trees_nested = _imports(PACKAGE / "trees.py")
    cas_top, cas_nested = _imports(PACKAGE / "cas.py")
    assert "cas" not in trees_top and not any(m.startswith("cas") for m in trees_nested)
    assert "codec" in trees_top and "trees" in cas_top
    assert not cas_nested and not trees_nested
