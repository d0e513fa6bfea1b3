#!/usr/bin/env python3
"""Remotes against restic, on one S3 server on 127.0.0.1 (moto's, from the test extra).

1. cascowfs: import the corpus into a store, push it (``base``); then 100 times: change a
   few bytes of one file in a branch, commit, push that snapshot. Then pull ``base`` into an
   empty store, and all 101 snapshots into another (``--with-ancestors``), each until its
   layer is written. The bucket is listed after every step: objects and bytes added.
2. restic (Debian's): ``restic backup`` of the same branch tree after the same edits (the
   base first, then each edit), then ``restic restore`` of the base and of the last
   snapshot into empty directories; the bucket listed after every step.

Writes ``bench-results/remote.json`` and the section ``docs/benchmarks.extra/remotes.md``.

    sudo .venv/bin/python tools/bench_remote.py [--corpus django] [--edits 100] [--out JSON]
    .venv/bin/python tools/bench_remote.py --out JSON --render   # the section again
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cascowfs.remote import config, objectstore, transfer  # noqa: E402
from cascowfs.state import StateManager  # noqa: E402

MB = 1e6
EDIT_BYTES = 64
# What a small-edit push may send beside twice its edited file: the trees on the path to the
# file and the two indexes, a few kB each.
CONSTANT_BYTES = 32_000
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "RESTIC_PASSWORD": "bench",
}


def log(msg: str) -> None:
    print(f"[bench_remote {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


class Bucket:
    def __init__(self, endpoint: str, name: str) -> None:
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.name = name
        self.client.create_bucket(Bucket=name)

    def totals(self) -> tuple[int, int]:
        """(objects, bytes) in the bucket, locks left out."""
        count = size = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            for item in page.get("Contents", []):
                if "/locks/" not in f"/{item['Key']}":
                    count += 1
                    size += item["Size"]
        return count, size


def tree_bytes(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                files += 1
                size += p.stat().st_size
    return files, size


def edit(tree: Path, rng: random.Random, candidates: list[str]) -> dict:
    """Overwrite EDIT_BYTES bytes at a random offset of a random file (>= 1 KiB)."""
    rel = rng.choice(candidates)
    path = tree / rel
    size = path.stat().st_size
    at = rng.randrange(0, size - EDIT_BYTES)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(rng.randbytes(EDIT_BYTES))
    return {"file": rel, "file_size": size, "edit_bytes": EDIT_BYTES}


def restic(repo: str, *args: str) -> dict:
    r = subprocess.run(
        ["restic", "-r", repo, "--json", "-q", *args],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"restic {' '.join(args)}: {r.stderr.strip()[-800:]}")
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return lines[-1] if lines else {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="django")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "remote.json")
    ap.add_argument("--section", type=Path, default=REPO / "docs/benchmarks.extra/remotes.md")
    ap.add_argument("--render", action="store_true", help="only write the section from --out")
    args = ap.parse_args()
    if args.render:
        result = json.loads(args.out.read_text())
        result.setdefault("raw", str(args.out.resolve().relative_to(REPO)))
        args.section.write_text(section(result))
        return 0
    os.environ.update(CREDENTIALS)
    data = Path(os.environ.get("CASCOWFS_BENCH_DATA", REPO / "bench-data"))
    src = data / "corpora" / args.corpus / "tree"
    if not src.is_dir():
        subprocess.run([sys.executable, REPO / "tools/fetch_corpus.py", args.corpus], check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir="/var/tmp"))
    server, endpoint = start_server()
    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "host": f"{os.cpu_count()} cores, kernel {platform.release()}",
        "loadavg_before": os.getloadavg(),
        "corpus": args.corpus,
        "edits": args.edits,
        "restic": subprocess.run(["restic", "version"], capture_output=True, text=True)
        .stdout.strip()
        .split(" compiled")[0],
    }
    sm = None
    try:
        files, size = tree_bytes(src)
        result["tree"] = {"files": files, "bytes": size}
        ours = Bucket(endpoint, "cascowfs")
        theirs = Bucket(endpoint, "restic")
        spec = config.RemoteSpec("bench", "s3://cascowfs/bench", endpoint)
        remote = objectstore.open_store(spec)
        sm = StateManager.open(work / "a", create=True)
        sm.import_tree(src, "base")
        tree = sm.create_branch("w", "base").tree
        log(f"push base ({files} files, {size / MB:.1f} MB)")
        t = time.perf_counter()
        stats = transfer.push(sm, remote, ["base"])
        base_push = {"seconds": time.perf_counter() - t, "objects_bytes": ours.totals()}
        base_push["stats"] = vars(stats)
        repo = f"s3:{endpoint}/restic/repo"
        os.environ["RESTIC_CACHE_DIR"] = str(work / "restic-cache")  # as a user's would be
        restic(repo, "init")
        log("restic backup of the base")
        t = time.perf_counter()
        summary = restic(repo, "backup", "--host", "bench", str(tree))
        restic_base = {"seconds": time.perf_counter() - t, "objects_bytes": theirs.totals()}
        restic_base["data_added"] = summary.get("data_added")
        rng = random.Random(1)
        candidates = sorted(
            str(p.relative_to(tree))
            for p in tree.rglob("*")
            if p.is_file() and not p.is_symlink() and p.stat().st_size >= 1024
        )
        steps = []
        prev_ours, prev_theirs = ours.totals(), theirs.totals()
        for i in range(1, args.edits + 1):
            step = edit(tree, rng, candidates)
            sm.commit("w", f"e{i}")
            t = time.perf_counter()
            stats = transfer.push(sm, remote, [f"e{i}"])
            step["push_seconds"] = time.perf_counter() - t
            now = ours.totals()
            step["objects"], step["bytes"] = now[0] - prev_ours[0], now[1] - prev_ours[1]
            step["index_read"] = stats.index_read
            prev_ours = now
            t = time.perf_counter()
            restic(repo, "backup", "--host", "bench", str(tree))
            step["restic_seconds"] = time.perf_counter() - t
            now = theirs.totals()
            step["restic_objects"] = now[0] - prev_theirs[0]
            step["restic_bytes"] = now[1] - prev_theirs[1]
            prev_theirs = now
            steps.append(step)
            if i % 10 == 0:
                log(f"edit {i}: ours {step['bytes']} B, restic {step['restic_bytes']} B")
        sm.discard("w")
        sm.close()
        sm = None
        pulls = {}
        for name, ids, ancestors in (
            ("base", ["base"], False),
            ("all", [f"e{args.edits}"], True),
        ):
            log(f"pull {name}")
            target = StateManager.open(work / f"pull-{name}", create=True)
            try:
                t = time.perf_counter()
                stats = transfer.pull(target, remote, ids, with_ancestors=ancestors)
                fetched = time.perf_counter() - t
                target.settle()  # its layers written, as a restore writes files
                pulls[name] = {
                    "seconds": fetched,
                    "with_layers_seconds": time.perf_counter() - t,
                    "snapshots": len(stats.snapshots),
                    "bytes": stats.bytes,
                    "packs": stats.packs,
                }
            finally:
                target.close()
        restores = {}
        snaps = json.loads(
            subprocess.run(
                ["restic", "-r", repo, "--json", "snapshots"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        snaps.sort(key=lambda s: s["time"])
        for name, snap in (("base", snaps[0]["id"]), ("last", snaps[-1]["id"])):
            log(f"restic restore {name}")
            t = time.perf_counter()
            restic(repo, "restore", snap, "--target", str(work / f"restore-{name}"))
            restores[name] = {"seconds": time.perf_counter() - t}
        result.update(
            base_push=base_push,
            restic_base=restic_base,
            steps=steps,
            pulls=pulls,
            restores=restores,
        )
    finally:
        if sm is not None:
            sm.close(unmount_branches=True)
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    result["raw"] = str(args.out.resolve().relative_to(REPO))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.section.write_text(section(result))
    print(section(result))
    return 0


def _load(figures: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in figures)


def _median(steps: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in steps)


def section(r: dict) -> str:
    size = r["tree"]["bytes"]
    steps = r["steps"]
    bp, rb = r["base_push"], r["restic_base"]
    mbps = size / MB / bp["seconds"]
    rmbps = size / MB / rb["seconds"]
    max_ours = max(s["bytes"] for s in steps)
    rows = [
        "| | cascowfs push / pull | restic backup / restore |",
        "|---|---|---|",
        f"| first push ({r['tree']['files']} files, {size / MB:.1f} MB) | "
        f"{bp['seconds']:.1f} s, {mbps:.1f} MB/s; {bp['objects_bytes'][0]} objects, "
        f"{bp['objects_bytes'][1] / MB:.1f} MB | {rb['seconds']:.1f} s, {rmbps:.1f} MB/s; "
        f"{rb['objects_bytes'][0]} objects, {rb['objects_bytes'][1] / MB:.1f} MB |",
        f"| small-edit snapshot, median of {len(steps)} | "
        f"{_median(steps, 'push_seconds') * 1000:.0f} ms; "
        f"{_median(steps, 'objects'):.0f} objects, {_median(steps, 'bytes') / 1e3:.1f} kB "
        f"(max {max_ours / 1e3:.1f} kB) | "
        f"{_median(steps, 'restic_seconds') * 1000:.0f} ms; "
        f"{_median(steps, 'restic_objects'):.0f} objects, "
        f"{_median(steps, 'restic_bytes') / 1e3:.1f} kB |",
        f"| pull / restore of the base into an empty store / directory | "
        f"{r['pulls']['base']['seconds']:.1f} s "
        f"({r['pulls']['base']['with_layers_seconds']:.1f} s with its layer written) | "
        f"{r['restores']['base']['seconds']:.1f} s |",
        f"| pull of all {r['pulls']['all']['snapshots']} snapshots (`--with-ancestors`) / "
        f"restore of the last | {r['pulls']['all']['seconds']:.1f} s "
        f"({r['pulls']['all']['with_layers_seconds']:.1f} s with layers), "
        f"{r['pulls']['all']['bytes'] / MB:.1f} MB in {r['pulls']['all']['packs']} packs | "
        f"{r['restores']['last']['seconds']:.1f} s |",
    ]
    over = max(s["bytes"] - 2 * s["file_size"] for s in steps)
    return f"""## Remotes: push and pull against restic

