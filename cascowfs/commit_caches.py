"""What a branch's last commit learned, kept for its next commit: bounded over all branches.
(``status`` keeps what its last call learned the same way, in a ``CommitCaches`` of its own.)

A commit keeps, per branch, the upper's listings and file entries it found unchanged for a
while (``scan.apply_upper``'s ``keep``) and the directories it encoded (``BuiltDirs``), so
that the branch's next commit neither reads nor encodes them again. That is the size of the
branch's upper: a branch that wrote a million files kept about 48 MB, and every live branch
kept its own for as long as it lived. So the caches of the branches that committed last are
kept, ``KEPT_ENTRIES`` entries in all (the last one always, however large); a branch whose
cache was dropped reads and encodes its upper again at its next commit, as a first commit
does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .scan import BuiltDirs

KEPT_ENTRIES = 1 << 20  # names, file entries and directory entries, over all branches


@dataclass(frozen=True, slots=True)
class CommitCache:
    stored: dict  # ``apply_upper``'s ``keep``: listings and file entries, by key
    built: BuiltDirs
    weight: int


def _weight(stored: dict, built: BuiltDirs) -> int:
    listed = sum(len(v[0]) if isinstance(v, tuple) else 1 for v in stored.values())
    return listed + sum(len(b.entries) for b in built.values())


class CommitCaches:
    """The last commit's caches of the branches that committed last."""

    def __init__(self, limit: int = KEPT_ENTRIES) -> None:
        self.limit = limit
        self.entries = 0
        self._lock = threading.Lock()
        self._by_branch: OrderedDict[str, CommitCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_branch)

    def of(self, name: str) -> CommitCache | None:
        with self._lock:
            return self._by_branch.get(name)

    def keep(self, name: str, stored: dict, built: BuiltDirs) -> None:
        cache = CommitCache(stored, built, _weight(stored, built))
        with self._lock:
            self._drop(name)
            self._by_branch[name] = cache
            self.entries += cache.weight
            while self.entries > self.limit and len(self._by_branch) > 1:
                self._drop(next(iter(self._by_branch)))

    def forget(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def _drop(self, name: str) -> None:
        cache = self._by_branch.pop(name, None)
        if cache is not None:
            self.entries -= cache.weight
