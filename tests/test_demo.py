"""tools/demo.sh, the README's first command, on this machine: it installs, mounts a store,
runs an agent's step with file calls alone, ends, and leaves nothing mounted or running."""

from __future__ import annotations

import subprocess

import pytest

from fusehelpers import needs_fuse
from support.mounts import abort_fuse, force_unmount_below, mounts_below
from support.processes import REPO, processes_mentioning

pytestmark = needs_fuse

TIMEOUT = 240  # seconds; it takes ~20 (install included): a bound for a stuck daemon only


def test_the_demo_runs_to_its_end_and_leaves_nothing_behind(tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    demo = subprocess.Popen(["bash", "tools/demo.sh", str(store), str(mnt)], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = demo.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        abort_fuse(mnt)  # a daemon stuck on its own mount: what ends the demo's waits
        out, _ = demo.communicate()
        pytest.fail(f"the demo did not end within {TIMEOUT} s:\n{out[-3000:]}")
    finally:
        left = mounts_below(tmp_path)
        force_unmount_below(tmp_path)
    assert demo.returncode == 0, out[-3000:]
    assert "snapshot == branch" in out and "demo finished" in out, out[-3000:]
    assert left == [], left
    assert processes_mentioning(str(store)) == []
