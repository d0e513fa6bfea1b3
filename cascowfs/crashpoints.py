"""Deliberate crashes at named WAL steps, for recovery tests.

Start a process with ``CASCOWFS_CRASH_AT`` set to a point name (or several, comma-separated)
and it kills itself with SIGKILL when it reaches one: no finally blocks, no atexit, exactly
like ``kill -9``.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "CASCOWFS_CRASH_AT"

# <operation>.<step>: every step of every multi-step operation, in protocol order.
CRASH_POINTS: tuple[str, ...] = (
    "import.prepared",  # WAL PREPARE written, nothing else
    "import.sealing",  # chunks and trees written (unreferenced), mkfs.erofs may still be
    # writing the staged layer's image
    "import.chunks",  # chunks and trees written (unreferenced), staging layer filled
    "import.applied",  # layer placed, LMDB transaction committed
    "import.switched",  # FINALIZE not written
    "branch.prepared",
    "branch.mounted",  # the branch's directories made, its overlay mounted at its tree, the
    # branch not recorded
    "branch.applied",  # branch recorded, FINALIZE not written
    "branch.switched",  # overlay mounted, FINALIZE not written
    "commit.prepared",
    "commit.staged",  # tree built from the upper, its objects not stored yet
    "commit.applied",  # snapshot and its (unbuilt) delta layer recorded, branch re-parented
    "commit.switched",  # FINALIZE not written
    "commit.written",  # the delta layer written into staging (after the commit, in the
    # background)
    "commit.placed",  # the delta layer moved into layers/, not yet recorded as built
    "rebase.prepared",
    "rebase.mounted",  # the branch's upper and work swapped for fresh ones, its new overlay
    # made but attached nowhere; its old overlay still mounted over the old ones
    "rebase.applied",  # new parent recorded; overlay still on the old layers
    "rebase.switched",
    "reset.prepared",
    "reset.mounted",  # as rebase.mounted
    "reset.applied",  # new parent recorded; overlay still on the old layers and old upper
    "reset.switched",
    "label.logged",  # WAL PREPARE flushed (the label is durable), LMDB transaction not queued
    "label.applied",  # the labels changed in LMDB; FINALIZE not written
    "discard.prepared",
    "discard.applied",  # branch record gone; overlay still mounted
    "discard.switched",
    "prune.prepared",
    "prune.applied",  # snapshot record gone; layers not yet removed
    "prune.switched",
    "flatten.prepared",
    "flatten.staged",  # new layer (merged or full) built in staging
    "flatten.applied",  # layer placed, chain swapped
    "pull.prepared",
    "pull.fetched",  # the pulled objects stored (unreferenced), nothing recorded
    "pull.applied",  # snapshot and its unbuilt layer recorded, FINALIZE not written
    "collect.marked",  # garbage listed, nothing deleted yet
    "collect.swept",  # the first slice of the garbage deleted, the rest not
    "upgrade.moved",  # format 8: one branch's upper moved into its private directory
)


_KNOWN = frozenset(CRASH_POINTS)
# Read once, at import: a process is armed from its start (the tests start one per point),
# and operations pass several points each, where reading os.environ costs ~1.5 us a time.
_ARMED = frozenset(p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip())


def crash_point(name: str) -> None:
    """Die here, by SIGKILL, if the process started with this point armed."""
    if name not in _KNOWN:
        raise ValueError(f"unknown crash point {name!r}")
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
