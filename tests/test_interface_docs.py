"""The MCTS loops of docs/interface.md, run as written on a real mount (Python and shell).

They use ``label`` and ``find``, the episode store's ``ctl`` commands: on a daemon that does
not know them yet the runs are skipped, and only the blocks' syntax is checked.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from cascowfs import Client, InvalidArgumentError
from fusehelpers import REPO, Cascow, mounted, needs_fuse

DOC = REPO / "docs" / "interface.md"
SIMULATIONS = 20  # both loops run 20 simulations as written


def _block(marker: str) -> str:
    """The fenced code block right after ``<!-- marker: ... -->`` in docs/interface.md."""
    text = DOC.read_text()
    found = re.search(rf"<!-- {marker}:[^>]*-->\n```\w+\n(.*?)\n```\n", text, re.S)
    assert found, f"no block marked {marker} in {DOC}"
    return found.group(1)


def test_the_loops_in_the_docs_parse():
    python, shell = _block("mcts-python"), _block("mcts-shell")
    compile(python, "mcts-python", "exec")
    subprocess.run(["bash", "-n"], input=shell, text=True, check=True)
    assert "fs.label(" in python and "ctl label" in shell


def _populate(fs: Cascow) -> None:
    (fs.base / "repo").mkdir()
    (fs.base / "repo" / "README").write_text("the repository before any action\n")


def _skip_without_the_episode_verbs(client: Client) -> None:
    try:
        client.command("label", "root", "probe=1")
        client.command("label", "root", "probe=")
        client.command("find", "visits>0", "--parent", "root")
    except InvalidArgumentError as exc:
        if "unknown command" in exc.message:
            pytest.skip(f"this daemon has no label/find yet ({exc.message})")
        raise


def _check_search_tree(client: Client) -> None:
    """What a finished search leaves: no branches, the root visited once per simulation, every
    node committed with its step's labels, no poor leaf."""
    assert client.branches() == []
    assert int(client.snapshot("root").labels["visits"]) == SIMULATIONS
    nodes = [s for s in client.snapshots() if s != "root"]
    assert nodes
    parents = {client.snapshot(n).parent for n in nodes}
    for node in nodes:
        seen = client.snapshot(node).labels
        assert seen["action"].startswith("edit-") and int(seen["visits"]) >= 1, (node, seen)
        assert float(seen["reward"]) >= 0.2 or node in parents, (node, seen)
        tree = client.snapshot_path(node)
        assert seen["action"] in (tree / "attempts.log").read_text().split()


@needs_fuse
def test_the_python_loop_runs_as_written(capsys):
    with mounted(populate=_populate) as fs:
        client = Client(fs.mnt)
        client.import_tree(fs.base / "repo", "root")
        _skip_without_the_episode_verbs(client)
        code = _block("mcts-python").replace('"/mnt/cascowfs"', repr(str(fs.mnt)))
        exec(compile(code, "mcts-python", "exec"), {"__name__": "mcts"})
        assert "most visited first step:" in capsys.readouterr().out
        _check_search_tree(client)


@needs_fuse
def test_the_shell_loop_runs_as_written():
    with mounted(populate=_populate) as fs:
        client = Client(fs.mnt)
        client.import_tree(fs.base / "repo", "root")
        _skip_without_the_episode_verbs(client)
        fs.sh(_block("mcts-shell").replace("/mnt/cascowfs", str(fs.mnt)))
        _check_search_tree(client)
        for node in client.snapshots():
            seen = client.snapshot(node).labels
            if "mean" in seen:
                assert abs(float(seen["mean"]) - float(seen["value"]) / int(seen["visits"])) \
                    < 0.01, (node, seen)

