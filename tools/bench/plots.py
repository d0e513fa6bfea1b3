"""The report's PNG plots (matplotlib, from the ``bench`` extra): latency CDFs per op, store size
against snapshot count, cascowfs latency over the MCTS mix."""

from __future__ import annotations

import sys
from pathlib import Path

from .results import CORPUS_LABEL, GROWTH_KEYS
from .targets import TARGETS
from .workload import OPS


def plots(data: dict[str, dict], img: Path, rel: str) -> dict[str, list[str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots (EXTRAS=bench bash tools/install.sh)", file=sys.stderr)
        return {}
    img.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    colors = {
        "cascowfs": "tab:red",
        "overlay": "tab:gray",
        "btrfs": "tab:blue",
        "git": "tab:orange",
        "cp": "tab:green",
    }
    for corpus, d in data.items():
        figs = made.setdefault(corpus, [])
        for key, title in (("mix", "concurrent MCTS mix"), ("seq", "single agent")):
            systems = [(n, s) for n, s in d["systems"].items() if key in s]
            if not systems:
                continue
            fig, axes = plt.subplots(1, len(OPS), figsize=(16, 4), sharey=True)
            for ax, op in zip(axes, OPS, strict=True):
                for name, s in systems:
                    lat = sorted(s[key]["latencies"].get(op) or [])
                    if not lat:
                        continue
                    ys = [(i + 1) / len(lat) for i in range(len(lat))]
                    ax.step(
                        [max(x, 1e-5) * 1e3 for x in lat],
                        ys,
                        where="post",
                        label=f"{name} (n={len(lat)})",
                        color=colors.get(name),
                    )
                ax.set_xscale("log")
                ax.set_title(op)
                ax.set_xlabel("latency (ms, log)")
                ax.axhline(0.95, color="k", lw=0.5, ls=":")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7, loc="lower right")
            axes[0].set_ylabel("fraction of ops ≤ x")
            agents = systems[0][1][key]["agents"]
            fig.suptitle(
                f"{CORPUS_LABEL.get(corpus, corpus)}: latency CDF per op, {title} "
                f"({agents} agent{'s' if agents > 1 else ''}); dotted line = P95"
            )
            fig.tight_layout()
            fn = f"{corpus}-latency-{key}.png"
            fig.savefig(img / fn, dpi=90)
            plt.close(fig)
            figs.append(f"{rel}/{fn}")
        g = d.get("growth") or {}
        series = [(n, g[n]) for n in GROWTH_KEYS if isinstance(g.get(n), dict) and "series" in g[n]]
        if series:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            one = series[0][1]["one_copy_bytes"]
            for name, s in series:
                xs = [p[0] for p in s["series"]]
                ys = [p[1] / 1e6 for p in s["series"]]
                base = name.split("-")[0]
                shape = "wide: each from base" if name.endswith("-wide") else "chain: one lineage"
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    ms=3,
                    label=f"{base} ({shape})",
                    color=colors.get(base),
                    ls="--" if name.endswith("-wide") else "-",
                )
            ax.axhline(one / 1e6, color="k", ls="--", lw=1, label="one copy (du)")
            limit = TARGETS["store"].limit
            ax.axhline(
                limit * one / 1e6, color="tab:red", ls=":", lw=1, label=f"must: {limit:g}× one copy"
            )
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
                pts = [(t, lat) for t, o, lat in mix["timeline"] if o == op]
                if pts:
                    ax.scatter(
                        [p[0] for p in pts], [p[1] * 1e3 for p in pts], s=2, alpha=0.4, label=op
                    )
            ax.set_yscale("log")
            ax.set_xlabel("seconds into the run")
            ax.set_ylabel("latency (ms, log)")
            ax.set_title(
                f"{CORPUS_LABEL.get(corpus, corpus)}: cascowfs latency over the "
                f"{mix['ops']}-op MCTS mix ({mix['agents']} agents)"
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(markerscale=5, fontsize=8)
            fig.tight_layout()
            fn = f"{corpus}-drift.png"
            fig.savefig(img / fn, dpi=90)
            plt.close(fig)
            figs.append(f"{rel}/{fn}")
    return made
