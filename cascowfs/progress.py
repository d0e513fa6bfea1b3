"""Progress bars for work that can take more than a second (import, fsck, gc).

tqdm draws on stderr and only when asked (the CLI asks when stderr is a terminal or
``--progress`` is given); the engine itself just calls the returned function with increments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(
    enabled: bool, total: int, desc: str, unit: str = "B"
) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    bar = tqdm(
        total=total or None,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        file=sys.stderr,
        mininterval=0.2,
        leave=True,
    )
    try:
        yield bar.update
    finally:
        bar.close()
