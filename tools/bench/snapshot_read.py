"""Reading snapshots: the daemon's FUSE view against the kernel view (an overlay of the
snapshot's layers, docs/architecture.md) and native ext4, in one run on one scratch ext4.

Two copies of the corpus sit on the scratch filesystem: ``native`` and ``edited`` (the same
tree with a commit's worth of edits). The store imports ``native`` as snapshot ``base`` and
commits the same edits from a branch as ``edited``. Each test runs warm (caches dropped, one
run to warm them, then ``--snapshot-read-repeat`` timed runs, median) in the native trees, then
with a daemon that serves snapshots itself (``CASCOWFS_SNAPSHOT_VIEWS=fuse``), then with a
daemon that mounts their kernel views; ``diff -r`` compares the two trees of each place.

``python -m tools.bench.snapshot_read --corpus django`` runs this section alone and writes
``bench-results/snapshot-read-<corpus>.json``; ``report_lines`` renders its table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools import benchfs, fetch_corpus

from .host import log, run
from .systems import CascowSystem, system_on_scratch

REPO = Path(__file__).resolve().parent.parent.parent

TESTS = {
    "stat walk (find -printf %s)": "find {a} -printf '%s\\n' > /dev/null",
    "grep -r": "grep -r -c cascowfs_no_match_token {a} > /dev/null",
    "diff -r of two": "diff -r {a} {b} > /dev/null",
}
PLACES = ("native ext4", "snapshot, FUSE view", "snapshot, kernel view")
EDITED_FILES = 40  # files changed by the commit that makes the second snapshot


def _timed(cmd: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if r.returncode not in (0, 1):  # grep and diff exit 1 on no match / a difference
        raise RuntimeError(f"{cmd}: exit {r.returncode}")
    return dt


def _edit(tree: Path) -> None:
    """The commit's edits: appended lines, a deleted and an added file per edited directory."""
    files = sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    step = max(1, len(files) // EDITED_FILES)
    for i, path in enumerate(files[::step][:EDITED_FILES]):
        if i % 4 == 3:
            path.unlink()
        else:
            with open(path, "a") as fh:
                fh.write(f"# edit {i}\n")
            if i % 4 == 0:
                (path.parent / f"added-{i}.txt").write_text(f"added {i}\n")


def _wait_for_views(system: CascowSystem, ids: list[str]) -> None:
    """Read each snapshot once through the daemon, then wait until its view is bound (one
    mount on each directory and file at its root)."""
    from cascowfs import overlay

    roots = [system.snapshot_path(i) for i in ids]
    for root in roots:
        os.listdir(root)  # a first read through the daemon asks for the view
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        bound = [m.target for m in overlay.all_mounts() if m.fstype == "overlay"]
        if all(any(t.startswith(root + "/") for t in bound) for root in roots):
            return
        time.sleep(0.05)
    raise RuntimeError(f"kernel views of {ids} not mounted within 120 s")


def _serve(system: CascowSystem, views: str) -> None:
    os.environ["CASCOWFS_SNAPSHOT_VIEWS"] = views
    try:
        system.mount()
    finally:
        del os.environ["CASCOWFS_SNAPSHOT_VIEWS"]


def bench_snapshot_read(src_tree: Path, args: argparse.Namespace) -> dict:
    why = CascowSystem.unavailable()
    if why:
        return {"skipped": why}
    res: dict[str, Any] = {"repeat": args.snapshot_read_repeat, "tests": {}}
    with system_on_scratch(CascowSystem, "snapread", args.scratch_gb << 30) as (
        system,
        fsroot,
        fsdesc,
    ):
        assert isinstance(system, CascowSystem)
        res["fs"] = fsdesc
        native, edited = fsroot / "native", fsroot / "edited"
        run("cp", "-a", f"{src_tree}/.", native)
        run("cp", "-a", f"{src_tree}/.", edited)
        _edit(edited)
        system.setup(native)
        _edit(Path(system.branch("editor", "base")))
        system.commit("editor", "edited", {})
        system.discard("editor")
        pairs = {
            "native ext4": (str(native), str(edited)),
            "snapshot, FUSE view": (system.snapshot_path("base"), system.snapshot_path("edited")),
        }
        pairs["snapshot, kernel view"] = pairs["snapshot, FUSE view"]
        timings: dict[str, dict[str, list[float]]] = {t: {} for t in TESTS}
        for place in PLACES:
            if place != "native ext4":
                system.umount()
                _serve(system, "kernel" if "kernel" in place else "fuse")
                if "kernel" in place:
                    _wait_for_views(system, ["base", "edited"])
            a, b = pairs[place]
            for test, template in TESTS.items():
                cmd = template.format(a=a, b=b)
                # From dropped caches, so that the dentry cache holds this place's trees
                # alone: a lookup walks a hash chain, a kernel may have a small hash table
                # (booted with dhash_entries=131072), and a tree walked after the others sits
                # first in the chains
                benchfs.drop_caches()
                _timed(cmd)  # warms the caches
                timings[test][place] = [_timed(cmd) for _ in range(args.snapshot_read_repeat)]
        for test, row in timings.items():
            base = statistics.median(row["native ext4"])
            res["tests"][test] = {
                place: {
                    "warm": statistics.median(times),
                    "warm_all": times,
                    "warm_ratio": statistics.median(times) / base,
                }
                for place, times in row.items()
            }
            log(
                f"snapshot read: {test}: "
                + ", ".join(
                    f"{p} {v['warm'] * 1e3:.0f} ms (x{v['warm_ratio']:.2f})"
                    for p, v in res["tests"][test].items()
                )
            )
    return res


def report_lines(section: dict) -> list[str]:
    """The section as a markdown table: warm median in ms and the ratio to native ext4."""
    if "tests" not in section:
        return [f"(skipped: {section.get('skipped', 'not run')})"]
    lines = [
        "| warm, median of " + str(section["repeat"]) + " | " + " | ".join(PLACES) + " |",
        "|---|" + "---|" * len(PLACES),
    ]
    for test, row in section["tests"].items():
        cells = [
            f"{row[p]['warm'] * 1e3:.0f} ms ({row[p]['warm_ratio']:.2f}×)" if p in row else "—"
            for p in PLACES
        ]
        lines.append(f"| {test} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="django", help="django | linux | synthetic")
    ap.add_argument("--snapshot-read-repeat", type=int, default=5)
    ap.add_argument("--scratch-gb", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (loop devices, mounts)")
        return 2
    if args.corpus.startswith("synthetic"):
        tree, name = fetch_corpus.make_synthetic(files=200), "synthetic"
    else:
        tree, name = fetch_corpus.fetch(args.corpus), args.corpus
    out = Path(args.out or REPO / "bench-results" / f"snapshot-read-{name}.json")
    section = bench_snapshot_read(tree, args)
    result: dict[str, Any] = {
        "corpus": fetch_corpus.info(name) if name != "synthetic" else {"name": name},
        "machine": benchfs.machine(),
        "argv": ["python", "-m", "tools.bench.snapshot_read"]
        + (sys.argv[1:] if argv is None else list(argv)),
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "snapshot_read": section,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(report_lines(section)))
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
