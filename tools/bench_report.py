#!/usr/bin/env python3
"""Turn ``tools/bench_mcts.py`` results into ``docs/benchmarks.md`` and PNG plots.

Usage::

    .venv/bin/python tools/bench_report.py bench-results/django.json bench-results/linux.json \\
        [--doc docs/benchmarks.md] [--img docs/img] [--notes tools/bench_notes.md]

Several result files of one corpus are merged (later files win, section by section and system
by system), so a run can be completed by a second, partial one. Every cascowfs latency is given
as a ratio to each peer, and every "must" line of SPEC §6 is marked met or missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OPS = ("branch", "commit", "discard", "prune")
PEER_ORDER = ("overlay", "btrfs", "git", "cp")
CORPUS_ORDER = ("django", "linux")
CORPUS_LABEL = {"django": "M = Django 5.1.4 sdist", "linux": "L = linux-source-6.1"}
DRIFT_LIMIT = 1.5
GROWTH_KEYS = ("cascowfs", "btrfs", "cascowfs-wide", "btrfs-wide")  # "no drift": last-window P95 <= 1.5 x first-window P95


# -- helpers ----------------------------------------------------------------------------------
def ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x >= 10:
        return f"{x:,.1f} s"
    v = x * 1e3
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def dur(x: float | None) -> str:
    """A duration with its unit: ms below 10 s, s above."""
    v = ms(x)
    return v if v.endswith(" s") or v == "—" else f"{v} ms"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "—"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"1/{b / a:.0f}"


def mb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:,.1f} MB"


def corpus_key(res: dict) -> str:
    name = res["corpus"]["name"]
    return "synthetic" if name.startswith("synthetic") else name


def merge(results: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for res in results:
        key = corpus_key(res)
        cur = out.setdefault(key, {"systems": {}, "runs": []})
        cur["runs"].append({k: res.get(k) for k in ("argv", "started", "finished", "config",
                                                    "product")})
        for k, v in res.items():
            if k == "systems":
                for name, sysres in v.items():
                    old = cur["systems"].get(name, {})
                    if "skipped" in sysres or "failed" in sysres:
                        if not old:
                            cur["systems"][name] = sysres
                        continue
                    merged = {kk: vv for kk, vv in old.items()
                              if kk not in ("skipped", "failed")}
                    merged.update(v[name])
                    cur["systems"][name] = merged
            elif k == "growth" and isinstance(v, dict):
                g = cur.setdefault("growth", {})
                for gk, gv in v.items():
                    if isinstance(gv, dict) and "skipped" in gv and isinstance(g.get(gk), dict):
                        continue
                    if gk in ("snapshots", "wide_snapshots") and not gv:
                        continue
                    g[gk] = gv
            elif k in ("read_path", "mount"):
                if v and "skipped" not in v:
                    cur[k] = v
                elif k not in cur:
                    cur[k] = v
            else:
                cur[k] = v
    return out


# -- plots ------------------------------------------------------------------------------------
def plots(data: dict[str, dict], img: Path, rel: str) -> dict[str, list[str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots (EXTRAS=bench bash tools/install.sh)",
              file=sys.stderr)
        return {}
    img.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    colors = {"cascowfs": "tab:red", "overlay": "tab:gray", "btrfs": "tab:blue",
              "git": "tab:orange", "cp": "tab:green"}
    for corpus, d in data.items():
        figs = made.setdefault(corpus, [])
        for key, title in (("mix", "concurrent MCTS mix"), ("seq", "single agent")):
            systems = [(n, s) for n, s in d["systems"].items() if key in s]
            if not systems:
                continue
            fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
            for ax, op in zip(axes, OPS):
                for name, s in systems:
                    lat = sorted(s[key]["latencies"].get(op) or [])
                    if not lat:
                        continue
                    ys = [(i + 1) / len(lat) for i in range(len(lat))]
                    ax.step([max(x, 1e-5) * 1e3 for x in lat], ys, where="post",
                            label=f"{name} (n={len(lat)})", color=colors.get(name))
                ax.set_xscale("log")
                ax.set_title(op)
                ax.set_xlabel("latency (ms, log)")
                ax.axhline(0.95, color="k", lw=0.5, ls=":")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7, loc="lower right")
            axes[0].set_ylabel("fraction of ops ≤ x")
            agents = systems[0][1][key]["agents"]
            fig.suptitle(f"{CORPUS_LABEL.get(corpus, corpus)}: latency CDF per op, {title} "
                         f"({agents} agent{'s' if agents > 1 else ''}); dotted line = P95")
            fig.tight_layout()
            fn = f"{corpus}-latency-{key}.png"
            fig.savefig(img / fn, dpi=90)
            plt.close(fig)
            figs.append(f"{rel}/{fn}")
        g = d.get("growth") or {}
        series = [(n, g[n]) for n in GROWTH_KEYS if isinstance(g.get(n), dict)
                  and "series" in g[n]]
        if series:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            one = series[0][1]["one_copy_bytes"]
            for name, s in series:
                xs = [p[0] for p in s["series"]]
                ys = [p[1] / 1e6 for p in s["series"]]
                base = name.split("-")[0]
                shape = "wide: each from base" if name.endswith("-wide") else "chain: one lineage"
                ax.plot(xs, ys, marker="o", ms=3, label=f"{base} ({shape})",
                        color=colors.get(base), ls="--" if name.endswith("-wide") else "-")
            ax.axhline(one / 1e6, color="k", ls="--", lw=1, label="one copy (du)")
            ax.axhline(1.3 * one / 1e6, color="tab:red", ls=":", lw=1, label="must: 1.3× one copy")
            ax.set_xlabel("snapshots")
            ax.set_ylabel("space used (MB)")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{CORPUS_LABEL.get(corpus, corpus)}: store size vs snapshot count")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fn = f"{corpus}-growth.png"
            fig.savefig(img / fn, dpi=90)
            plt.close(fig)
            figs.append(f"{rel}/{fn}")
        mix = (d["systems"].get("cascowfs") or {}).get("mix")
        if mix and mix.get("timeline"):
            fig, ax = plt.subplots(figsize=(10, 4))
            for op in OPS:
                pts = [(t, l) for t, o, l in mix["timeline"] if o == op]
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] * 1e3 for p in pts], s=2, alpha=0.4,
                               label=op)
            ax.set_yscale("log")
            ax.set_xlabel("seconds into the run")
            ax.set_ylabel("latency (ms, log)")
            ax.set_title(f"{CORPUS_LABEL.get(corpus, corpus)}: cascowfs latency over the "
                         f"{mix['ops']}-op MCTS mix ({mix['agents']} agents)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(markerscale=5, fontsize=8)
            fig.tight_layout()
            fn = f"{corpus}-drift.png"
            fig.savefig(img / fn, dpi=90)
            plt.close(fig)
            figs.append(f"{rel}/{fn}")
    return made


# -- tables -----------------------------------------------------------------------------------
def fs_line(fs: dict | None) -> str:
    if not fs:
        return "—"
    j = " journaled" if fs.get("journal") else ""
    return (f"{fs.get('fstype')}{j} on {fs.get('source')} ({fs.get('backing', '')}; "
            f"{fs.get('size_gb')} GB; `{fs.get('options')}`)")


def machine_table(m: dict, last_started: str) -> list[str]:
    root = m.get("root_fs", {})
    return [
        "| | |", "|---|---|",
        f"| CPU | {m.get('cpu')}, {m.get('cores')} cores |",
        f"| memory | {m.get('memory_gb')} GiB |",
        f"| kernel | {m.get('kernel')} (Firecracker micro-VM) |",
        f"| Python | {m.get('python')} |",
        f"| `/` | {root.get('fstype')} on {root.get('source')}, `{root.get('options')}` — "
        "no journal; **not used** for any figure |",
        f"| last run started | {last_started} UTC (every run is listed under *Commands*) |",
    ]


def mix_table(d: dict, key: str) -> list[str]:
    rows = ["| system | ops | wall | op | n | P50 ms | P95 ms | P99 ms | max ms | ops/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("cascowfs",) + PEER_ORDER:
        s = d["systems"].get(name)
        if not s:
            continue
        if key not in s:
            why = s.get("skipped") or (s.get("failed") or "").splitlines()[0:1]
            if why:
                rows.append(f"| {name} | — | — | *{'skipped' if 'skipped' in s else 'failed'}: "
                            f"{why if isinstance(why, str) else why[0]}* | | | | | | |")
            continue
        m = s[key]
        first = True
        for op in OPS:
            o = m["ops_detail"][op]
            if not o["n"]:
                continue
            lead = (f"| **{name}** | {m['ops']} ({m['error_count']} errors) | "
                    f"{m['wall_s']:.1f} s") if first else "| | |"
            rows.append(f"{lead} | {op} | {o['n']} | {ms(o['p50'])} | {ms(o['p95'])} | "
                        f"{ms(o['p99'])} | {ms(o['max'])} | {o['throughput_ops_s']:.1f} |")
            first = False
        if m["error_count"]:
            rows.append(f"| | | | *{m['error_count']} failed ops; first: "
                        f"{m['errors'][0][:160].replace('|', '/')}…* | | | | | | |")
    return rows


def ratio_table(d: dict, key: str) -> list[str]:
    c = (d["systems"].get("cascowfs") or {}).get(key)
    if not c:
        return ["*(no cascowfs figures for this run)*"]
    peers = [p for p in PEER_ORDER if key in (d["systems"].get(p) or {})]
    broken = [p for p in peers if d["systems"][p][key]["error_count"]
              > 0.05 * max(1, d["systems"][p][key]["ops"])]
    peers = [p for p in peers if p not in broken]
    if not peers:
        return ["*(no peer completed this run without errors)*"]
    rows = [f"*Left out (more than 5% of their ops failed, see above): {', '.join(broken)}.*",
            ""] if broken else []
    rows += ["| op | " + " | ".join(f"÷ {p} P50 | ÷ {p} P95" for p in peers) + " |",
            "|---|" + "---|---|" * len(peers)]
    for op in OPS:
        co = c["ops_detail"][op]
        cells = []
        for p in peers:
            po = d["systems"][p][key]["ops_detail"][op]
            cells += [ratio(co["p50"], po["p50"]), ratio(co["p95"], po["p95"])]
        rows.append(f"| {op} | " + " | ".join(cells) + " |")
    return rows


def _import_includes_start(s: dict) -> bool:
    """Runs before the import was timed apart from the daemon's start (``import_after_start``)
    timed both: cascowfs's mount (0.4–0.5 s) counted against its import, the peers' did not."""
    return s.get("system") == "cascowfs" and not s.get("import_after_start")


def import_table(d: dict) -> list[str]:
    rows = ["| system | import (cold cache) | MB/s | space after import | space after the runs |",
            "|---|---|---|---|---|"]
    for name in ("cascowfs",) + PEER_ORDER:
        s = d["systems"].get(name)
        if not s or "import_s" not in s:
            continue
        after = s.get("storage_after_mix", s.get("storage_after_seq"))
        if name == "btrfs":  # older runs: storage() was the whole fs (with the src copy)
            imp, after = (s.get("fs_used_after_import"),
                          s.get("fs_used_after_mix", s.get("fs_used_after_seq")))
            rows.append(f"| {name} | {s['import_s']:.2f} s | {s['import_mb_s']:.0f} | "
                        f"{mb(imp)} | {mb(after)} |")
            continue
        with_start = " (with the daemon's start)" if _import_includes_start(s) else ""
        rows.append(f"| {name} | {s['import_s']:.2f} s{with_start} | {s['import_mb_s']:.0f} | "
                    f"{mb(s.get('storage_after_import'))} | {mb(after)} |")
    return rows


def read_table(rp: dict) -> list[str]:
    if not rp or "tests" not in rp:
        return [f"*not run: {(rp or {}).get('skipped', 'not requested')}*"]
    places = []
    for row in rp["tests"].values():
        for p in row:
            if p not in places:
                places.append(p)
    rows = ["| test | " + " | ".join(f"{p} cold / warm" for p in places) + " |",
            "|---|" + "---|" * len(places)]
    for test, row in rp["tests"].items():
        cells = []
        for p in places:
            v = row.get(p)
            if not v:
                cells.append("—")
                continue
            cells.append(f"{dur(v['cold'])} / {dur(v['warm'])}" if p == "native ext4" else
                         f"{dur(v['cold'])} / {dur(v['warm'])} "
                         f"(**{v['cold_ratio']:.2f}× / {v['warm_ratio']:.2f}×**)")
        rows.append(f"| {test.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(f"{rp.get('repeat')} runs of each (compileall: "
                f"{rp.get('compile_repeat', 1)}), every warm run right after its cold one; cold = "
                "median, warm = best run (another session's drop_caches or I/O burst can make a "
                "warm run cold on this shared machine); ratios are to native ext4.")
    if "discard_after_full_read_s" in rp:
        rows.append(f"Discard of the branch after all of the above read the whole tree: "
                    f"{ms(rp['discard_after_full_read_s'])} ms (bare overlay umount after the "
                    f"same: {ms(rp.get('floor_umount_after_full_read_s'))} ms).")
    return rows


# -- must lines -------------------------------------------------------------------------------
def normalize_read_path(data: dict[str, dict]) -> None:
    """Warm = the best of the repeats, cold = their median. The machine is shared: another
    session's drop_caches or I/O burst can turn one warm run cold, and the best of N is the
    figure such interference cannot inflate (a cold run has no such floor, so its median)."""
    import statistics

    for d in data.values():
        rp = d.get("read_path") or {}
        for row in (rp.get("tests") or {}).values():
            for v in row.values():
                if v.get("warm_all"):
                    v["warm"] = min(v["warm_all"])
                if v.get("cold_all"):
                    v["cold"] = statistics.median(v["cold_all"])
            base = row.get("native ext4")
            if base:
                for v in row.values():
                    v["cold_ratio"] = v["cold"] / base["cold"]
                    v["warm_ratio"] = v["warm"] / base["warm"]


def cold_read_mb_s(res: dict) -> float | None:
    """How fast this run's disk read the corpus cold (read path: every file, native ext4): the
    ceiling of any import, which has to read it all."""
    tests = (res.get("read_path") or {}).get("tests") or {}
    row = next((v for t, v in tests.items() if t.startswith("read every file")), None)
    native = (row or {}).get("native ext4") or {}
    if not native.get("cold"):
        return None
    return res["corpus"]["bytes"] / 1e6 / native["cold"]


def must_lines(data: dict[str, dict]) -> list[str]:
    rows = ["| SPEC §6 line | must | measured (corpus, run) | verdict |", "|---|---|---|---|"]

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("**met**" if ok else "**MISSED**")

    def best_corpus(pref: tuple[str, ...] = ("linux", "django")) -> list[str]:
        """The preferred corpora present; the synthetic smoke corpus only when none is."""
        return [c for c in pref if c in data] or [c for c in data if c == "synthetic"]

    def op_line(what: str, op: str, limit: float, want_corpus: tuple[str, ...]) -> None:
        found = False
        for corpus in best_corpus(want_corpus):
            c = (data[corpus]["systems"].get("cascowfs") or {}).get("seq")
            if not c or not c["ops_detail"][op]["n"]:
                continue
            p95 = c["ops_detail"][op]["p95"]
            rows.append(f"| {what} | P95 < {limit*1e3:.0f} ms | P95 {ms(p95)} ms "
                        f"({corpus}, single agent, n={c['ops_detail'][op]['n']}) | "
                        f"{verdict(p95 < limit)} |")
            found = True
        if not found:
            rows.append(f"| {what} | P95 < {limit*1e3:.0f} ms | — | {verdict(None)} |")

    op_line("create branch (file calls, end to end)", "branch", 0.020, ("linux", "django"))
    op_line("discard branch", "discard", 0.020, ("linux", "django"))
    commit_corpora = ("linux",) if "linux" in data else ("django",)
    op_line("commit of an agent-size edit on an 80k-file tree"
            + ("" if "linux" in data else " (*80k tree not run: Django tree shown*)"),
            "commit", 0.050, commit_corpora)
    for corpus in commit_corpora:
        c = ((data.get(corpus) or {}).get("growth") or {}).get("cascowfs")
        if isinstance(c, dict) and c.get("commit", {}).get("n"):
            p95 = c["commit"]["p95"]
            rows.append(f"| … the same, in a deep lineage (the chain growth run: "
                        f"{c['commit']['n']} commits of 1–3 files in a row) | P95 < 50 ms | "
                        f"P95 {ms(p95)} ms, max {ms(c['commit']['max'])} ms ({corpus}, single "
                        f"agent) | {verdict(p95 < 0.050)} |")
    op_line("prune", "prune", 0.050, ("linux", "django"))
    for corpus in best_corpus(("linux", "django")):
        c = (data[corpus]["systems"].get("cascowfs") or {}).get("mix")
        if not c:
            continue
        worst = max((c["ops_detail"][op]["p95"], op) for op in OPS if c["ops_detail"][op]["n"])
        dr = c.get("drift_p95") or {}
        drifts = []
        for op, xs in dr.items():
            xs = [x for x in xs if x == x]
            if len(xs) >= 6:  # median of the last three tenths over the first three
                a, b = sorted(xs[:3])[1], sorted(xs[-3:])[1]
                drifts.append((b / a, op))
        wd = max(drifts) if drifts else (float("nan"), "?")
        ok = worst[0] < 0.050 and (not drifts or wd[0] <= DRIFT_LIMIT)
        rows.append(f"| MCTS mix, {c['agents']} concurrent agents, {c['ops']} ops | every op "
                    f"P95 < 50 ms, no drift | worst P95 {ms(worst[0])} ms ({worst[1]}); drift "
                    f"≤ {wd[0]:.2f}× ({wd[1]}) ({corpus}) | "
                    f"{verdict(ok)} |")
    for corpus in best_corpus(("linux", "django")):
        rp = data[corpus].get("read_path") or {}
        if "tests" not in rp:
            continue
        worst = max((max(v["cascowfs branch"]["cold_ratio"], v["cascowfs branch"]["warm_ratio"]),
                     t) for t, v in rp["tests"].items() if "cascowfs branch" in v)
        rows.append(f"| reading and stat-walking unchanged files in a branch | ≤ 1.3× native "
                    f"ext4 | worst {worst[0]:.2f}× ({worst[1].replace('|', chr(92) + '|')}; {corpus}, cold and warm) | "
                    f"{verdict(worst[0] <= 1.3)} |")
    imp = [(corpus, data[corpus]["systems"]["cascowfs"]) for corpus in best_corpus()
           if "import_mb_s" in (data[corpus]["systems"].get("cascowfs") or {})]
    if imp:
        corpus, s = imp[0]
        note = "" if corpus == "linux" else " (*1 GB tree not run*)"
        disk = cold_read_mb_s(data[corpus])
        copy = (data[corpus]["systems"].get("cp") or {}).get("import_mb_s")
        than_disk = (f"; one `cat` process reads the same tree cold at {disk:.0f} MB/s" if disk else "") + \
                    (f"; `cp -a` copies it at {copy:.0f} MB/s" if copy else "")
        rows.append(f"| import of a 1 GB / 80k-file tree | ≥ 100 MB/s | "
                    f"{s['import_mb_s']:.0f} MB/s ({corpus}{note}, cold cache, `import` via ctl"
                    f"{' and the daemon start' if _import_includes_start(s) else ''}{than_disk}) "
                    f"| {verdict(s['import_mb_s'] >= 100) if corpus == 'linux' else verdict(None)} |")
    else:
        rows.append("| import of a 1 GB / 80k-file tree | ≥ 100 MB/s | — | not measured |")
    grown = []
    for corpus in best_corpus():
        g = data[corpus].get("growth") or {}
        for key in ("cascowfs", "cascowfs-wide"):
            c = g.get(key)
            if isinstance(c, dict) and "ratio_to_one_copy" in c:
                n = c.get("snapshots", g.get("snapshots"))
                grown.append((corpus, key, n, c))
    if grown:
        # The line speaks of an 80k-file tree: L. A small tree's ratio is mostly the per-snapshot
        # cost over a tiny copy; it is shown, not judged (as with import).
        cells = "; ".join(f"{c['ratio_to_one_copy']:.2f}× ({'chain' if k == 'cascowfs' else 'wide'}"
                          f", {n} snapshots, {corpus}"
                          f"{'' if corpus in ('linux', 'synthetic') else ', not an 80k-file tree: not judged'})"
                          for corpus, k, n, c in grown)
        full = [c for corpus, k, n, c in grown if n >= 1000 and corpus == "linux"]
        v = verdict(all(c["ratio_to_one_copy"] <= 1.3 for c in full)) if full else verdict(None)
        rows.append(f"| store size, 1,000 snapshots of an 80k-file tree, small edits | ≤ 1.3× "
                    f"one copy | {cells} | {v} |")
    else:
        rows.append("| store size, 1,000 snapshots | ≤ 1.3× one copy | — | not measured |")
    mounts = [(corpus, data[corpus]["mount"]) for corpus in best_corpus()
              if "mount_clean_s" in (data[corpus].get("mount") or {})]
    if mounts:
        corpus, m = mounts[0]
        worst = max(m["mount_clean_s"] + m["mount_after_kill9_s"])
        full = m["snapshots"] >= 10000 and m["branches"] >= 100
        rows.append(f"| mount with 10k snapshots and 100 live branches, WAL replay included | "
                    f"< 1 s | worst {ms(worst)} ms of {len(m['mount_clean_s'])} clean + "
                    f"{len(m['mount_after_kill9_s'])} after kill -9 ({m['snapshots']} snapshots, "
                    f"{m['branches']} branches, {corpus}) | "
                    f"{verdict(worst < 1.0) if full else verdict(None)} |")
    else:
        rows.append("| mount with 10k snapshots and 100 live branches | < 1 s | — | not measured |")
    return rows


# -- the document -----------------------------------------------------------------------------
def ctl_open_text(data: dict[str, dict]) -> str:
    """How the cascowfs agents of these runs opened ctl (``--ctl-open``; runs from before the
    option opened it for every command)."""
    modes = sorted({(run.get("config") or {}).get("ctl_open", "per-command")
                    for d in data.values() for run in d["runs"]
                    if "cascowfs" in (run.get("config") or {}).get("systems", "").split(",")})
    text = {"per-agent": "each agent opens `MNT/ctl` once and keeps it, as `cascowfs.client` "
                         "does (`--ctl-open per-agent`)",
            "per-command": "every op opens `MNT/ctl` afresh, as `echo CMD > MNT/ctl` in a shell "
                           "does (`--ctl-open per-command`)"}
    return "; ".join(text[m] for m in modes) or text["per-agent"]


def document(data: dict[str, dict], figs: dict[str, list[str]], notes: str | None,
             sources: list[str]) -> str:
    out: list[str] = ["# Benchmarks", ""]
    out += ["*Generated by `tools/bench_report.py` from " + ", ".join(f"`{s}`" for s in sources)
            + "; do not edit by hand (notes come from `tools/bench_notes.md`).*", ""]
    first = next(iter(data.values()))
    last_started = max((r.get("started") or "" for c in data.values() for r in c["runs"]),
                       default="?")
    out += ["## Machine and filesystems", ""] + machine_table(first.get("machine", {}),
                                                              last_started) + [""]
    out += ["Every store, peer and native baseline ran on its **own fresh loop-mounted "
            "filesystem** made by `tools/benchfs.py` (sparse image on `/`, loop device with "
            "direct I/O, `mkfs.ext4 -O has_journal -E lazy_itable_init=0,lazy_journal_init=0`, "
            "mounted `noatime`; `mkfs.btrfs` for the btrfs peer), torn down afterwards. `/` "
            "itself (ext4 without a journal, slow to create files after a big delete) is never "
            "measured.", ""]
    for corpus in [c for c in CORPUS_ORDER if c in data] + [c for c in data
                                                             if c not in CORPUS_ORDER]:
        d = data[corpus]
        ci = d.get("corpus", {})
        fs = (d["systems"].get("cascowfs") or {}).get("fs")
        fsb = (d["systems"].get("btrfs") or {}).get("fs")
        out += [f"Corpus **{corpus}** ({CORPUS_LABEL.get(corpus, ci.get('source'))}): "
                f"{ci.get('entries'):,} entries, {ci.get('files'):,} files, "
                f"{ci.get('bytes', 0)/1e6:,.0f} MB — {ci.get('source')}. "
                f"ext4: {fs_line(fs)}; btrfs: {fs_line(fsb)}.", ""]
    out += ["## SPEC §6 acceptance lines", ""] + must_lines(data) + [""]
    out += ["Single-agent figures (one agent, ops one after another) are the ones the per-op "
            "lines speak of; the MCTS-mix line uses the concurrent run. \"No drift\" is read as: "
            "for every op, the median of its P95 over the last three tenths of the run is at "
            f"most {DRIFT_LIMIT}× the same over the first three tenths.", ""]
    if notes:
        out += [notes.strip(), ""]
    out += ["## Method", "",
            "`tools/bench_mcts.py` runs every system on a fresh scratch filesystem, copies the "
            "corpus there (`src/`), starts the system (cascowfs: mounts the store; the start is "
            "timed by the growth run's mount figures), drops caches, imports the copy as "
            "snapshot `base` (timed), then "
            "replays the same seeded tree-search script:", "",
            "* an agent picks a snapshot from its frontier (mostly among its 4 newest), "
            "**branches** 2–4 copies, applies an agent-size edit to each (1–5 small source "
            "edits; 30% a new file; 10% a delete; 10% a rename; 3% a 256 KiB–1 MiB generated "
            "file; never more than 20 files or 1 MiB), **commits** one (15%: two, 20%: none) "
            "with labels, **discards** every branch, and **prunes** its oldest snapshots beyond "
            "six;",
            "* decisions and edits come from a per-agent seeded RNG, so every system replays "
            "exactly the same script; git and cp, which are slow, replay a prefix of it;",
            "* *single agent*: one agent alone (the per-op SPEC lines); *MCTS mix*: N agents "
            "(processes) started together on the same store;",
            "* an op's latency is wall time from the first file call to the return of the last "
            "one the agent needs before it can use the result.", "",
            "How each system does each op:", "",
            "| system | branch | commit | discard | prune |", "|---|---|---|---|---|",
            f"| cascowfs ({ctl_open_text(data)}: a `write` of the command, its reply line read "
            "back from the same open file; each open gets a lane of its own, so the agents' "
            "commands run side by side) | `branch N ID` (the reply is the tree's path) | "
            "`commit N ID reward=… agent=…` | `discard N` | `prune ID` |",
            "| bare overlayfs (floor) | 3×mkdir + mount(2) of the snapshot's layer chain "
            "(`volatile`) | `cp -a upper` as a new layer (no CAS, no WAL; flattened beyond 400 "
            "layers) | umount2(2) + rm -rf of the upper | rm -rf of layers no chain uses |",
            "| btrfs | `btrfs subvolume snapshot` | `btrfs subvolume snapshot -r` | "
            "`btrfs subvolume delete` | `btrfs subvolume delete` |",
            "| git | `git worktree add --detach` | `git add -A -f` + `git commit` + `update-ref` | "
            "`git worktree remove --force` | `git update-ref -d` |",
            "| cp | `cp -a` | `cp -a` | `rm -rf` | `rm -rf` |", "",
            "Read path: a cascowfs branch of `base` against the plain ext4 copy it was imported "
            "from, a bare overlay over that copy, and the FUSE view `MNT/snapshots/base`; cold "
            "= after `sync; echo 3 > /proc/sys/vm/drop_caches`, warm = immediately after. "
            "Growth, *chain*: one branch, N commits in a row of 1–3 small edits each, space used sampled on the "
            "way (cascowfs: allocated blocks below the store, never crossing into a mount; btrfs: "
            "filesystem blocks used beyond the source copy); *wide*: N branches of base with "
            "one small edit each, committed and discarded. Mount: N commits (8 in a row per "
            "branch of base), then B live branches on random snapshots, then `cascowfs umount` (branches stay mounted) + "
            "`cascowfs mount --background` until `MNT/ctl` answers, three times, then three "
            "times after `kill -9` of the daemon (dead mount cleared, WAL replayed).", "",
            "Set-up, once: `EXTRAS=bench bash tools/install.sh` (py-spy and matplotlib on top of "
            "the usual install), then `.venv/bin/python tools/fetch_corpus.py django linux` "
            "(downloads into `bench-data/`, cached). Commands of the runs behind this page:", ""]
    for corpus, d in data.items():
        for r in d.get("runs", []):
            argv = r.get("argv") or []
            pv = r.get("product") or {}
            ver = (f"; cascowfs at {pv.get('head')}{' + local changes' if pv.get('cascowfs_dirty') else ''}"
                   f" (sources {pv.get('sources_sha256')})") if pv else \
                "; cascowfs version not recorded (runs before 12:09; where a later run measured cascowfs, its figures replace these)"
            out.append(f"* {corpus}: `.venv/bin/python {shlex.join(argv)}` "
                       f"({r.get('started')} – {r.get('finished') or 'unfinished'}{ver})")
    out += [f"* `.venv/bin/python tools/bench_report.py {' '.join(sources)}`", ""]
    for corpus in [c for c in CORPUS_ORDER if c in data] + [c for c in data
                                                             if c not in CORPUS_ORDER]:
        d = data[corpus]
        out += [f"## Corpus {corpus}: {CORPUS_LABEL.get(corpus, corpus)}", ""]
        for key, title in (("seq", "Single agent"), ("mix", "MCTS mix (concurrent agents)")):
            if not any(key in s for s in d["systems"].values()):
                out += [f"### {title}", "", "*not run for this corpus*", ""]
                continue
            out += [f"### {title}", ""] + mix_table(d, key) + [""]
            loads = [(n, s[key]) for n, s in d["systems"].items()
                     if key in s and s[key].get("loadavg_1m_before_after")]
            if loads:
                out += ["Machine load while each system ran (1-minute load average before → "
                        "after; other busy processes seen at the end): " + "; ".join(
                            f"{n} {m['loadavg_1m_before_after'][0]:.1f} → "
                            f"{m['loadavg_1m_before_after'][1]:.1f}"
                            + (f" ({len(m.get('other_busy_processes') or [])} foreign: "
                               + ", ".join(f"`{p[:40]}`" for p in m['other_busy_processes'][:2])
                               + ")" if m.get("other_busy_processes") else "")
                            for n, m in loads) + ".", ""]
            out += [f"cascowfs latency as a ratio to each peer ({title}; < 1 means "
                    "cascowfs is faster):", ""] + ratio_table(d, key) + [""]
        for f in figs.get(corpus, []):
            if "latency" in f:
                out += [f"![latency CDFs]({f})", ""]
        out += ["### Import and space", ""] + import_table(d) + [""]
        out += ["Space: cascowfs = allocated blocks below the store (CAS, LMDB, native layers, "
                "branch uppers); btrfs = filesystem blocks used beyond the source copy; others = "
                "allocated blocks below their directory (hard links once). \"After the runs\" "
                "holds the snapshots still live at the end (each agent keeps up to six).", ""]
        out += ["### Read path", ""] + read_table(d.get("read_path")) + [""]
        g = d.get("growth") or {}
        out += ["### Growth", ""]
        if any(isinstance(g.get(k), dict) for k in GROWTH_KEYS):
            out += ["| system | shape | snapshots | space | one copy | ratio | commit P50 / P95 ms "
                    "| space by part (cascowfs) |", "|---|---|---|---|---|---|---|---|"]
            for key in GROWTH_KEYS:
                s = g.get(key)
                name = key.split("-")[0]
                shape = "wide (each from base)" if key.endswith("-wide") else "chain (one lineage)"
                if isinstance(s, dict) and "final_storage" in s:
                    parts = ""
                    if s.get("breakdown"):
                        i, bd = s["breakdown"][-1]
                        parts = ", ".join(f"{k} {mb(v)}" for k, v in bd.items()
                                          if k != "layer_count" and v > 1e6)
                        parts += f"; {bd.get('layer_count')} layer dirs (at {i})"
                    if s.get("failed"):
                        parts += f" — stopped: {s['failed']}"
                    out.append(f"| {name} | {shape} | {s.get('snapshots', g.get('snapshots'))} | "
                               f"{mb(s['final_storage'])} | {mb(s['one_copy_bytes'])} | "
                               f"{s['ratio_to_one_copy']:.2f}× | {ms(s['commit']['p50'])} / "
                               f"{ms(s['commit']['p95'])} | {parts} |")
                elif isinstance(s, dict):
                    out.append(f"| {name} | {shape} | skipped: {s.get('skipped')} | | | | | |")
            c = g.get("cascowfs") or {}
            if c.get("commit_drift_p95"):
                out += ["", "cascowfs commit P95 per tenth of the chain growth run (ms): "
                        + ", ".join(ms(x) for x in c["commit_drift_p95"])]
            out.append("")
            for f in figs.get(corpus, []):
                if "growth" in f:
                    out += [f"![store size vs snapshots]({f})", ""]
        else:
            out += ["*not run for this corpus*", ""]
        m = d.get("mount") or {}
        out += ["### Mount time", ""]
        if "mount_clean_s" in m:
            out += [f"Store with {m['snapshots']:,} snapshots and {m['branches']} live branches "
                    f"({mb(m.get('store_bytes'))}; built in {m.get('build_s', 0):.0f} s):", "",
                    "| | run 1 | run 2 | run 3 |", "|---|---|---|---|",
                    "| mount after clean umount (ms) | "
                    + " | ".join(ms(x) for x in m["mount_clean_s"]) + " |",
                    "| mount after kill -9, WAL replay (ms) | "
                    + " | ".join(ms(x) for x in m["mount_after_kill9_s"]) + " |", ""]
        else:
            out += ["*not run for this corpus*", ""]
        mix = (d["systems"].get("cascowfs") or {}).get("mix")
        if mix and mix.get("drift_p95"):
            out += ["### Drift over the MCTS mix", "",
                    "cascowfs P95 (ms) per tenth of the run:", "",
                    "| op | " + " | ".join(str(i + 1) for i in range(10)) + " |",
                    "|---|" + "---|" * 10]
            for op, xs in mix["drift_p95"].items():
                out.append(f"| {op} | " + " | ".join(ms(x) for x in xs) + " |")
            out.append("")
            for f in figs.get(corpus, []):
                if "drift" in f:
                    out += [f"![latency over time]({f})", ""]
        prof = (d["systems"].get("cascowfs") or {}).get("profile") or {}
        summ = prof.get("summary") or {}
        if summ.get("samples"):
            out += ["### Where the daemon's time goes (py-spy, a second run of "
                    f"{prof.get('ops')} ops, {prof.get('agents', '?')} agent(s))", "",
                    f"{summ['samples']:,} samples of every daemon thread; "
                    f"{summ.get('busy', summ['samples']):,} of them busy (not a thread waiting "
                    "for work; blocking calls such as fsync and lock waits count as busy). "
                    "cascowfs functions by inclusive busy samples (line numbers of the engine "
                    "version that ran):", "",
                    "| function | inclusive | share of busy | self | share of busy |",
                    "|---|---|---|---|---|"]
            busy = summ.get("busy") or summ["samples"]
            selfs = dict(summ.get("self") or [])
            for fn, n in summ["inclusive"][:18]:
                sn = selfs.get(fn, 0)
                out.append(f"| `{fn.replace('|', '/')}` | {n:,} | {100 * n / busy:.1f}% | "
                           f"{sn:,} | {100 * sn / busy:.1f}% |")
            out.append("")
    out += ["## Runs not done (as detected from the result files)", ""]
    missing = []
    if "linux" not in data:
        missing.append("* the large corpus (L = linux-source-6.1): not run in this session; "
                       "the 80k-file lines of SPEC §6 are therefore marked not measured.")
    for corpus, d in data.items():
        for name in ("cascowfs",) + PEER_ORDER:
            s = d["systems"].get(name) or {}
            if "skipped" in s:
                missing.append(f"* {corpus} / {name}: skipped — {s['skipped']}")
            elif "failed" in s:
                missing.append(f"* {corpus} / {name}: failed — {s['failed'].splitlines()[0]}")
        if not any(isinstance((d.get("growth") or {}).get(k), dict) for k in GROWTH_KEYS):
            missing.append(f"* {corpus}: growth run not requested")
        if "mount_clean_s" not in (d.get("mount") or {}):
            missing.append(f"* {corpus}: mount-time run not requested")
    out += (missing or ["*none*"]) + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--img", default=None, help="default: <doc dir>/img")
    ap.add_argument("--notes", default=str(REPO / "tools" / "bench_notes.md"))
    args = ap.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.results]
    data = merge(results)
    normalize_read_path(data)
    doc = Path(args.doc)
    img = Path(args.img) if args.img else doc.parent / "img"
    rel = os.path.relpath(img, doc.parent)
    figs = plots(data, img, rel)
    notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else None
    sources = [os.path.relpath(p, REPO) if os.path.abspath(p).startswith(str(REPO)) else p
               for p in args.results]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(document(data, figs, notes, sources) + "\n")
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
