"""File names cannot forge change listings: the branch files `status` and `status.z`, `cascowfs
status`/`diff` (lines, -z, --json) and Client.status()/diff() report exactly the real changes,
whatever bytes the names hold."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cascowfs import Client
from cascowfs.model import Change
from cascowfs.pathquote import path_text
from conftest import hypothesis_settings
from fusehelpers import CLI, REPO, mounted, needs_fuse, run_cli

FORGED = b"x\nD victim"
NOT_UTF8 = b"\xff\nM victim"

NAME_BYTES = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"\0" not in b and b"/" not in b and b not in (b".", b".."))


def _cli_bytes(*args: str) -> bytes:
    proc = subprocess.run([*CLI, *args], capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _parse_lines(text: str) -> list[Change]:
    return sorted(Change.from_line(line) for line in text.split("\n")[:-1])


def _write(tree: Path, raw: bytes, data: bytes) -> None:
    with open(os.path.join(os.fsencode(tree), raw), "wb") as fh:
        fh.write(data)


def _import_base(fs) -> None:
    src = fs.base / "src"
    src.mkdir()
    (src / "victim").write_text("precious\n")
    (src / "keep").write_text("keep\n")
    assert fs.ctl(f"import base {src}") == (0, "ok base")


@needs_fuse
def test_a_name_holding_a_change_line_forges_nothing():
    with mounted() as fs, Client(fs.mnt) as client:
        _import_base(fs)
        tree = client.branch("agent", "base")
        for raw in (FORGED, NOT_UTF8):
            _write(tree, raw, b"")
        want = sorted([Change(path_text(FORGED), "A"), Change(path_text(NOT_UTF8), "A")])
        branch = fs.mnt / "branches" / "agent"
        status = (branch / "status").read_bytes().decode("ascii")
        assert status == 'A "x\\nD victim"\nA "\\377\\nM victim"\n'
        assert _parse_lines(status) == want
        assert (branch / "status.z").read_bytes() == b"A x\nD victim\0A \xff\nM victim\0"
        assert sorted(client.status("agent")) == want
        assert sorted(c.raw_path for c in client.status("agent")) == sorted([FORGED, NOT_UTF8])

        mnt = str(fs.mnt)
        assert _parse_lines(run_cli("status", mnt, "agent").stdout) == want
        assert _cli_bytes("status", "-z", mnt, "agent") == (branch / "status.z").read_bytes()
        records = [json.loads(line) for line in
                   run_cli("status", "--json", mnt, "agent").stdout.splitlines()]
        assert sorted(records, key=json.dumps) == sorted([
            {"change": "A", "path": "x\nD victim"},
            {"change": "A", "path": None, "path_b64": base64.b64encode(NOT_UTF8).decode()}],
            key=json.dumps)

        assert client.commit("agent", "step") == "step"
        assert sorted(client.diff("base", "step")) == want
        assert _parse_lines(run_cli("diff", mnt, "base", "step").stdout) == want
        records_z = _cli_bytes("diff", "-z", mnt, "base", "step").split(b"\0")
        assert records_z[-1] == b""
        assert sorted(Change.from_record_z(r) for r in records_z[:-1]) == want
        assert not any(c.path == "victim" for c in client.diff("base", "step"))


@needs_fuse
def test_any_names_give_a_status_that_parses_back_to_the_real_changes():
    with mounted() as fs, Client(fs.mnt) as client:
        _import_base(fs)
        counter = itertools.count()

        @hypothesis_settings(25)
        @given(st.sets(NAME_BYTES, min_size=1, max_size=6), st.booleans())
        def prop(names, delete_victim):
            name = f"p{next(counter)}"
            tree = client.branch(name, "base")
            try:
                want = []
                for raw in names:
                    if raw in (b"victim", b"keep"):
                        _write(tree, raw, b"changed")
                        want.append(Change(path_text(raw), "M"))
                    else:
                        _write(tree, raw, b"")
                        want.append(Change(path_text(raw), "A"))
                if delete_victim and b"victim" not in names:
                    os.unlink(tree / "victim")
                    want.append(Change("victim", "D"))
                want.sort()
                status = (fs.mnt / "branches" / name / "status").read_bytes().decode("ascii")
                assert _parse_lines(status) == want
                assert sorted(client.status(name)) == want
            finally:
                client.discard(name)

        prop()
