"""The sections of a run, each on fresh scratch filesystems, each returning its part of the
result JSON:

1. ``bench_system``: import of the corpus, then the single-agent run and the MCTS mix of one
   system (and ``--profile``'s second mix under py-spy);
2. ``bench_read_path``: reading inside a cascowfs branch against the plain ext4 copy it was
   imported from (plus a bare overlay on that copy and the FUSE snapshot view), cold and warm;
3. ``bench_growth``: store size against one copy over a chain of N commits, or N snapshots each
   from base, cascowfs and btrfs;
4. ``bench_mount``: mount time of a store holding S snapshots and B live branches, after a clean
   unmount and after kill -9 (WAL replay).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cascowfs import images
from tools import benchfs

from .host import MNT_DETACH, du_bytes, fs_used, log, run, sys_mount, sys_umount
from .pyspy import profile_cascowfs
from .stats import pct, summarize, tenths_p95
from .systems import BtrfsSystem, CascowSystem, System, system_on_scratch
from .workload import OPS, EditScript, busy_foreign_processes, corpus_files, run_mix


def _on_scratch(
    cls: type[System], label: str, args: argparse.Namespace
) -> contextlib.AbstractContextManager[tuple[System, Path, dict]]:
    return system_on_scratch(cls, label, args.scratch_gb << 30)


def bench_system(
    cls: type[System], src_tree: Path, args: argparse.Namespace, files: list[str], corpus_info: dict
) -> dict:
    why = cls.unavailable()
    if why:
        log(f"{cls.name}: SKIPPED ({why})")
        return {"system": cls.name, "label": cls.label, "skipped": why}
    nops = args.slow_ops if cls.slow and args.slow_ops else args.ops
    res: dict[str, Any] = {"system": cls.name, "label": cls.label}
    with _on_scratch(cls, f"mcts-{cls.name}", args) as (system, fsroot, fsdesc):
        res["fs"] = fsdesc
        src = fsroot / "src"
        run("cp", "-a", f"{src_tree}/.", src)
        system.start()
        used0 = fs_used(fsroot)
        benchfs.drop_caches()
        t0 = time.perf_counter()
        system.setup(src)
        os.sync()
        res["import_s"] = time.perf_counter() - t0
        res["import_after_start"] = True
        res["import_mb_s"] = corpus_info["bytes"] / 1e6 / res["import_s"]
        if isinstance(system, CascowSystem):
            res["import_imaged_from_source"] = system.imaged_from_source()
        res["storage_after_import"] = system.storage()
        res["fs_used_after_import"] = fs_used(fsroot) - used0
        log(f"{cls.name}: imported in {res['import_s']:.2f}s ({res['import_mb_s']:.0f} MB/s)")
        seq_ops = min(args.seq_ops // 4, args.slow_ops) if cls.slow else args.seq_ops
        for key, agents, n, seed in (
            ("seq", 1, seq_ops, args.seed + 100),
            ("mix", args.agents, nops, args.seed),
        ):
            if n <= 0 or (key == "mix" and args.ops <= 0):
                continue
            log(f"{cls.name}: {key}: {n} ops, {agents} agent(s)")
            load0 = os.getloadavg()[0]
            mix = run_mix(system, agents, n, seed, files, tag=key)
            mix["loadavg_1m_before_after"] = [load0, os.getloadavg()[0]]
            mix["other_busy_processes"] = busy_foreign_processes()
            res[key] = mix
            res[f"storage_after_{key}"] = system.storage()
            res[f"fs_used_after_{key}"] = fs_used(fsroot) - used0
            d = mix["ops_detail"]
            log(
                f"{cls.name}: {key}: {mix['ops']} ops in {mix['wall_s']:.1f}s, errors "
                f"{mix['error_count']}; "
                + ", ".join(
                    f"{op} p50 {d[op]['p50'] * 1e3:.1f} p95 {d[op]['p95'] * 1e3:.1f} ms"
                    for op in OPS
                    if d[op]["n"]
                )
            )
            if mix["error_count"]:
                log(f"{cls.name}: first errors: {mix['errors'][:3]}")
        if isinstance(system, CascowSystem) and args.profile:
            res["profile"] = profile_cascowfs(system, args, files)
    return res


def _time_shell(cmd: str, cwd: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    dt = time.perf_counter() - t0
    if r.returncode not in (0, 1):  # grep exits 1 on no match
        raise RuntimeError(f"{cmd} in {cwd}: exit {r.returncode}")
    return dt


# An import storm: every module of every package at the tree's top, as a test collection
# imports them (modules that fail to import, wanting settings or extras, are passed over).
_IMPORT_STORM = (
    "import importlib, os, pkgutil, sys\n"
    "sys.path.insert(0, '.')\n"
    "for top in sorted(os.listdir('.')):\n"
    "    if not os.path.isfile(os.path.join(top, '__init__.py')):\n"
    "        continue\n"
    "    for m in pkgutil.walk_packages([top], top + '.', onerror=lambda name: None):\n"
    "        try:\n"
    "            importlib.import_module(m.name)\n"
    "        except BaseException:\n"
    "            pass\n"
)
READ_TESTS = {
    "stat walk (find -printf %s)": "find . -printf '%s\\n' > /dev/null",
    "read every file (find | xargs cat)": "find . -type f -print0 | xargs -0 cat > /dev/null",
    "grep -r": "grep -r -c cascowfs_no_match_token . > /dev/null",
    # GIT_DIR outside the tree, its index made (untimed) once per place: status stats every
    # file against the index and reads none
    "git status": "git --git-dir=$BENCH_GIT_DIR --work-tree=. status --porcelain > /dev/null",
    "import storm (python)": f'PYTHONDONTWRITEBYTECODE=1 {sys.executable} -c "{_IMPORT_STORM}"',
    "python -m compileall": f"{sys.executable} -m compileall -q -f -j 1 . > /dev/null",
}
_PYTHON_ONLY = ("compileall", "import storm")


def _git_index(tree: str, git_dir: Path) -> None:
    """A git index of ``tree`` in ``git_dir`` (outside it), for the timed ``git status``."""
    env = {**os.environ, "GIT_DIR": str(git_dir), "GIT_WORK_TREE": tree}
    subprocess.run(["git", "init", "-q"], env=env, check=True)
    subprocess.run(["git", "add", "-A", "-f", "."], cwd=tree, env=env, check=True)
    subprocess.run(
        ["git", "status", "--porcelain"], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL
    )


def bench_read_path(src_tree: Path, args: argparse.Namespace, corpus_info: dict) -> dict:
    why = CascowSystem.unavailable()
    if why:
        return {"skipped": why}
    has_py = sum(f.endswith(".py") for f in corpus_files(src_tree)) >= 20
    tests = {k: v for k, v in READ_TESTS.items() if has_py or not any(p in k for p in _PYTHON_ONLY)}
    res: dict[str, Any] = {"repeat": args.read_repeat, "tests": {}}
    with _on_scratch(CascowSystem, "read", args) as (system, fsroot, fsdesc):
        res["fs"] = fsdesc
        native = fsroot / "native"
        run("cp", "-a", f"{src_tree}/.", native)
        system.setup(native)
        tree = system.branch("reader", "base")
        floor = fsroot / "floor"
        for d in ("u", "w", "m"):
            (floor / d).mkdir(parents=True)
        sys_mount(
            "overlay",
            str(floor / "m"),
            "overlay",
            f"lowerdir={native},upperdir={floor}/u,workdir={floor}/w,volatile",
        )
        # the floor of a branch on an image layer: a bare overlay on the tree's EROFS image,
        # written as cascowfs writes an import's layer
        erofs = fsroot / "erofs"
        for d in ("img", "u", "w", "m"):
            (erofs / d).mkdir(parents=True)
        images.build(native, erofs / "image", compress=True)
        sys_mount(str(erofs / "image"), str(erofs / "img"), "erofs", "")
        sys_mount(
            "overlay",
            str(erofs / "m"),
            "overlay",
            f"lowerdir={erofs}/img,upperdir={erofs}/u,workdir={erofs}/w,volatile",
        )
        try:
            places = {
                "native ext4": str(native),
                "cascowfs branch": tree,
                "bare overlay on ext4": str(floor / "m"),
                "bare overlay on EROFS": str(erofs / "m"),
            }
            if snapshot := system.snapshot_path("base"):
                places["cascowfs snapshot"] = snapshot  # a kernel view after its first access
            git_dirs = {place: fsroot / f"git-{n}" for n, place in enumerate(places)}
            for test, cmd in tests.items():
                row: dict[str, Any] = {}
                for place, path in places.items():
                    if "compileall" in test and "snapshot" in place:
                        continue  # read-only: compileall cannot write its .pyc files
                    if "git status" in test:
                        _git_index(path, git_dirs[place])
                        os.environ["BENCH_GIT_DIR"] = str(git_dirs[place])
                    cold, warm = [], []
                    reps = args.read_repeat if "compileall" not in test else args.compile_repeat
                    for _ in range(max(1, reps)):
                        benchfs.drop_caches()
                        cold.append(_time_shell(cmd, path))
                        warm.append(_time_shell(cmd, path))
                    row[place] = {
                        "cold": statistics.median(cold),
                        "warm": statistics.median(warm),
                        "cold_all": cold,
                        "warm_all": warm,
                    }
                base = row["native ext4"]
                for v in row.values():
                    v["cold_ratio"] = v["cold"] / base["cold"]
                    v["warm_ratio"] = v["warm"] / base["warm"]
                res["tests"][test] = row
                log(
                    f"read path: {test}: "
                    + ", ".join(
                        f"{p} {v['cold'] * 1e3:.0f}/{v['warm'] * 1e3:.0f} ms "
                        f"(x{v['cold_ratio']:.2f}/x{v['warm_ratio']:.2f})"
                        for p, v in row.items()
                    )
                )
            # discard after the branch read the whole tree (the discard target's aim)
            t0 = time.perf_counter()
            system.discard("reader")
            res["discard_after_full_read_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sys_umount(str(floor / "m"))
            res["floor_umount_after_full_read_s"] = time.perf_counter() - t0
        finally:
            for target in (floor / "m", erofs / "m", erofs / "img"):
                with contextlib.suppress(OSError):
                    sys_umount(str(target), MNT_DETACH)
    return res


def bench_growth(
    src_tree: Path, args: argparse.Namespace, files: list[str], corpus_info: dict
) -> dict:
    out: dict[str, Any] = {"snapshots": args.growth, "wide_snapshots": args.growth_wide}
    for cls, shape in (
        (CascowSystem, "chain"),
        (BtrfsSystem, "chain"),
        (CascowSystem, "wide"),
        (BtrfsSystem, "wide"),
    ):
        n = args.growth if shape == "chain" else args.growth_wide
        key = cls.name if shape == "chain" else f"{cls.name}-wide"
        if n <= 0 or cls.name not in args.growth_systems.split(","):
            continue
        why = cls.unavailable()
        if why:
            out[key] = {"skipped": why}
            continue
        out[key] = _growth_one(cls, shape, n, src_tree, args, files)
    return out


def _growth_one(
    cls: type[System],
    shape: str,
    n: int,
    src_tree: Path,
    args: argparse.Namespace,
    files: list[str],
) -> dict:
    """chain: one branch, n commits in a row (an n-deep lineage); wide: n snapshots, each a
    branch of base with one small edit (depth 1)."""
    step = max(1, n // 20)
    with _on_scratch(cls, f"growth-{cls.name}", args) as (system, fsroot, fsdesc):
        src = fsroot / "src"
        run("cp", "-a", f"{src_tree}/.", src)
        one_copy = du_bytes(src)
        used0 = fs_used(fsroot)
        system.setup(src)
        rng = random.Random(args.seed)
        script = EditScript(files, 0, args.seed)
        series = [(0, system.storage(), fs_used(fsroot) - used0)]
        breakdown = []
        commit_s = []
        tree = system.branch("grow", "base") if shape == "chain" else ""
        prev = "base"
        failed = None
        t_start = time.perf_counter()
        for i in range(1, n + 1):
            if args.growth_timeout and time.perf_counter() - t_start > args.growth_timeout:
                failed = f"time budget of {args.growth_timeout} s used up after {i - 1} snapshots"
                log(f"growth {cls.name}: {failed}")
                series.append((i - 1, system.storage(), fs_used(fsroot) - used0))
                break
            acts = [a for a in script.next(rng) if a[0] in ("modify", "create")][:3]
            try:
                if shape == "wide":
                    tree = system.branch(f"w{i}", "base")
                EditScript.apply(tree, acts)
                t0 = time.perf_counter()
                system.commit("grow" if shape == "chain" else f"w{i}", f"g{i}", {})
                commit_s.append(time.perf_counter() - t0)
                if shape == "wide":
                    system.discard(f"w{i}")
            except OSError as exc:
                failed = f"snapshot {i}: {exc}"
                log(f"growth {cls.name}: stopped at {failed}")
                series.append((i - 1, system.storage(), fs_used(fsroot) - used0))
                break
            prev = f"g{i}"
            if i % step == 0 or i == n:
                series.append((i, system.storage(), fs_used(fsroot) - used0))
                if cls is CascowSystem:
                    assert isinstance(system, CascowSystem)
                    bd = {d.name: du_bytes(d) for d in system.store.iterdir() if d.is_dir()}
                    bd["layer_count"] = len(os.listdir(system.store / "layers"))
                    breakdown.append((i, bd))
        if shape == "chain":
            system.discard("grow")
        final = system.storage()
        res = {
            "shape": shape,
            "snapshots": n,
            "fs": fsdesc,
            "one_copy_bytes": one_copy,
            "series": series,
            "breakdown": breakdown,
            "failed": failed,
            "final_storage": final,
            "ratio_to_one_copy": final / one_copy,
            "commit": summarize(commit_s),
            "commit_drift_p95": tenths_p95(commit_s),
            "last": prev,
        }
        log(
            f"growth {cls.name} {shape}: {n} snapshots -> {final / 1e6:.1f} MB "
            f"(one copy {one_copy / 1e6:.1f} MB, x{final / one_copy:.2f}); commit p95 "
            f"{pct(commit_s, 95) * 1e3:.1f} ms"
        )
        return res


# The queries of a tree search over the whole store, each asked FIND_REPEAT times: the best
# nodes by a label, a label range, and the lineage below the first commit of the first chain.
FIND_QUERIES = (
    "has:reward --sort -reward --limit 10",
    "reward>0.99",
    "reward>=0.5 reward<0.51 --sort reward",
    "--ancestor m1 --sort -reward --limit 5",
)
FIND_REPEAT = 20


def _time_finds(system: CascowSystem, nsnap: int) -> dict:
    """Latency of ``find`` through ctl over the store's ``nsnap`` labelled snapshots."""
    out: dict[str, Any] = {"snapshots": nsnap, "queries": {}}
    every: list[float] = []
    for query in FIND_QUERIES:
        lat = []
        for _ in range(FIND_REPEAT):
            t0 = time.perf_counter()
            system.find(query)
            lat.append(time.perf_counter() - t0)
        out["queries"][query] = summarize(lat)
        every += lat
    out["all"] = summarize(every)
    log(f"find over {nsnap} snapshots: P95 {out['all']['p95'] * 1e3:.1f} ms (all queries)")
    return out


