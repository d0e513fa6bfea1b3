"""Deliberate crashes at named WAL steps, for recovery tests.

Set ``CASCOWFS_CRASH_AT`` to a point name (or several, comma-separated) and the process that
reaches it kills itself with SIGKILL: no finally blocks, no atexit, exactly like ``kill -9``.
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
    "branch.applied",  # branch recorded, overlay not yet mounted
    "branch.switched",  # overlay mounted, FINALIZE not written
    "commit.prepared",
    "commit.staged",  # tree built from the upper, its objects not stored yet
    "commit.applied",  # snapshot and its (unbuilt) delta layer recorded, branch re-parented
    "commit.switched",  # FINALIZE not written
    "commit.written",  # the delta layer written into staging (after the commit, in the
    # background)
    "commit.placed",  # the delta layer moved into layers/, not yet recorded as built
    "rebase.prepared",
    "rebase.applied",  # new parent recorded; overlay still on the old layers
    "rebase.switched",
    "reset.prepared",
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


def _armed() -> frozenset[str]:
    raw = os.environ.get(ENV_VAR, "")
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


def crash_point(name: str) -> None:
    """Die here, by SIGKILL, if the environment names this point."""
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if name in _armed():
        os.kill(os.getpid(), signal.SIGKILL)
