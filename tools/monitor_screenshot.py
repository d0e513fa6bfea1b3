"""The README's screenshot of the monitor, taken on the benchmark's own workload.

Mounts a store of the django corpus (``tools/fetch_corpus.py``; a synthetic tree where that
corpus is absent), runs the agents of the benchmark's MCTS mix against it (``tools/bench/
workload.py``: branch, edit, commit with a reward, back-propagate ``visits`` and ``value``
labels, reset, discard, prune) while ``cascowfs monitor`` serves the page, and takes the
screenshot in Debian's headless Chromium (Selenium, as ``tests/test_monitor_browser.py``
drives it) while the mix still runs: once the tree holds ``--nodes`` snapshots and branches
are live. The agents keep ``--frontier`` snapshots each before they prune, so that the tree
the page draws has a few hundred nodes.

Writes ``docs/img/monitor.png`` only with ``CASCOWFS_UPDATE_SCREENSHOTS=1`` (else ``--out``).
Everything it mounts is unmounted in ``finally``. As root, from the repository::

    CASCOWFS_UPDATE_SCREENSHOTS=1 .venv/bin/python tools/monitor_screenshot.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools import fetch_corpus
from tools.bench.host import REPO, log
from tools.bench.systems import CascowSystem
from tools.bench.workload import corpus_files, run_mix

sys.path.insert(0, str(REPO / "tests"))  # the browser helpers the monitor's tests use
from support.browser import chromium, chromium_unavailable, monitor  # noqa: E402

SCREENSHOT = REPO / "docs" / "img" / "monitor.png"
PAGE_SECONDS = 120  # the page shows enough of the search within this, on a loaded machine


def corpus_tree(scratch: Path) -> Path:
    """The django corpus if fetched already (no download here), else a synthetic tree."""
    if (fetch_corpus.corpus_dir("django") / "info.json").exists():
        return fetch_corpus.fetch("django")
    log("django corpus absent (tools/fetch_corpus.py django): a synthetic tree instead")
    return fetch_corpus.make_synthetic(scratch / "synthetic", files=2000)


def shows_search(driver, nodes: int) -> bool:
    """The page counts ``nodes`` snapshots or more and two live branches or more."""

    def count(element_id: str) -> int:
        text = driver.find_element("id", element_id).text
        return int(text) if text.isdigit() else 0

    return count("count-snapshots") >= nodes and count("count-branches") >= 2


def take(out: Path, *, ops: int, agents: int, nodes: int, frontier: int, seed: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="cascowfs-screenshot-"))
    (scratch / "system").mkdir()
    system = CascowSystem(scratch / "system")
    mix: dict = {}
    runner: threading.Thread | None = None
    try:
        tree = corpus_tree(scratch)
        system.setup(tree)  # mounts and imports the tree as snapshot "base"
        files = corpus_files(tree)
        with monitor(system.mnt) as mon, chromium() as driver:
            runner = threading.Thread(
                target=lambda: mix.update(
                    run_mix(system, agents, ops, seed, files, frontier_max=frontier)
                ),
                name="mcts-mix",
            )
            runner.start()
            driver.get(mon.url)
            deadline = time.monotonic() + PAGE_SECONDS
            while not shows_search(driver, nodes):
                if not runner.is_alive() or time.monotonic() > deadline:
                    raise SystemExit(
                        f"the page never showed {nodes} snapshots and live branches while the "
                        f"mix ran (raise --ops or lower --nodes)"
                    )
                time.sleep(0.2)
            time.sleep(1.5)  # the latency chart and operations catch up with the counts
            png = driver.get_screenshot_as_png()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
        log(f"screenshot in {out}; mix: {mix.get('ops')} ops, errors {mix.get('error_count')}")
    finally:
        if runner is not None:
            runner.join()  # the agents finish their ops before the store goes
        system.close()  # cascowfs umount --branches
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=4000, help="ops of the mix (all agents)")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=200, help="snapshots shown before the picture")
    ap.add_argument("--frontier", type=int, default=60, help="snapshots an agent keeps")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "monitor.png")
    args = ap.parse_args(argv)
    if (why := chromium_unavailable()) is not None:
        raise SystemExit(why)
    update = os.environ.get("CASCOWFS_UPDATE_SCREENSHOTS") == "1"
    take(
        SCREENSHOT if update else args.out,
        ops=args.ops,
        agents=args.agents,
        nodes=args.nodes,
        frontier=args.frontier,
        seed=args.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
