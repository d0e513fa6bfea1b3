"""Turn ``tools/bench_mcts.py`` results into ``docs/benchmarks.md`` and PNG plots.

Usage::

    .venv/bin/python tools/bench_report.py bench-results/django.json bench-results/linux.json \\
        [--doc docs/benchmarks.md] [--img docs/img] [--notes tools/bench_notes.md] \\
        [--extra docs/benchmarks.extra]

Several result files of one corpus are merged (later files win, section by section and system
by system), so a run can be completed by a second, partial one. Every cascowfs latency is given
as a ratio to each peer, and every target line (``targets.py``: its must and its aim) is
marked met or missed. ``document`` assembles the page from one function per section; the
hand-written sections in ``--extra`` (one Markdown file each) follow it, in file name order.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
from datetime import datetime
from pathlib import Path

from .host import REPO
from .plots import plots
from .results import (
    CORPUS_LABEL,
    CORPUS_PROSE,
    GROWTH_KEYS,
    PEER_ORDER,
    corpora_in_order,
    merge,
    normalize_read_path,
)
from .snapshot_read import report_lines as snapshot_read_lines
from .tables import (
    import_table,
    machine_table,
    mb,
    mix_table,
    mostly_failed,
    ms,
    ratio_table,
    read_table,
)
from .targets import (
    DRIFT_LIMIT,
    PEER_REFERENCE,
    current_figures,
    short,
    targets_table,
)

SPACE_NOTE = (
    "Space: cascowfs = allocated blocks below the store (CAS, LMDB, native layers, "
    "branch uppers); btrfs = filesystem blocks used beyond the source copy; others = "
    "allocated blocks below their directory (hard links once)."
)
RUN_TITLES = (("seq", "Single agent"), ("mix", "MCTS mix (concurrent agents)"))
WIDTH = 100  # the command lines' width in "How to reproduce"
PROSE_WIDTH = 95


def ctl_open_text(data: dict[str, dict]) -> str:
    """How the cascowfs agents of these runs opened ctl (``--ctl-open``; runs from before the
    option opened it for every command)."""
    modes = sorted(
        {
            (run.get("config") or {}).get("ctl_open", "per-command")
            for d in data.values()
            for run in d["runs"]
            if "cascowfs" in (run.get("config") or {}).get("systems", "").split(",")
        }
    )
    text = {
        "per-agent": "each agent opens `MNT/ctl` once and keeps it (`--ctl-open per-agent`), "
        "its labels going through a second, write-only open whose replies it does not read",
        "per-command": "every op opens `MNT/ctl` afresh, as `cascowfs.Client` and `echo CMD > "
        "MNT/ctl` in a shell do (`--ctl-open per-command`)",
    }
    return "; ".join(text[m] for m in modes) or text["per-agent"]


def document(
    data: dict[str, dict], figs: dict[str, list[str]], notes: str | None, sources: list[str]
) -> str:
    out = (
        wrap_prose(_intro(data) + _targets(data) + _peers(data))
        + _current(data, notes)
        + wrap_prose(_reproduce(data, sources) + _method() + _machine(data))
    )
    for corpus in corpora_in_order(data):
        d = data[corpus]
        corpus_figs = figs.get(corpus, [])
        out += [f"## Corpus {corpus}: {CORPUS_LABEL.get(corpus, corpus)}", ""]
        out += _runs(d, corpus_figs) + _import_and_read(d) + _growth(d, corpus_figs)
        out += _mount(d) + _drift(d, corpus_figs)
    return "\n".join(out + wrap_prose(_not_done(data))).rstrip("\n") + "\n"


def wrap_prose(lines: list[str]) -> list[str]:
    """Paragraphs and bullets wrapped at ``PROSE_WIDTH`` columns; headings, tables, images and
    code blocks as they are."""
    out: list[str] = []
    in_code = False
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        if in_code or line.startswith(("```", "#", "|", "![")) or len(line) <= PROSE_WIDTH:
            out.append(line)
            continue
        indent = "  " if line.startswith("* ") else ""
        out += textwrap.wrap(
            line,
            PROSE_WIDTH,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return out


def with_extra_sections(page: str, folder: Path) -> str:
    """``page`` followed by the hand-written sections: every ``*.md`` file in ``folder``, in
    file name order, each as it is."""
    parts = [page.rstrip("\n")]
    if folder.is_dir():
        parts += [f.read_text().strip("\n") for f in sorted(folder.glob("*.md"))]
    return "\n\n".join(parts) + "\n"


def _runs_in_order(data: dict[str, dict]) -> list[tuple[str, dict]]:
    return sorted(
        ((c, r) for c, d in data.items() for r in d["runs"]),
        key=lambda cr: cr[1].get("started") or "",
    )


def _engine(data: dict[str, dict]) -> tuple[str, str]:
    """The engine version behind the figures (that of the first run), and a note naming the
    runs made at another commit, with whether their engine sources differ."""
    known = [
        (c, r, r["product"])
        for c, r in _runs_in_order(data)
        if (r.get("product") or {}).get("head")
    ]
    if not known:
        return "an engine version the runs did not record", ""
    first = known[0][2]
    others: dict[str, list[str]] = {}
    for corpus, run, pv in known:
        if _version(pv) == _version(first):
            continue
        whole_corpus = all(_version(p) == _version(pv) for c, _, p in known if c == corpus)
        who = short(corpus) if whole_corpus else f"{short(corpus)} {_run_label(run)}"
        same = (
            "with the same engine sources"
            if pv.get("sources_sha256") == first.get("sources_sha256")
            else f"engine sources {pv.get('sources_sha256')}"
        )
        runs = others.setdefault(f"at {_version(pv)}, {same}", [])
        if who not in runs:
            runs.append(who)
    note = "; ".join(f"the {' and '.join(who)} runs {where}" for where, who in others.items())
    return _version(first), note


def _version(product: dict) -> str:
    return product["head"] + (" + local changes" if product.get("cascowfs_dirty") else "")


def _run_label(run: dict) -> str:
    systems = ((run.get("config") or {}).get("systems") or "").split(",")
    if systems == ["cascowfs"]:
        return "cascowfs"
    return "cascowfs and peers" if "cascowfs" in systems else "peers"


def _intro(data: dict[str, dict]) -> list[str]:
    dates = sorted({(r.get("started") or "?")[:10] for _, r in _runs_in_order(data)})
    engine, _ = _engine(data)
    return [
        "# Benchmarks",
        "",
        "What cascowfs must and aims to achieve, how it compares with the peers an agent "
        "could use instead (a bare overlayfs mount, btrfs snapshots, git worktrees, "
        "`cp -a`), and how to measure it again. The figures are those of the latest run "
        f"({', '.join(dates)}, engine at {engine}); the raw results are in "
        "`bench-results/`, the history of runs and the analyses behind the design in "
        "[CHANGELOG.md](../CHANGELOG.md) and "
        "[bench-results/NOTES.md](../bench-results/NOTES.md).",
        "",
    ]


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _targets(data: dict[str, dict]) -> list[str]:
    out = (
        [
            "## Targets",
            "",
            "Measured on the development machine (2 cores, ext4 on virtio) as P50/P95/P99. "
            '"Must" is the acceptance line; "aim" is where cascowfs intends to be: ahead of '
            "btrfs, the best peer, and near the floor (overlay mount(2) 0.2 ms, fdatasync "
            "0.1–0.3 ms).",
            "",
        ]
        + targets_table()
        + [""]
    )
    corpora = []
    for corpus in corpora_in_order(data):
        ci = data[corpus].get("corpus") or {}
        what = CORPUS_PROSE.get(corpus, ci.get("source"))
        entries = ci.get("entries", 0)
        count = f"{entries / 1000:.0f}k" if entries >= 1000 else str(entries)
        corpora.append(
            f"**{short(corpus)}** = {what} ({count} entries, {_size(ci.get('bytes', 0))})"
        )
    out += [
        f'"No drift": for every op, the median of its P95 over the last three tenths of '
        f"the run is at most {DRIFT_LIMIT}× the same over the first three tenths. The "
        "corpora (fetched by `tools/fetch_corpus.py`): " + ", ".join(corpora) + ". The "
        "per-op lines are judged on the single-agent run (one agent, ops one after "
        "another), the mix line on the concurrent run.",
        "",
    ]
    return out


def _peers(data: dict[str, dict]) -> list[str]:
    return (
        [
            "## Peers",
            "",
            "Reference medians measured on this machine class (ext4 on a loop device), before "
            "any cascowfs run; every benchmark run measures the peers again, side by side on "
            "the same data:",
            "",
        ]
        + PEER_REFERENCE
        + [
            "",
            "How each system does each op in the benchmark:",
            "",
            "| system | branch | commit | discard | prune |",
            "|---|---|---|---|---|",
            f"| cascowfs ({ctl_open_text(data)}: a `write` of the command, its reply read "
            "back from the same open file) | `branch N ID` (the reply is the tree's path) | "
            "`commit N ID reward=… agent=…` | `discard N` | `prune ID` |",
            "| bare overlayfs (floor) | 3×mkdir + mount(2) of the snapshot's layer chain "
            "(`volatile`) | `cp -a upper` as a new layer (no CAS, no WAL; flattened beyond 400 "
            "layers) | umount2(2) + rm -rf of the upper | rm -rf of layers no chain uses |",
            "| btrfs | `btrfs subvolume snapshot` | `btrfs subvolume snapshot -r` | "
            "`btrfs subvolume delete` | `btrfs subvolume delete` |",
            "| git | `git worktree add --detach` | `git add -A -f` + `git commit` + `update-ref` | "
            "`git worktree remove --force` | `git update-ref -d` |",
            "| cp | `cp -a` | `cp -a` | `rm -rf` | `rm -rf` |",
            "",
        ]
    )


def _current(data: dict[str, dict], notes: str | None) -> list[str]:
    out = wrap_prose(
        [
            "## Current figures",
            "",
            "The latest run against the targets (L where the line speaks of an "
            "80k-file tree; both corpora otherwise):",
            "",
        ]
    ) + current_figures(data)
    out += [""]
    if notes:
        out += [notes.strip("\n"), ""]
    tables = "The tables below are the latest run's, per corpus. " + SPACE_NOTE
    if any((d["systems"].get("cascowfs") or {}).get("profile") for d in data.values()):
        tables += (
            " Where the daemon's time goes (py-spy profiles of a second mix) is in "
            "`bench-results/*-cascowfs.profile.txt`."
        )
    return out + wrap_prose([tables, ""])


def repo_relative(path: str) -> str:
    """A result path as the repository names it: the runs record absolute paths of the
    checkout they ran in."""
    p = Path(path)
    if not p.is_absolute():
        return path
    if p.is_relative_to(REPO):
        return str(p.relative_to(REPO))
    if "bench-results" in p.parts:
        i = len(p.parts) - 1 - p.parts[::-1].index("bench-results")
        return str(Path(*p.parts[i:]))
    return path


def shell_lines(words: list[str]) -> list[str]:
    """``words`` as a shell command, wrapped before an option at ``WIDTH`` columns."""
    groups: list[str] = []
    for w in words:
        if groups and not w.startswith("--") and groups[-1].startswith("--"):
            groups[-1] += " " + shlex.quote(w)
        else:
            groups.append(shlex.quote(w))
    lines = [groups[0]]
    for g in groups[1:]:
        if len(lines[-1]) + 1 + len(g) + 2 > WIDTH:
            lines[-1] += " \\"
            lines.append("    " + g)
        else:
            lines[-1] += " " + g
    return lines


def _hhmm(stamp: str | None) -> str:
    return stamp[11:16] if stamp and len(stamp) >= 16 else "?"


def _reproduce(data: dict[str, dict], sources: list[str]) -> list[str]:
    runs = _runs_in_order(data)
    out = [
        "## How to reproduce",
        "",
        "As root on a 2-core micro-VM like the one under *Machine and filesystems*:",
        "",
        "```sh",
        "EXTRAS=bench bash tools/install.sh                    # py-spy and matplotlib on top "
        "of the usual install",
        ".venv/bin/python tools/fetch_corpus.py django linux   # into bench-data/, cached",
        "# the runs behind these figures, in the order they ran:",
    ]
    for _, r in runs:
        argv = list(r.get("argv") or [])
        for i, w in enumerate(argv[:-1]):
            if w == "--out":
                argv[i + 1] = repo_relative(argv[i + 1])
        out += shell_lines([".venv/bin/python", *argv])
    out += ["# tables and plots"]
    out += shell_lines([".venv/bin/python", "tools/bench_report.py", *sources])
    out += ["```", ""]
    per_corpus: dict[str, list[str]] = {}
    for c, r in runs:
        per_corpus.setdefault(c, []).append(
            f"{_run_label(r)} {_hhmm(r.get('started'))}–{_hhmm(r.get('finished'))}"
        )
    # a run that starts before midnight and ends after it spans two dates
    stamps = [r.get(key) for _, r in runs for key in ("started", "finished")]
    dates = sorted({(stamp or "?")[:10] for stamp in stamps})
    when = (
        f"{'all on' if len(runs) > 1 else 'on'} {dates[0]}"
        if len(dates) == 1
        else f"between {dates[0]} and {dates[-1]}"
    )
    engine, note = _engine(data)
    out += [
        "Runs of the latest figures: "
        + ", ".join(f"{short(c)} " + " and ".join(labels) for c, labels in per_corpus.items())
        + f", {when} (engine {engine}"
        + (f"; {note}" if note else "")
        + ")."
    ]
    if len(runs) > len(per_corpus) and all(_span_s(data[c]["runs"]) <= 3600 for c in per_corpus):
        out[-1] += (
            " Each corpus's runs lie within one hour, so every ratio compares runs made "
            "within the same hour."
        )
    out += [
        "",
        "`tools/bench_report.py` writes this page from the result files, with "
        "`tools/bench_notes.md` (what the figures say) under the current figures. A section "
        "written by hand goes into a Markdown file of its own in `docs/benchmarks.extra/` "
        "(starting with its `## ` heading); the report appends those files after the "
        "generated part, in file name order, so regenerating the page keeps them.",
        "",
    ]
    return out


def _span_s(runs: list[dict]) -> float:
    """Seconds from the first start to the last finish of ``runs``."""
    try:
        starts = [datetime.fromisoformat(r["started"]) for r in runs]
        ends = [datetime.fromisoformat(r.get("finished") or r["started"]) for r in runs]
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return (max(ends) - min(starts)).total_seconds()


def _method() -> list[str]:
    return [
        "## Method",
        "",
        "Every store, peer and native baseline runs on its **own fresh loop-mounted "
        "filesystem** made by `tools/benchfs.py` (sparse image on `/`, loop device with "
        "direct I/O, `mkfs.ext4 -O has_journal -E lazy_itable_init=0,lazy_journal_init=0`, "
        "mounted `noatime`; `mkfs.btrfs` for the btrfs peer), torn down afterwards. `/` "
        "itself (ext4 without a journal, slow to create files after a big delete) is never "
        "measured.",
        "",
        "`tools/bench_mcts.py` copies the corpus onto the scratch filesystem (`src/`), starts "
        "the system (cascowfs: mounts the store), drops caches, imports the copy as snapshot "
        "`base` (timed), then replays the same seeded tree-search script:",
        "",
        "* an agent picks a snapshot from its frontier (mostly among its 4 newest), "
        "**branches** 2–4 copies, applies an agent-size edit to each (1–5 small source "
        "edits; 30% a new file; 10% a delete; 10% a rename; 3% a 256 KiB–1 MiB generated "
        "file; never more than 20 files or 1 MiB), **commits** one (15%: two, 20%: none) "
        "with labels, **discards** every branch, and **prunes** its oldest snapshots beyond "
        "six;",
        "* decisions and edits come from a per-agent seeded RNG, so every system replays "
        "exactly the same script; git and cp, which are slow, replay a prefix of it;",
        "* *single agent*: one agent alone; *MCTS mix*: N agents (processes) started "
        "together on the same store;",
        "* an op's latency is wall time from the first file call to the return of the last "
        "one the agent needs before it can use the result.",
        "",
        "Read path: a cascowfs branch of `base` against the plain ext4 copy it was imported "
        "from, a bare overlay over that copy, a bare overlay over the copy's EROFS image "
        "written as cascowfs writes an import's layer (lz4, no file data beside inodes; the "
        "floor of a branch on image layers), and `MNT/snapshots/base` (the column "
        '"cascowfs snapshot", named "cascowfs snapshot (FUSE)" in earlier result files: '
        "the daemon serves its first access, its kernel view the rest, *Reading "
        "snapshots*); cold "
        "= after `sync; echo 3 > /proc/sys/vm/drop_caches`, warm = immediately after. "
        "Every place's runs start from dropped caches, the snapshot views' warm runs too: "
        "with a small dentry hash table (a kernel booted with `dhash_entries=131072`, as "
        "the development machine's was on 2026-12-06 before noon) and several copies "
        "of a tree cached, a path lookup walks long hash chains, where the tree "
        "walked last comes first (on L, a warm stat walk of the ext4 copy took 215–228 ms "
        "with four more copies cached and 105–119 ms alone; of four identical overlays, "
        "the one walked last was 30% faster than the first). "
        "Growth, *chain*: one branch, N commits in a row of 1–3 small edits each, space "
        "sampled on the way; *wide*: N branches of base with one small edit each, committed "
        "and discarded. Mount: N commits (8 in a row per branch of base), then B live "
        "branches on random snapshots, then `cascowfs umount` (branches stay mounted) + "
        "`cascowfs mount --background` until `MNT/ctl` answers, three times, then three "
        "times after `kill -9` of the daemon (dead mount cleared, WAL replayed).",
        "",
    ]


def _machine(data: dict[str, dict]) -> list[str]:
    first = next(iter(data.values()))
    scratch: dict[str, dict] = {}
    for d in data.values():
        for name in ("cascowfs", *PEER_ORDER):
            fs = (d["systems"].get(name) or {}).get("fs")
            if fs:
                scratch.setdefault(fs.get("fstype"), fs)
    return (
        ["## Machine and filesystems", ""]
        + machine_table(first.get("machine", {}), list(scratch.values()))
        + [""]
    )


def _runs(d: dict, figs: list[str]) -> list[str]:
    """The single-agent and MCTS-mix tables of one corpus, with the load and the ratios."""
    out: list[str] = []
    for key, title in RUN_TITLES:
        if not any(key in s for s in d["systems"].values()):
            out += [f"### {title}", "", "*not run for this corpus*", ""]
            continue
        out += [f"### {title}", ""] + mix_table(d, key) + [""]
        loads = [
            (n, s[key])
            for n, s in d["systems"].items()
            if key in s and s[key].get("loadavg_1m_before_after")
        ]
        if loads:
            out += [
                "Machine load while each system ran (1-minute load average before → "
                "after; other busy processes seen at the end): "
                + "; ".join(
                    f"{n} {m['loadavg_1m_before_after'][0]:.1f} → "
                    f"{m['loadavg_1m_before_after'][1]:.1f}"
                    + (
                        f" ({len(m.get('other_busy_processes') or [])} foreign: "
                        + ", ".join(f"`{p[:40]}`" for p in m["other_busy_processes"][:2])
                        + ")"
                        if m.get("other_busy_processes")
                        else ""
                    )
                    for n, m in loads
                )
                + ".",
                "",
            ]
        out += (
            [
                f"cascowfs latency as a ratio to each peer ({title}; < 1 means "
                "cascowfs is faster):",
                "",
            ]
            + ratio_table(d, key)
            + [""]
        )
    for f in figs:
        if "latency" in f:
            out += [f"![latency CDFs]({f})", ""]
    return out


def _import_and_read(d: dict) -> list[str]:
    out = ["### Import and space", ""] + import_table(d) + [""]
    out += [
        SPACE_NOTE + ' "After the runs" holds the snapshots still live at the end '
        "(each agent keeps up to six).",
        "",
    ]
    out += ["### Read path", ""] + read_table(d.get("read_path") or {}) + [""]
    if "snapshot_read" in d:
        out += ["### Reading snapshots", ""] + snapshot_read_lines(d["snapshot_read"]) + [""]
    return out


def _growth(d: dict, figs: list[str]) -> list[str]:
    g = d.get("growth") or {}
    out = ["### Growth", ""]
    if any(isinstance(g.get(k), dict) for k in GROWTH_KEYS):
        out += [
            "| system | shape | snapshots | space | one copy | ratio | commit P50 / P95 ms "
            "| space by part (cascowfs) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key in GROWTH_KEYS:
            s = g.get(key)
            name = key.split("-")[0]
            shape = "wide (each from base)" if key.endswith("-wide") else "chain (one lineage)"
            if isinstance(s, dict) and "final_storage" in s:
                parts = ""
                if s.get("breakdown"):
                    i, bd = s["breakdown"][-1]
                    parts = ", ".join(
                        f"{k} {mb(v)}" for k, v in bd.items() if k != "layer_count" and v > 1e6
                    )
                    parts += f"; {bd.get('layer_count')} layer dirs (at {i})"
                if s.get("failed"):
                    parts += f" — stopped: {s['failed']}"
                out.append(
                    f"| {name} | {shape} | {s.get('snapshots', g.get('snapshots'))} | "
                    f"{mb(s['final_storage'])} | {mb(s['one_copy_bytes'])} | "
                    f"{s['ratio_to_one_copy']:.2f}× | {ms(s['commit']['p50'])} / "
                    f"{ms(s['commit']['p95'])} | {parts} |"
                )
            elif isinstance(s, dict):
                out.append(f"| {name} | {shape} | skipped: {s.get('skipped')} | | | | | |")
        c = g.get("cascowfs") or {}
        if c.get("commit_drift_p95"):
            out += [
                "",
                "cascowfs commit P95 per tenth of the chain growth run (ms): "
                + ", ".join(ms(x) for x in c["commit_drift_p95"]),
            ]
        out.append("")
        for f in figs:
            if "growth" in f:
                out += [f"![store size vs snapshots]({f})", ""]
    else:
        out += ["*not run for this corpus*", ""]
    return out


def _mount(d: dict) -> list[str]:
    m = d.get("mount") or {}
    out = ["### Mount time", ""]
    if "mount_clean_s" in m:
        out += [
            f"Store with {m['snapshots']:,} snapshots and {m['branches']} live branches "
            f"({mb(m.get('store_bytes'))}; built in {m.get('build_s', 0):.0f} s):",
            "",
            "| | run 1 | run 2 | run 3 |",
            "|---|---|---|---|",
            "| mount after clean umount (ms) | "
            + " | ".join(ms(x) for x in m["mount_clean_s"])
            + " |",
            "| mount after kill -9, WAL replay (ms) | "
            + " | ".join(ms(x) for x in m["mount_after_kill9_s"])
            + " |",
            "",
        ]
    else:
        out += ["*not run for this corpus*", ""]
    return out


def _drift(d: dict, figs: list[str]) -> list[str]:
    out: list[str] = []
    mix = (d["systems"].get("cascowfs") or {}).get("mix")
    if mix and mix.get("drift_p95"):
        out += [
            "### Drift over the MCTS mix",
            "",
            "cascowfs P95 (ms) per tenth of the run:",
            "",
            "| op | " + " | ".join(str(i + 1) for i in range(10)) + " |",
            "|---|" + "---|" * 10,
        ]
        for op, xs in mix["drift_p95"].items():
            out.append(f"| {op} | " + " | ".join(ms(x) for x in xs) + " |")
        out.append("")
        for f in figs:
            if "drift" in f:
                out += [f"![latency over time]({f})", ""]
    return out


def _not_done(data: dict[str, dict]) -> list[str]:
    out = ["## Runs not done, or cut short", ""]
    missing = []
    prefixes = []
    for corpus in corpora_in_order(data):
        d = data[corpus]
        slow_cfg = [
            (r.get("config") or {})
            for r in d["runs"]
            if {"git", "cp"} & set(((r.get("config") or {}).get("systems") or "").split(","))
        ]
        if slow_cfg and slow_cfg[-1].get("slow_ops"):
            cfg = slow_cfg[-1]
            seq = min(cfg.get("seq_ops", 0) // 4, cfg["slow_ops"])
            prefixes.append((short(corpus), cfg["slow_ops"], seq))
    if prefixes:
        (c0, mix0, seq0), rest = prefixes[0], prefixes[1:]
        missing.append(
            "* git and cp replay only a prefix of the scripts: "
            f"{mix0} ops (mix) / {seq0} ops (single agent) on {c0}"
            + "".join(f", and {m} / {s} on {c}" for c, m, s in rest)
            + ", because they cost seconds per op; their figures come from fewer "
            "samples."
        )
    for corpus in corpora_in_order(data):
        d = data[corpus]
        for name in ("cascowfs",) + PEER_ORDER:
            s = d["systems"].get(name) or {}
            if "skipped" in s:
                missing.append(f"* {corpus} / {name}: skipped — {s['skipped']}")
            elif "failed" in s:
                missing.append(f"* {corpus} / {name}: failed — {s['failed'].splitlines()[0]}")
            for key, _ in RUN_TITLES:
                m = s.get(key) or {}
                if not mostly_failed(m):
                    continue
                full = ""
                if "No space left" in (m.get("errors") or [""])[0]:
                    scratch = next((r.get("config") or {}).get("scratch_gb") for r in d["runs"])
                    size = (d.get("corpus") or {}).get("bytes", 0)
                    full = (
                        f" with ENOSPC (the {scratch} GB scratch filesystem holds fewer "
                        f"full copies of the {_size(size)} tree than the run keeps alive)"
                    )
                other = "mix" if key == "seq" else "seq"
                stand = (
                    f" Its {_run_name(s[other])} figures stand;"
                    if other in s and not mostly_failed(s[other])
                    else ""
                )
                missing.append(
                    f"* {name} on {short(corpus)}, {_run_name(m)}: "
                    f"{m['error_count']} of {m['ops']} ops failed{full}.{stand} Its "
                    f"{_run_name(m)} figures are left out of the ratios.".replace("; Its", "; its")
                )
        if not any(isinstance((d.get("growth") or {}).get(k), dict) for k in GROWTH_KEYS):
            missing.append(f"* {corpus}: growth run not requested")
        if "mount_clean_s" not in (d.get("mount") or {}):
            missing.append(f"* {corpus}: mount-time run not requested")
    if any("tests" in (d.get("read_path") or {}) for d in data.values()):
        missing.append(
            "* Peers in the read-path comparison are native ext4 and bare overlays on "
            "the ext4 copy and on its EROFS image; btrfs snapshots and git worktrees "
            "were not read-path tested."
        )
    out += (missing or ["*none*"]) + [""]
    return out


def _run_name(m: dict) -> str:
    agents = m.get("agents", 1)
    return "single-agent" if agents == 1 else f"{agents}-agent mix"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--img", default=None, help="default: <doc dir>/img")
    ap.add_argument("--notes", default=str(REPO / "tools" / "bench_notes.md"))
    ap.add_argument(
        "--extra", default=None, help="hand-written sections, one *.md each (default: <doc>.extra/)"
    )
    args = ap.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.results]
    data = merge(results)
    normalize_read_path(data)
    doc = Path(args.doc)
    img = Path(args.img) if args.img else doc.parent / "img"
    rel = os.path.relpath(img, doc.parent)
    figs = plots(data, img, rel)
    notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else None
    sources = [
        os.path.relpath(p, REPO) if os.path.abspath(p).startswith(str(REPO)) else p
        for p in args.results
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    extra = Path(args.extra) if args.extra else doc.with_suffix(".extra")
    doc.write_text(with_extra_sections(document(data, figs, notes, sources), extra))
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
