"""Quoting of paths in line-oriented output (cascowfs.pathquote): git's rule, exact round trips,
and a change line that no file name can split or forge."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs.errors import InvalidArgumentError
from cascowfs.model import Change
from cascowfs.pathquote import path_bytes, path_text, quote, unquote
from conftest import hypothesis_settings

# What a file name can hold: any byte but NUL and '/', 1..255 of them.
NAME_BYTES = st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b and b"/" not in b)
PATH_BYTES = st.lists(NAME_BYTES, min_size=1, max_size=4).map(b"/".join)

AWKWARD = [b"x\nD victim", b"tab\there", b"back\\slash", b'"quoted"', b" lead", b"trail ",
           b"\xff\xfe not utf-8", "caf\u00e9".encode(), b"\x7fdel", b"\x01\x1f", b"a\rb",
           b"plain-name.txt", b"\a\b\t\n\v\f\r"]


@hypothesis_settings(500)
@given(PATH_BYTES)
def test_quote_round_trips_any_path(raw):
    text = quote(raw)
    assert unquote(text) == raw
    assert text.isascii() and "\n" not in text and "\r" not in text
    assert path_bytes(path_text(raw)) == raw


@hypothesis_settings(500)
@given(st.lists(st.tuples(st.sampled_from("AMD"), PATH_BYTES), max_size=8))
def test_change_lines_parse_back_to_exactly_the_changes(items):
    changes = [Change(path_text(raw), kind) for kind, raw in items]
    listing = "".join(change.line() + "\n" for change in changes)
    assert [Change.from_line(line) for line in listing.split("\n")[:-1]] == changes
    records = b"".join(change.record_z() for change in changes)
    assert [Change.from_record_z(r) for r in records.split(b"\0")[:-1]] == changes


def test_quote_follows_gits_escapes():
    assert quote(b"plain/name.txt") == "plain/name.txt"
    assert quote(b" lead and trail ") == " lead and trail "  # spaces need no quoting
    assert quote(b"x\nD victim") == '"x\\nD victim"'
    assert quote(b'a"b\\c') == '"a\\"b\\\\c"'
    assert quote(b"\a\b\t\n\v\f\r") == '"\\a\\b\\t\\n\\v\\f\\r"'
    assert quote(b"\x01\x7f\xff") == '"\\001\\177\\377"'
    assert quote("caf\u00e9") == '"caf\\303\\251"'


def test_quote_matches_git_with_quotepath(tmp_path: Path):
    """git itself is the oracle: ls-files of a repository holding the awkward names."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for raw in AWKWARD:
        (repo / path_text(raw)).write_bytes(b"")
    out = subprocess.run(["git", "-c", "core.quotePath=true", "ls-files", "-o"], cwd=repo,
                         check=True, capture_output=True).stdout
    assert sorted(out.decode("ascii").splitlines()) == sorted(quote(raw) for raw in AWKWARD)


@pytest.mark.parametrize("text", ['"open', '"bad \\q escape"', '"\\40"', '"inner"quote"',
                                  '"\\400"', '"caf\u00e9"'])
def test_unquote_refuses_malformed_text(text):
    with pytest.raises(InvalidArgumentError):
        unquote(text)


@pytest.mark.parametrize("line", ["", "A", "Ax", "X path", "A\tpath", 'A "x\nD victim'])
def test_change_line_refuses_malformed_lines(line):
    with pytest.raises(InvalidArgumentError):
        Change.from_line(line)


def test_change_line_keeps_spaces_of_a_bare_path():
    assert Change.from_line("A  ") == Change(" ", "A")
    assert Change.from_line("D  a b ") == Change(" a b ", "D")
