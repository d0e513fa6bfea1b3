"""The workload: a tree-search script that every system replays exactly.

An agent picks a snapshot from its frontier, *branches* 2-4 copies, applies an agent-size edit
to each (1-5 small source edits, sometimes a new file, a delete, a rename, rarely a 256 KiB-1 MiB
generated file; always <= 20 files, <= 1 MiB), *commits* the best one (sometimes two, sometimes
none), *labels* the path from each new snapshot up (visits and mean value: MCTS's
back-propagation, ``BACKPROP_DEPTH`` nodes), *discards* every branch but, half the time, one
uncommitted branch that it *resets* onto the next step's pick instead of branching afresh, and
*prunes* its oldest snapshots beyond six. Decisions and edits come from a per-agent seeded RNG,
so every system replays the same script; a system without labels and reset
(``System.episodes``) skips the labels and rolls back by discard and branch. Agents are
processes, started together (``run_mix``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .stats import Record, drift, summarize
from .systems import System

OPS = ("branch", "commit", "discard", "prune", "label", "reset")
BACKPROP_DEPTH = 6  # the nodes of a new snapshot's path that one back-propagation labels


def corpus_files(tree: Path) -> list[str]:
    """Regular text-ish files up to 64 KiB, relative, sorted: the candidates for edits."""
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not os.path.isfile(p) or os.path.islink(p) or not 0 < st.st_size <= 65536:
                continue
            if n.endswith(
                (
                    ".py",
                    ".c",
                    ".h",
                    ".txt",
                    ".html",
                    ".js",
                    ".css",
                    ".rst",
                    ".S",
                    ".sh",
                    ".json",
                    "Makefile",
                    "Kconfig",
                    ".po",
                )
            ):
                out.append(os.path.relpath(p, tree))
    return sorted(out)


class EditScript:
    """Deterministic agent-size edits over a hot set of the corpus's files."""

    def __init__(self, files: list[str], agent: int, seed: int) -> None:
        pick = random.Random(seed)  # same hot set for every agent: they work on one repo
        self.hot = pick.sample(files, min(len(files), 200)) if files else []
        self.agent = agent
        self.k = 0

    def next(self, rng: random.Random) -> list[tuple]:
        acts: list[tuple] = []
        budget = 1 << 20
        for _ in range(rng.randint(1, 5)):
            acts.append(
                (
                    "modify",
                    rng.choice(self.hot),
                    rng.random(),
                    f"# agent {self.agent} edit {self.k} value={rng.randrange(10**6)}\n",
                )
            )
        if rng.random() < 0.3:
            d = os.path.dirname(rng.choice(self.hot))
            size = rng.randint(500, 8000)
            acts.append(
                (
                    "create",
                    os.path.join(d, f"gen_a{self.agent}_{self.k}.py"),
                    size,
                    rng.randrange(1 << 30),
                )
            )
            budget -= size
        if rng.random() < 0.1:
            acts.append(("delete", rng.choice(self.hot)))
        if rng.random() < 0.1:
            src = rng.choice(self.hot)
            acts.append(("rename", src, src + f".r{self.agent}_{self.k}"))
        if rng.random() < 0.03:
            size = rng.randint(256 << 10, min(budget - 64 << 10, 1 << 20) - 1)
            acts.append(
                ("big", f"generated_a{self.agent}_{self.k}.dat", size, rng.randrange(1 << 30))
            )
        self.k += 1
        return acts

    @staticmethod
    def apply(root: str, acts: list[tuple]) -> int:
        """Apply to the tree at root; returns the bytes written. Files missing in this lineage
        (deleted or renamed by an ancestor) are skipped."""
        written = 0
        for act in acts:
            kind, rel = act[0], act[1]
            p = os.path.join(root, rel)
            try:
                if kind == "modify":
                    with open(p, "rb") as f:
                        data = f.read()
                    pos = data.find(b"\n", int(len(data) * act[2]))
                    pos = len(data) if pos < 0 else pos + 1
                    data = data[:pos] + act[3].encode() + data[pos:]
                    with open(p, "wb") as f:
                        f.write(data)
                    written += len(data)
                elif kind == "create":
                    r = random.Random(act[3])
                    body = "".join(
                        f"def f{i}(x):\n    return x + {r.randrange(1000)}\n"
                        for i in range(act[2] // 40)
                    )
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                    with open(p, "w") as f:
                        f.write(body)
                    written += len(body)
                elif kind == "delete":
                    os.unlink(p)
                elif kind == "rename":
                    os.rename(p, os.path.join(root, act[2]))
                elif kind == "big":
                    r = random.Random(act[3])
                    blob = r.randbytes(act[2] // 2).hex().encode()
                    with open(p, "wb") as f:
                        f.write(blob)
                    written += len(blob)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                pass
        return written


def agent_loop(
    system: System,
    agent: int,
    nops: int,
    seed: int,
    files: list[str],
    barrier: Any,
    q: Any,
    tag: str = "",
    frontier_max: int = 6,
) -> None:
    recs: list[Record] = []
    errors: list[str] = []
    edit_s: list[float] = []
    try:
        system.agent_init(agent)
        rng = random.Random(seed * 1009 + agent)
        script = EditScript(files, agent, seed)
        frontier = ["base"]
        owned: list[str] = []
        path_of: dict[str, list[str]] = {"base": ["base"]}  # a snapshot's path from base
        visits: dict[str, tuple[int, float]] = {}  # back-propagated: visits, value sum
        spare: tuple[str, str, str] | None = None  # (branch, its tree, its parent) to reset
        k = 0
        ops = 0
        barrier.wait()

        def timed(op: str, fn: Callable, *a: Any) -> tuple[bool, Any]:
            nonlocal ops
            ops += 1
            t0 = time.perf_counter()
            try:
                return True, fn(*a)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{op}: {str(exc)[:300]}")
                return False, None
            finally:
                recs.append((op, t0, time.perf_counter() - t0))

        while ops < nops:
            parent = rng.choice(frontier[-4:]) if rng.random() < 0.8 else rng.choice(frontier)
            width = rng.randint(2, 4)
            live: list[tuple[str, str]] = []
            for _ in range(width):
                name = f"{tag}a{agent}b{k}"
                k += 1
                if spare is not None and system.episodes:  # roll the kept branch back
                    name, tree = spare[0], spare[1]
                    ok, _ = timed("reset", system.reset, name, parent)
                    if not ok:
                        timed("discard", system.discard, name)
                else:
                    if spare is not None:
                        timed("discard", system.discard, spare[0])
                    ok, tree = timed("branch", system.branch, name, parent)
                spare = None
                edit = script.next(rng)
                if not ok:
                    continue
                live.append((name, tree))
                t0 = time.perf_counter()
                try:
                    EditScript.apply(tree, edit)
                except OSError as exc:
                    errors.append(f"edit: {exc}")
                edit_s.append(time.perf_counter() - t0)
            r = rng.random()
            keep = 0 if r < 0.2 else (2 if r > 0.85 else 1)
            for name, _ in live[:keep]:
                sid = f"{tag}a{agent}s{k}"
                k += 1
                reward = rng.random()
                ok, _ = timed(
                    "commit",
                    system.commit,
                    name,
                    sid,
                    {"reward": f"{reward:.3f}", "agent": str(agent)},
                )
                if not ok:
                    continue
                frontier.append(sid)
                owned.append(sid)
                path_of[sid] = path_of.get(parent, [parent]) + [sid]
                for node in reversed(path_of[sid][-BACKPROP_DEPTH:]):
                    if node != "base" and node not in owned:
                        continue  # pruned meanwhile
                    n, total = visits.get(node, (0, 0.0))
                    visits[node] = (n + 1, total + reward)
                    if system.episodes:
                        mean = (total + reward) / (n + 1)
                        labels = {"visits": str(n + 1), "value": f"{mean:.4f}"}
                        timed("label", system.set_labels, node, labels)
            uncommitted = live[keep:]
            if uncommitted and rng.random() < 0.5:  # kept for the next step's rollback
                spare = (*uncommitted[-1], parent)
            for name, _ in live:
                if spare is None or name != spare[0]:
                    timed("discard", system.discard, name)
            while len(owned) > frontier_max:
                # never the snapshot the kept branch sits on: cascowfs refuses that prune
                victim = next((s for s in owned if spare is None or s != spare[2]), None)
                if victim is None:
                    break
                owned.remove(victim)
                frontier.remove(victim)
                path_of.pop(victim, None)
                visits.pop(victim, None)
                timed("prune", system.prune, victim)
        if spare is not None:
            timed("discard", system.discard, spare[0])
        q.put(
            {
                "agent": agent,
                "recs": recs,
                "errors": errors,
                "edit_s": edit_s,
                "live_snapshots": owned,
            }
        )
    except BaseException:  # noqa: BLE001
        q.put(
            {
                "agent": agent,
                "recs": recs,
                "errors": errors + [traceback.format_exc()],
                "edit_s": edit_s,
                "live_snapshots": [],
            }
        )


def run_mix(
    system: System,
    agents: int,
    nops: int,
    seed: int,
    files: list[str],
    tag: str = "",
    frontier_max: int = 6,
) -> dict:
    """N agent processes replaying the script on one system; names and ids carry `tag` so that
    several runs on one store never collide. Each agent prunes its oldest snapshots beyond
    ``frontier_max``."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    barrier = ctx.Barrier(agents + 1)
    per = max(1, nops // agents)
    procs = [
        ctx.Process(
            target=agent_loop, args=(system, a, per, seed, files, barrier, q, tag, frontier_max)
        )
        for a in range(agents)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    results = [q.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    recs = [r for res in results for r in res["recs"]]
    errors = [e for res in results for e in res["errors"]]
    out: dict[str, Any] = {
        "agents": agents,
        "ops": len(recs),
        "wall_s": wall,
        "throughput_ops_s": len(recs) / wall if wall else 0,
        "errors": errors[:20],
        "error_count": len(errors),
        "ops_detail": {},
        "latencies": {},
        "edit": summarize([x for res in results for x in res["edit_s"]]),
        "live_snapshots": sum(len(res["live_snapshots"]) for res in results),
    }
    for op in OPS:
        lat = [r[2] for r in recs if r[0] == op]
        s = summarize(lat)
        s["throughput_ops_s"] = len(lat) / wall if wall else 0
        out["ops_detail"][op] = s
        out["latencies"][op] = [round(x, 6) for x in lat]
    out["drift_p95"] = drift(recs, OPS)
    # start time, op, latency (for latency-over-time plots), relative to the run start
    t_first = min((r[1] for r in recs), default=0)
    out["timeline"] = [
        (round(r[1] - t_first, 4), r[0], round(r[2], 6)) for r in sorted(recs, key=lambda r: r[1])
    ]
    return out


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
    return False


OWN_COMMANDS = ("bench_mcts", "tools.bench")  # other benchmark runs are not foreign load


def busy_foreign_processes() -> list[str]:
    """Other heavy processes on the machine right now (e.g. a parallel test run): their
    presence makes latencies worse, so every run records them."""
    out = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            cmd = cmdline.decode(errors="replace")[:80]
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if _descends_from(int(pid), me):
            continue
        if state == "R" and not any(own in cmd for own in OWN_COMMANDS) and cmd:
            out.append(cmd.strip())
        elif "pytest" in cmd and "bench" not in cmd:
            out.append(cmd.strip())
    return sorted(set(out))[:10]
