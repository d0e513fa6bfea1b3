"""The tree-search benchmark: cascowfs through its file interface, against its peers.

One run = one corpus (``tools/fetch_corpus.py``), on fresh loop-mounted filesystems
(``benchfs.scratch_fs``: a new journaled ext4 for every system, btrfs for the btrfs peer),
sections in this order, each optional:

1. **Single agent** (``--seq-ops``) and **MCTS mix** (``--ops``, ``--agents``), every system
   (``--systems cascowfs,overlay,btrfs,git,cp``), same corpus, same edit scripts: an agent picks
   a snapshot from its frontier, *branches* 2-4 copies, applies an agent-size edit to each (1-5
   small source edits, sometimes a new file, a delete, a rename, rarely a 256 KiB-1 MiB
   generated file; always <= 20 files, <= 1 MiB), *commits* the best one (sometimes two,
   sometimes none), *labels* the path above each new snapshot (MCTS back-propagation),
   *discards* every branch but, half the time, one that it *resets* onto its next pick, and
   *prunes* its oldest snapshots beyond six (``workload.py``; peers skip the labels and roll
   back by discard and branch).
   Decisions and edits come from a per-agent seeded RNG, so every system replays exactly the
   same script (git and cp, slow, replay a prefix: ``--slow-ops``). Agents are processes,
   started together. Reported: P50/P95/P99/max and throughput per op, drift over the run,
   storage used, machine load. ``--profile`` re-runs a mix with py-spy on the daemon.
2. **Read path** (unless ``--no-read-path``): inside a cascowfs branch of the imported tree
   against the plain ext4 copy it was imported from (plus a bare overlay on that copy and the
   FUSE snapshot view): stat walk (``find -printf``), read every file (``find | xargs cat``),
   ``grep -r``, ``python -m compileall``; cold (drop_caches) and warm.
3. **Growth** (``--growth N`` chain: one lineage of N commits; ``--growth-wide N``: N snapshots
   each from base): store size against one copy, sampled along the way, cascowfs and btrfs.
4. **Mount** (``--mount-snapshots S --mount-branches B``): mount time of a store holding S
   snapshots and B live branches, after a clean unmount and after kill -9 (WAL replay); first,
   the latency of ``find`` queries over those S labelled snapshots.

cascowfs is driven only through the files of a mounted store: ``cascowfs mount STORE MNT
--background``, ``echo "branch NAME ID" > MNT/ctl``, work in ``MNT/branches/NAME/tree``,
``echo "ID reward=..." > MNT/branches/NAME/commit``, ``rmdir MNT/branches/NAME``,
``rmdir MNT/snapshots/ID``, ``cascowfs umount MNT --branches``.

The parts live in tools/bench/ (see its ``__init__``); ``tools/bench_mcts.py`` runs this.
Examples (results as JSON; ``tools/bench_report.py`` turns them into docs/benchmarks.md)::

    .venv/bin/python tools/bench_mcts.py --corpus django --ops 10000 --seq-ops 1000 \
        --slow-ops 400 --growth 1000 --growth-wide 1000 --mount-snapshots 10000 --profile \
        --out bench-results/django.json
    .venv/bin/python tools/bench_mcts.py --corpus synthetic --ops 40 --agents 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tools import benchfs, fetch_corpus

from .host import REPO, log
from .sections import bench_growth, bench_mount, bench_read_path, bench_system
from .snapshot_read import bench_snapshot_read
from .systems import SYSTEMS, CascowSystem
from .workload import corpus_files


def product_version() -> dict:
    """Which cascowfs was measured: the repository HEAD, whether cascowfs/ differs from it, and
    a digest of the package's sources (the engine changes while benchmarks run)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((REPO / "cascowfs").rglob("*.py")):
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "head_subject": git("log", "-1", "--format=%s")[:100],
        "cascowfs_dirty": bool(git("status", "--porcelain", "--", "cascowfs")),
        "sources_sha256": h.hexdigest()[:12],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="django", help="django | linux | synthetic")
    ap.add_argument("--synthetic-files", type=int, default=200)
    ap.add_argument("--systems", default="cascowfs,overlay,btrfs,git,cp")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument(
        "--ops",
        type=int,
        default=2000,
        help="ops of the concurrent MCTS mix per system (all agents; 0: skip)",
    )
    ap.add_argument(
        "--seq-ops",
        type=int,
        default=500,
        help="ops of the single-agent run (per-op target lines); slow peers do 1/4 "
        "(at most --slow-ops)",
    )
    ap.add_argument(
        "--slow-ops",
        type=int,
        default=200,
        help="ops for the slow peers (git, cp): a prefix of the same script",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-read-path", action="store_true")
    ap.add_argument("--read-repeat", type=int, default=3)
    ap.add_argument("--compile-repeat", type=int, default=1)
    ap.add_argument("--no-snapshot-read", action="store_true")
    ap.add_argument("--snapshot-read-repeat", type=int, default=5)
    ap.add_argument(
        "--growth",
        type=int,
        default=0,
        help="snapshots in the chain growth run: one lineage (0: skip)",
    )
    ap.add_argument(
        "--growth-wide",
        type=int,
        default=0,
        help="snapshots in the wide growth run: each from base (0: skip)",
    )
    ap.add_argument("--growth-systems", default="cascowfs,btrfs")
    ap.add_argument(
        "--growth-timeout",
        type=float,
        default=0,
        help="stop a growth run after this many seconds (0: never)",
    )
    ap.add_argument("--mount-snapshots", type=int, default=0, help="0: skip the mount test")
    ap.add_argument("--mount-branches", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="py-spy the daemon in a second mix")
    ap.add_argument(
        "--profile-agents", type=int, default=0, help="agents of that mix (default: --agents)"
    )
    ap.add_argument(
        "--ctl-open",
        choices=("per-agent", "per-command"),
        default="per-agent",
        help="cascowfs agents keep one open of ctl, as cascowfs.client does, or "
        "open it for every command, as `echo CMD > ctl` in a shell does",
    )
    ap.add_argument("--scratch-gb", type=int, default=24, help="size of each sparse scratch fs")
    ap.add_argument("--out", default=None, help="result JSON (default bench-results/...)")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        log("needs root (loop devices, mounts)")
        return 2
    CascowSystem.ctl_per_agent = args.ctl_open == "per-agent"
    if args.corpus.startswith("synthetic"):
        tree = fetch_corpus.make_synthetic(files=args.synthetic_files)
        cname = f"synthetic-{args.synthetic_files}"
    else:
        tree = fetch_corpus.fetch(args.corpus)
        cname = "django" if args.corpus in ("django", "M", "medium") else "linux"
    cinfo = fetch_corpus.info(cname)
    if args.out is None:
        args.out = str(REPO / "bench-results" / f"{cname}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    files = corpus_files(tree)
    log(
        f"corpus {cname}: {cinfo['entries']} entries, {cinfo['bytes'] / 1e6:.1f} MB, "
        f"{len(files)} editable files"
    )
    result: dict[str, Any] = {
        "corpus": cinfo,
        "machine": benchfs.machine(),
        # the command as run from the repository (also when started with python -m)
        "argv": ["tools/bench_mcts.py"] + (sys.argv[1:] if argv is None else list(argv)),
        "config": vars(args),
        "systems": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "product": product_version(),
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(result) + "\n")

    for name in [s for s in args.systems.split(",") if s]:
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name}; known: {', '.join(SYSTEMS)}")
        try:
            result["systems"][name] = bench_system(SYSTEMS[name], tree, args, files, cinfo)
        except Exception as exc:  # noqa: BLE001
            log(f"{name}: FAILED: {exc}")
            result["systems"][name] = {
                "system": name,
                "label": SYSTEMS[name].label,
                "failed": f"{exc}\n{traceback.format_exc()}",
            }
        save()
    if not args.no_read_path:
        result["read_path"] = bench_read_path(tree, args, cinfo)
        save()
    if not args.no_snapshot_read:
        result["snapshot_read"] = bench_snapshot_read(tree, args)
        save()
    if args.growth:
        result["growth"] = bench_growth(tree, args, files, cinfo)
        save()
    if args.mount_snapshots:
        result["mount"] = bench_mount(tree, args, files)
        save()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    leaks = benchfs.leaks()
    if leaks:
        log(f"LEAKS: {leaks}")
    log(f"results in {args.out}")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
