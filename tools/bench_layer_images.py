#!/usr/bin/env python3
"""Read path of a branch on directory layers against one on EROFS image layers, native ext4
and the bare overlay-on-EROFS floor, interleaved in one run (median of N cold, best of 3N
warm), and the layers' size. Needs root. Usage:

    .venv/bin/python tools/bench_layer_images.py TREE SCRATCH_DIR [REPS]
"""
import json, os, statistics, subprocess, sys, time
from pathlib import Path
from cascowfs import overlay
from cascowfs.state import StateManager
from cascowfs.tuning import Tuning

src, work = Path(sys.argv[1]), Path(sys.argv[2])
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
subprocess.run(["rm", "-rf", str(work)]); work.mkdir(parents=True)
native = work / "native"
subprocess.run(["cp", "-a", f"{src}/.", str(native)], check=True)
places = {"native ext4": native}
stores = {}
for mode in ("dir", "erofs"):
    sm = StateManager.open(work / f"store-{mode}", tuning=Tuning(layer_images=mode))
    sm.import_tree(native, "base")
    places[f"branch, {mode} layers"] = sm.create_branch("reader", "base").tree
    stores[mode] = sm
floor = work / "floor"
for d in ("img", "u", "w", "m"):
    (floor / d).mkdir(parents=True)
subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", "-zlz4", str(floor / "image"), str(native)], check=True)
overlay.mount_erofs(floor / "img", floor / "image")
overlay.mount_overlay(floor / "m", [floor / "img"], floor / "u", floor / "w")
places["bare overlay on EROFS"] = floor / "m"
tests = {
    "stat walk": "find . -printf '%s\\n' > /dev/null",
    "grep -r": "grep -r -c cascowfs_no_match_token . > /dev/null",
    "git status": "git --git-dir=$G --work-tree=. status --porcelain > /dev/null",
    "import storm": "PYTHONDONTWRITEBYTECODE=1 python3 -c \"import sys; sys.path.insert(0, '.'); import django, django.db.models, django.contrib.admin, django.test, django.forms, django.template\" >/dev/null 2>&1; true",
}
gits = {}
for n, (p, path) in enumerate(places.items()):
    g = work / f"git-{n}"
    env = {**os.environ, "GIT_DIR": str(g), "GIT_WORK_TREE": str(path)}
    subprocess.run(["git", "init", "-q"], env=env, check=True)
    subprocess.run(["git", "add", "-A", "-f", "."], cwd=path, env=env, check=True)
    gits[p] = str(g)
def timed(cmd, cwd, g):
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], cwd=cwd, env={**os.environ, "G": g}, check=False)
    return time.perf_counter() - t0
res = {}
try:
    for test, cmd in tests.items():
        row = {p: {"cold": [], "warm": []} for p in places}
        for _ in range(reps):
            for p, path in places.items():
                subprocess.run(["sync"]); Path("/proc/sys/vm/drop_caches").write_text("3")
                row[p]["cold"].append(timed(cmd, path, gits[p]))
                row[p]["warm"].append(min(timed(cmd, path, gits[p]) for _ in range(3)))
        nat = row["native ext4"]
        res[test] = {p: {"cold_ms": round(statistics.median(v["cold"]) * 1e3, 1),
                         "warm_ms": round(min(v["warm"]) * 1e3, 1),
                         "cold_x": round(statistics.median(v["cold"]) / statistics.median(nat["cold"]), 2),
                         "warm_x": round(min(v["warm"]) / min(nat["warm"]), 2)} for p, v in row.items()}
        print(test, json.dumps(res[test]), file=sys.stderr, flush=True)
finally:
    overlay.unmount(floor / "m"); overlay.unmount(floor / "img")
    for sm in stores.values():
        sm.close(unmount_branches=True)
sizes = {m: int(subprocess.run(["du", "-s", "-B1", str(work / f"store-{m}" / "layers")], capture_output=True, text=True).stdout.split()[0]) for m in stores}
print(json.dumps({"read_path": res, "layers_bytes": sizes}))
subprocess.run(["rm", "-rf", str(work)])
