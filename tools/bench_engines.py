#!/usr/bin/env python3
"""This engine against an earlier one, on this machine, in one run: the import, the single
agent and the 4-agent MCTS mix of a corpus, measured by the earlier revision's own harness
(``tools/bench_mcts.py`` as it was then, so both engines meet the same workload), runs of the
two engines interleaved in alternating order. A figure measured on another machine or day
says little about a regression; this says whether there is one. Needs root, like the
benchmark. Usage:

    .venv/bin/python tools/bench_engines.py BASELINE_REV [--corpus linux] [--pairs 3] \\
        [--ops 10000] [--seq-ops 500] [--out bench-results/engines-linux.json]

BASELINE_REV's ``cascowfs/`` and ``tools/`` are unpacked into a temporary directory (removed
afterwards); each run imports the engine it measures through ``PYTHONPATH``. The result file
keeps every run's percentiles (ms) and the medians over the runs of each engine; the table
printed at the end is what docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tools import benchfs
from tools.bench.mcts import product_version
from tools.bench.stats import summarize

REPO = Path(__file__).resolve().parent.parent
OPS = ("branch", "commit", "discard", "prune")


def summary(result: dict) -> dict:
    """One run's figures: import rate, and P50/P95/P99 (ms) of every op, alone and in the mix,
    as the benchmark's own summaries rank them."""
    run = result["systems"]["cascowfs"]
    out: dict = {"import_mb_s": run.get("import_mb_s"), "mix_wall_s": run["mix"]["wall_s"]}
    for section in ("seq", "mix"):
        out[section] = {
            op: {q: round(1000 * summarize(lat)[q], 2) for q in ("p50", "p95", "p99")}
            for op, lat in run[section]["latencies"].items()
            if lat
        }
    return out


def unpack_revision(rev: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "cascowfs", "tools"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "bench-data").symlink_to(REPO / "bench-data")


def revision(rev: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def run_once(harness: Path, engine: Path, args: argparse.Namespace, out: Path) -> dict:
    benchfs.drop_caches()
    time.sleep(3)
    cmd = [sys.executable, str(harness / "tools" / "bench_mcts.py"), "--corpus", args.corpus,
           "--systems", "cascowfs", "--ops", str(args.ops), "--seq-ops", str(args.seq_ops),
           "--no-read-path", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(engine))
    subprocess.run(cmd, cwd=harness, env=env, check=True, stdin=subprocess.DEVNULL)
    return summary(json.loads(out.read_text()))


def medians(runs: list[dict]) -> dict:
    med: dict = {
        "import_mb_s": statistics.median(r["import_mb_s"] for r in runs),
        "mix_wall_s": statistics.median(r["mix_wall_s"] for r in runs),
    }
    for section in ("seq", "mix"):
        med[section] = {
            op: {
                q: statistics.median(r[section][op][q] for r in runs) for q in runs[0][section][op]
            }
            for op in set.intersection(*(set(r[section]) for r in runs))
        }
    return med


def table(result: dict) -> str:
    base, now = result["baseline"], result["current"]
    b, n = base["median"], now["median"]
    rows = [
        f"| {result['corpus']} ({result['pairs']} runs each, medians) "
        f"| {base['revision']} | {now['revision']} |",
        "|---|---|---|",
        f"| import | {b['import_mb_s']:.0f} MB/s | {n['import_mb_s']:.0f} MB/s |",
    ]
    for section, shown in (("seq", "single agent"), ("mix", "4-agent mix")):
        for op in (op for op in OPS if op in b[section] and op in n[section]):
            x, y = b[section][op], n[section][op]
            rows.append(
                f"| {shown}, {op} P50 / P95 / P99 "
                f"| {x['p50']:.1f} / {x['p95']:.1f} / {x['p99']:.1f} ms "
                f"| {y['p50']:.1f} / {y['p95']:.1f} / {y['p99']:.1f} ms |"
            )
    rows.append(f"| mix wall time | {b['mix_wall_s']:.1f} s | {n['mix_wall_s']:.1f} s |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline", help="the earlier revision (its engine and its harness)")
    ap.add_argument("--corpus", default="linux")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--ops", type=int, default=10000)
    ap.add_argument("--seq-ops", type=int, default=500)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_engines: needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    out = args.out or REPO / "bench-results" / f"engines-{args.corpus}.json"
    work = Path(tempfile.mkdtemp(prefix="cascowfs-engines-"))
    try:
        harness = work / "baseline"
        unpack_revision(args.baseline, harness)
        engines = {"baseline": harness, "current": REPO}
        runs: dict[str, list[dict]] = {"baseline": [], "current": []}
        for pair in range(args.pairs):
            order = ("baseline", "current") if pair % 2 == 0 else ("current", "baseline")
            for which in order:
                started = time.strftime("%H:%M:%S")
                figures = run_once(harness, engines[which], args, work / f"{which}-{pair}.json")
                figures["started"] = started
                runs[which].append(figures)
                print(f"[engines] {which} run {pair + 1}: mix {figures['mix_wall_s']:.1f} s",
                      flush=True)  # fmt: skip
        current = product_version()
        result = {
            "corpus": args.corpus,
            "pairs": args.pairs,
            "config": {"ops": args.ops, "seq_ops": args.seq_ops, "agents": 4},
            "date": time.strftime("%Y-%m-%d"),
            "baseline": {
                "revision": revision(args.baseline),
                "runs": runs["baseline"],
                "median": medians(runs["baseline"]),
            },
            "current": {
                "revision": current["head"] + ("+dirty" if current["cascowfs_dirty"] else ""),
                "sources_sha256": current["sources_sha256"],
                "runs": runs["current"],
                "median": medians(runs["current"]),
            },
        }
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(table(result))
        print(f"results in {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
