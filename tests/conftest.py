"""Fixtures and the session-end leak check for the tests; the helpers live in tests/support/.

Other test modules import helpers from here or from their support module (``from conftest
import dir_view`` and ``from support.views import dir_view`` are the same); every name imported
from conftest below stays importable from it.

Fixtures
    ``store``           path of a fresh (not yet opened) store directory under ``tmp_path``
    ``sm``              a ``StateManager`` opened on ``store``; closed in ``finally`` with
                        ``unmount_branches=True``, after which no mount may remain under it
    ``content``         a ``ContentStore`` over a fresh LMDB environment (no mounts)
    ``track_store``     ``track_store(path) -> path`` for a store the test opens and kills
                        itself: the store joins the leak check, and whatever is still mounted
                        below it is lazily unmounted when the test ends, however it ends

Tiers: every test is marked ``unit`` (no root, no mount), or with what it needs of the machine:
``engine`` (real overlayfs), ``loop`` (loop devices), ``fuse`` (a real FUSE daemon); see
support/skips.py. ``pytest_collection_modifyitems`` gives each test its tiers from its marks
and fixtures and skips those this machine cannot run; ``slow`` tests run only with
``--runslow``.

Session end: a hook fails the run if an overlay/FUSE mount made by this run, a store staging
directory under the run's temp dir, a child process or a StateManager background thread is
left behind (and then cleans the leaked mounts up, so one bad test does not poison the VM).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cascowfs import overlay
from support.loopdev import loop_ext4, make_ext4_image, mounted_image
from support.mounts import Mount, all_mounts, force_unmount_below, mounts_below
from support.processes import (REPO, alive, child_env, descendant_processes,
                               other_pytest_running, run_child)
from support.properties import EXAMPLES_SCALE, hypothesis_settings
from support.skips import (TIER_UNAVAILABLE, loop_unavailable, needs_loop, needs_overlay,
                           overlay_unavailable, tiers_of)
from support.stores import STORES, assert_fsck_clean, check_live, open_store, register_store
from support.views import (OVERLAY_PREFIX, Node, assert_same_view, assert_status,
                           describe_view_diff, dir_view, expected_status, snapshot_view)

__all__ = ["EXAMPLES_SCALE", "OVERLAY_PREFIX", "REPO", "Mount", "Node", "alive", "all_mounts",
           "assert_fsck_clean", "assert_same_view", "assert_status", "check_live", "child_env",
           "descendant_processes", "describe_view_diff", "dir_view", "expected_status",
           "force_unmount_below", "hypothesis_settings", "loop_ext4", "loop_unavailable",
           "make_ext4_image", "mounted_image", "mounts_below", "needs_loop", "needs_overlay",
           "open_store", "overlay_unavailable", "register_store", "run_child", "snapshot_view"]

_STORES = STORES  # the old name of the leak check's list of stores


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (soaks, big corpora)")


@pytest.hookimpl(tryfirst=True)  # before -m selects by the tier marks added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow")
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        for tier in sorted(tiers_of(marks, set(getattr(item, "fixturenames", ())))):
            if tier not in marks:
                item.add_marker(tier)
            why = TIER_UNAVAILABLE[tier]() if tier in TIER_UNAVAILABLE else None
            if why:
                item.add_marker(pytest.mark.skip(reason=why))
        if "slow" in marks and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    if overlay_unavailable():
        pytest.skip(overlay_unavailable())
    return tmp_path / "store"


@pytest.fixture
def db(tmp_path: Path):
    """A fresh LMDB environment, the store's databases in it (no mounts needed)."""
    from cascowfs.metadb import MetaDB

    meta = MetaDB(tmp_path / "meta")
    try:
        yield meta
    finally:
        meta.close()


@pytest.fixture
def content(db):
    """A content store over a fresh LMDB environment (no mounts needed)."""
    from cascowfs.cas import ContentStore

    return ContentStore(db)


@pytest.fixture
def sm(store: Path):
    with open_store(store) as manager:
        yield manager


@pytest.fixture
def track_store() -> Iterator[Callable[[Path], Path]]:
    tracked: list[Path] = []

    def track(path: Path) -> Path:
        tracked.append(register_store(path))
        return tracked[-1]

    yield track
    for path in reversed(tracked):
        force_unmount_below(path)


# ----------------------------------------------------------------------------------------
# leak check at the end of the session
# ----------------------------------------------------------------------------------------
_START_MOUNTS: set[int] = set()


def pytest_sessionstart(session) -> None:
    _START_MOUNTS.update(m.mount_id for m in all_mounts())


def pytest_sessionfinish(session, exitstatus) -> None:
    problems: list[str] = []
    warnings: list[str] = []
    basetemp = None
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and getattr(factory, "_basetemp", None) is not None:
        basetemp = str(factory.getbasetemp())

    # 1. mounts made by this run
    new = [m for m in all_mounts() if m.mount_id not in _START_MOUNTS
           and (m.fstype in ("overlay", "erofs") or m.fstype.startswith("fuse")
                or m.source == overlay.PLACEHOLDER_SOURCE)]  # an unmounted branch's tmpfs
    stores = [str(s) for s in STORES]
    ours = [m for m in new if (basetemp and m.target.startswith(basetemp + "/"))
            or any(m.target.startswith(s + "/") for s in stores)]
    # elsewhere: fusehelpers mounts under mkdtemp(); mounts outside the temp dir (a
    # benchmark's loop device under /var/tmp, say) are not a test run's doing
    tmp = tempfile.gettempdir().rstrip("/") + "/"
    others = [m for m in new if m not in ours and m.target.startswith(tmp)]
    if ours:
        problems.append("mounts left: " + ", ".join(f"{m.target} ({m.fstype})" for m in ours))
    if others:
        msg = "new mounts elsewhere: " + ", ".join(f"{m.target} ({m.fstype})" for m in others)
        # another pytest (a colleague's run on this VM) may own them: only then a warning
        (warnings if other_pytest_running() else problems).append(msg)

    # 2. staging directories of stores opened through these helpers, or under the run's tmp
    candidates = set(STORES)
    if basetemp and os.path.isdir(basetemp):
        for dirpath, dirnames, _ in os.walk(basetemp):
            if "staging" in dirnames and "wal" in dirnames:
                candidates.add(Path(dirpath))
            dirnames[:] = [d for d in dirnames if d not in ("layers", "branches", "trash", "meta")]
    for s in sorted(candidates):
        staging = s / "staging"
        if staging.is_dir():
            left = os.listdir(staging)
            if left:
                problems.append(f"staging directories left in {s}: {left}")

    # 3. child processes and StateManager threads
    kids = descendant_processes(os.getpid())
    if kids:
        problems.append("child processes left: " + "; ".join(f"{p} [{s}] {c[:120]}" for p, s, c in kids))
    threads = [t.name for t in threading.enumerate() if t.name.startswith("cascowfs")]
    if threads:
        problems.append(f"StateManager threads still running (a store was not closed): {threads}")

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for w in warnings:
        if reporter:
            reporter.write_line(f"LEAK CHECK WARNING: {w}", yellow=True)
    if problems:
        for p in problems:
            if reporter:
                reporter.write_line(f"LEAK: {p}", red=True, bold=True)
            else:
                print(f"LEAK: {p}", file=sys.stderr)
        for m in ours:
            subprocess.run(["umount", "-l", m.target], capture_output=True)
        if session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
