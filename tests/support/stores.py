"""Stores opened by tests, and the store invariants checked on them.

``open_store(path, **kw)``   an open StateManager, closed with ``unmount_branches=True`` in
                             ``finally``; then no mount may remain under the store
``register_store(path)``     adds a store the test opens itself to the session-end leak check
``assert_fsck_clean(store, deep=True)``  the invariants of docs/architecture.md (via
                             ``cascowfs.fsck``) on a closed store (fsck takes the store lock);
                             close it with ``sm.close()``, not ``unmount_branches=True``:
                             invariant 4 wants every live branch mounted
``check_live(sm, deep=False)``  the same on an open store, under its operation lock
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from support.mounts import force_unmount_below

if TYPE_CHECKING:
    from cascowfs.state import StateManager

# Every store opened through these helpers: the session-end leak check looks for mounts and
# staging directories left in them.
STORES: list[Path] = []


def register_store(path: Path) -> Path:
    """Put ``path`` on the leak check's list of stores; returns it."""
    path = Path(path)
    STORES.append(path)
    return path


@contextlib.contextmanager
def open_store(path: Path, **kw) -> Iterator[StateManager]:
    """An open StateManager; closed with ``unmount_branches=True`` in ``finally``, and then no
    mount may remain under the store (if one does, it is removed and the test fails)."""
    from cascowfs.state import StateManager

    path = register_store(path)
    sm = StateManager.open(path, **kw)
    try:
        yield sm
    finally:
        try:
            sm.close(unmount_branches=True)
        finally:
            left = force_unmount_below(path)
            assert not left, f"close(unmount_branches=True) left mounts: {left}"


def assert_fsck_clean(store: Path, *, deep: bool = True) -> None:
    """All five invariants hold on a closed store (branches must still be mounted)."""
    from cascowfs.fsck import fsck_store

    report = fsck_store(store, deep=deep)
    assert report.ok, "fsck found problems:\n  " + "\n  ".join(report.problems)


def check_live(sm, *, deep: bool = False) -> None:
    """fsck's checks on an open store, with no state change running meanwhile."""
    from cascowfs import fsck

    trash = str(sm.store / "trash") + "/"
    deadline = time.monotonic() + 5
    while True:
        with sm.quiesced():
            report = fsck.check(sm, deep=deep)
        # Since "discard detaches the overlay in the background", a discarded branch's mount
        # moves into trash/ with its directory and the background thread detaches it a moment
        # later: by design, so wait for that (briefly), and only for that.
        pending = [p for p in report.problems if p.startswith("invariant 4: mount at " + trash)]
        if not pending or len(pending) < len(report.problems) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert report.ok, "fsck found problems:\n  " + "\n  ".join(report.problems)
