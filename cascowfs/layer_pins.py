"""Layers held by kernel views of snapshots, kept out of the trash while held.

A snapshot's kernel view (``fuse/kernel_views.py``) is a read-only overlay stacked on the
layers of the snapshot's chain at the time it was mounted. A merge may replace that chain
meanwhile, and the layers it drops would go to the trash and be deleted under the view. A
dropped layer that a view holds stays in ``layers/`` instead, unrecorded, until the last view
holding it lets go; then it goes to the trash like any other.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable


class LayerPins:
    """Counts of views per layer id, and the dropped layers waiting for their views."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self._waiting: set[str] = set()  # dropped by their chains, still held by a view

    def hold(self, layers: Iterable[str]) -> None:
        with self._lock:
            self._held.update(layers)

    def release(self, layers: Iterable[str]) -> list[str]:
        """Let go of ``layers``; returns the dropped ones no view holds any more (their
        directories can go now)."""
        free = []
        with self._lock:
            for lid in layers:
                self._held[lid] -= 1
                if self._held[lid] <= 0:
                    del self._held[lid]
                    if lid in self._waiting:
                        self._waiting.discard(lid)
                        free.append(lid)
        return free

    def unheld(self, dropped: Iterable[str]) -> list[str]:
        """Of the layers an operation dropped, those no view holds (their directories can go
        now); the others wait for ``release``."""
        free = []
        with self._lock:
            for lid in dropped:
                if self._held[lid] > 0:
                    self._waiting.add(lid)
                else:
                    self._held.pop(lid, None)
                    free.append(lid)
        return free

    def keeps(self, lid: str) -> bool:
        """Is layer ``lid`` held, or waiting for its views (gc leaves its directory alone)?"""
        with self._lock:
            return self._held[lid] > 0 or lid in self._waiting