def bench_mount(src_tree: Path, args: argparse.Namespace, files: list[str]) -> dict:
    why = CascowSystem.unavailable()
    if why:
        return {"skipped": why}
    nsnap, nbr = args.mount_snapshots, args.mount_branches
    res: dict[str, Any] = {"snapshots": nsnap, "branches": nbr}
    with _on_scratch(CascowSystem, "mount", args) as (system, fsroot, fsdesc):
        assert isinstance(system, CascowSystem)
        res["fs"] = fsdesc
        src = fsroot / "src"
        run("cp", "-a", f"{src_tree}/.", src)
        system.setup(src)
        rng = random.Random(args.seed)
        script = EditScript(files, 0, args.seed)
        # Short chains (8 commits per branch, each branch from base) keep every snapshot's
        # layer chain below the engine's flattening threshold: this measures mount time, not
        # flattening (see the growth run for deep chains).
        rewards = random.Random(args.seed + 1)  # labels for the find line; edits stay as they were
        t0 = time.perf_counter()
        tree = ""
        for i in range(1, nsnap + 1):
            if (i - 1) % 8 == 0:
                if tree:
                    system.discard("grow")
                tree = system.branch("grow", "base")
            EditScript.apply(tree, [a for a in script.next(rng) if a[0] == "modify"][:1])
            system.commit("grow", f"m{i}", {"reward": f"{rewards.random():.4f}"})
            if i % 1000 == 0:
                log(f"mount test: {i} snapshots ({time.perf_counter() - t0:.0f}s)")
        if tree is not None:
            system.discard("grow")
        res["build_s"] = time.perf_counter() - t0
        res["find"] = _time_finds(system, nsnap)
        ids = [f"m{i}" for i in range(1, nsnap + 1)] or ["base"]
        for j in range(nbr):
            system.branch(f"live{j}", rng.choice(ids))
        res["store_bytes"] = system.storage()
        clean, crash = [], []
        for _ in range(3):
            system.umount(branches=False)  # branches stay mounted, as after a daemon restart
            clean.append(system.mount())
        for _ in range(3):
            pid = system.daemon_pid()
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):
                try:
                    os.kill(pid, 0)
                    time.sleep(0.01)
                except ProcessLookupError:
                    break
            system.mounted = False
            crash.append(system.mount())  # clears the dead FUSE mount, replays the WAL
        res["mount_clean_s"] = clean
        res["mount_after_kill9_s"] = crash
        log(
            f"mount with {nsnap} snapshots + {nbr} branches: clean "
            f"{[round(x * 1e3) for x in clean]} ms, "
            f"after kill -9 {[round(x * 1e3) for x in crash]} ms"
        )
    return res
