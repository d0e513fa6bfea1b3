"""Tuning: the figures a StateManager runs by, fixed for the life of one open store.

The defaults are what the daemon uses. Tests pass other values to ``StateManager.open`` (a
collection that starts at once, sweeps of two objects, a low merge-all threshold) to reach in
a few operations the states a store reaches in thousands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import durability, images


@dataclass(frozen=True)
class Tuning:
    checkpoint_every: int = 1024  # WAL records between checkpoints
    # A collection cycle starts this long after garbage appeared (a prune, a discard, a failed
    # op), so that one cycle takes what a burst of operations dropped.
    collect_after_seconds: float = 5.0
    sweep_slice: int = 300  # object deletions per transaction of a collection's sweep
    # Delta layers merge in groups of this many equal spans: each change is rewritten log_F(n)
    # times over a lineage of n commits, and a chain is at most (F - 1) log_F(n) + 1 layers
    # deep. vs 4: 132 MB instead of 158 MB of layers for 1,000 commits of linux-source.
    merge_fan_in: int = 8
    # A chain deeper than this (left by merges that fell behind fast lineages) has all its
    # delta layers merged into one at its next merge: the counter alone never shortens it.
    merge_all_above: int = 64
    flatten_tries: int = 5  # a flatten racing background merges of the same chain starts over
    layer_sync_seconds: float = durability.LAYER_SYNC_SECONDS  # between background syncfs calls
    # How layers are stored and mounted (``images.py``): "auto" probes at open; "erofs",
    # "loop" or "dir" force one (CI runs the suite with "dir" too).
    layer_images: str = field(
        default_factory=lambda: os.environ.get("CASCOWFS_LAYER_IMAGES", images.AUTO)
    )


DEFAULT_TUNING = Tuning()  # the figures above, shared by every open that passes none