Run {r["started"]} at commit `{r["commit"]}` on {r["host"]}; the stores
on the root disk, both tools against one moto S3 server on 127.0.0.1 (a bucket each);
{r["restic"]} from Debian, with its local cache. The machine's load average (1, 5, 15 min):
{_load(r["loadavg_before"])} before, {_load(r["loadavg_after"])} after (other work shared
the 2 cores: compare the two columns, made in the same minutes, not the figures across runs). Corpus: `{r["corpus"]}`
({r["tree"]["files"]} files, {size / MB:.1f} MB). Raw figures: `{r.get("raw", "bench-results/remote.json")}`.
Reproduce with:

    sudo .venv/bin/python tools/bench_remote.py --corpus {r["corpus"]} --edits {r["edits"]} \\
        --out {r.get("raw", "bench-results/remote.json")}

cascowfs pushes the imported base, then {r["edits"]} times overwrites {EDIT_BYTES} bytes at
a random offset of a random file of 1 KiB or more in a branch, commits and pushes that
snapshot; restic backs up the branch's tree (the same files) first as it is, then after
each edit. Objects and bytes are what the bucket gained, listed after each step (locks left
out). MB/s are the tree's bytes over the wall time.

{chr(10).join(rows)}

A small-edit push sent at most {max_ours / 1e3:.1f} kB: the changed file's chunk, the trees
on the path to it (a directory's listing is one object) and the index; its bytes minus
twice the edited file's size: at most {over / 1e3:.1f} kB. Every push read only the indexes
new to the store ({max(s["index_read"] for s in steps)} bytes at most: the store caches the
indexes it read or wrote).

**The aims.** A small-edit snapshot push sends less than twice its changed bytes (the
edited file) plus a constant: {"met" if over <= CONSTANT_BYTES else "not met"}, every one
of the {len(steps)} pushes sent at most {over / 1e3:.1f} kB more than twice its edited file
(the constant, at most {CONSTANT_BYTES / 1e3:.0f} kB: the trees on the path and two
indexes); against the {EDIT_BYTES} bytes an edit overwrites, a push sent
{_median(steps, "bytes") / 1e3:.1f} kB (median), restic's backup added
{_median(steps, "restic_bytes") / 1e3:.1f} kB. The first push is at least as fast as
restic's backup: {"met" if bp["seconds"] <= rb["seconds"] else "not met"}
({bp["seconds"]:.1f} s against {rb["seconds"]:.1f} s).
"""


if __name__ == "__main__":
    sys.exit(main())
