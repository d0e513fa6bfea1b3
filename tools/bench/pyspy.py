"""The daemon under py-spy: a second MCTS mix with the profiler attached, and what its samples
say (which cascowfs functions the busy threads were in)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .host import VENV_BIN
from .systems import CascowSystem
from .workload import run_mix


def profile_cascowfs(system: CascowSystem, args: argparse.Namespace, files: list[str]) -> dict:
    """Re-run a short mix with py-spy attached to the daemon; returns the top frames."""
    pyspy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    if not os.path.exists(pyspy):
        return {"skipped": "py-spy not installed"}
    out = Path(args.out).with_suffix(".profile.txt")
    raw = Path(args.out).with_suffix(".pyspy.raw")
    pid = system.daemon_pid()
    prof = subprocess.Popen(
        [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "500",
            "--threads",
            "--idle",
            "-o",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        agents = args.profile_agents or args.agents
        mix = run_mix(system, agents, max(400, args.ops // 4), args.seed + 1, files, tag="prof")
    finally:
        prof.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            prof.wait(timeout=30)
        if prof.poll() is None:
            prof.kill()
            prof.wait()
    summary = summarize_pyspy(raw) if raw.exists() else {}
    out.write_text(json.dumps(summary, indent=1))
    return {
        "ops": mix["ops"],
        "agents": agents,
        "raw": str(raw),
        "summary": summary,
        "ops_detail": {op: {k: v for k, v in d.items()} for op, d in mix["ops_detail"].items()},
    }


IDLE_LEAVES = (
    "Condition.wait (threading.py",
    "EpollIOManager.get_events",
    "_thread_cache.py:211)",
    "Queue.get (queue.py",
    "Event.wait (threading.py",
    "select (selectors.py",
)


def summarize_pyspy(raw: Path, top: int = 25) -> dict:
    """From py-spy's collapsed stacks (all threads, idle included): drop samples of threads
    waiting for work (idle leaves), then count per frame inclusive and self samples. Blocking
    calls such as fsync, lock waits and mount(2) stay in (they are what an op waits on)."""
    incl: dict[str, int] = {}
    self_: dict[str, int] = {}
    total = busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n_i = int(n)
        frames = [
            f
            for f in stack.split(";")
            if f and not f.startswith("thread ") and not f.startswith("process ")
        ]
        if not frames:
            continue
        total += n_i
        if any(k in frames[-1] for k in IDLE_LEAVES):
            continue
        busy += n_i
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n_i
        self_[frames[-1]] = self_.get(frames[-1], 0) + n_i
    ours = {f: n for f, n in incl.items() if "cascowfs/" in f}
    return {
        "samples": total,
        "busy": busy,
        "inclusive": sorted(ours.items(), key=lambda kv: -kv[1])[:top],
        "self": sorted(self_.items(), key=lambda kv: -kv[1])[:top],
    }
