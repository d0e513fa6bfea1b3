"""Who may read the store (docs/security.md).

The store holds every committed file's bytes in its metadata database (where no file mode
guards them) and in its layers. The mount (``MNT/snapshots``, the branches' overlayfs trees) is the
only way to them that checks those modes, so everything the store creates is private to root:
the process creating it runs under a 077 umask, and ``make_private`` takes back whatever an
older version left readable. Three directories stay searchable (0711, no listing): the store
itself, ``branches/`` and ``branches/<name>/``, the path from ``/`` to each branch's tree, a
mount point that non-root code inside the branch works in. A branch's ``upper/`` carries the
tree root's own mode (overlayfs shows it as the tree's root), so what a user reaches through it
is what that user reaches through the tree, under the same modes.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("cascowfs.privacy")

STORE_UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PASSAGE_DIR = 0o711  # searchable, not listable: on the path to a branch's tree

# What a store's own directories and files should be, by path relative to the store; ``*``
# stands for every entry of that directory. Layers, staging, trash and uppers hold copies of
# users' trees, with those trees' own modes: their private parents keep them out of reach.
_MODES = (
    ("", PASSAGE_DIR),
    ("branches", PASSAGE_DIR),
    ("branches/*", PASSAGE_DIR),
    ("branches/*/work", PRIVATE_DIR),
    ("lock", PRIVATE_FILE),
    ("meta", PRIVATE_DIR),
    ("meta/*", PRIVATE_FILE),
    ("wal", PRIVATE_DIR),
    ("wal/*", PRIVATE_FILE),
    ("layers", PRIVATE_DIR),
    ("staging", PRIVATE_DIR),
    ("trash", PRIVATE_DIR),
    ("empty", PRIVATE_DIR),
)


def make_private(store: Path) -> int:
    """Set this process's umask to 077 and bring every store-owned path to its mode (above);
    return the umask before, which closing the store puts back.

    A store made by an older version had 0755 directories and 0644 files: one log line lists
    what was tightened."""
    umask_before = os.umask(STORE_UMASK)
    older = (store / "meta").exists()
    tightened = []
    for pattern, mode in _MODES:
        for path in _expand(store, pattern):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
                continue
            os.chmod(path, mode)
            tightened.append(f"{path.relative_to(store) if path != store else '.'} "
                             f"{stat.S_IMODE(st.st_mode):o}->{mode:o}")
    if older and tightened:
        log.warning("%s: made private to root (was readable by others): %s", store,
                    ", ".join(tightened))
    return umask_before


def _expand(store: Path, pattern: str) -> list[Path]:
    paths = [store]
    for part in filter(None, pattern.split("/")):
        if part == "*":
            paths = [p / name for p in paths if p.is_dir() for name in sorted(os.listdir(p))]
        else:
            paths = [p / part for p in paths]
    return paths


def make_passage(path: Path) -> None:
    """Let every user search (not list) ``path``: a directory on the way to a branch's tree."""
    os.chmod(path, PASSAGE_DIR)
