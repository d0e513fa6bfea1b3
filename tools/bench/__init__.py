"""The benchmark tools, in parts.

A run (``mcts``, behind ``tools/bench_mcts.py``) measures cascowfs against its peers and writes
a result JSON; the report (``report``, behind ``tools/bench_report.py``) turns result files into
``docs/benchmarks.md`` and its plots, followed by the hand-written sections of
``docs/benchmarks.extra/``.

- ``host``: commands, mounts and disk usage on this machine
- ``stats``: percentiles, summaries, drift
- ``systems``: cascowfs and its peers (bare overlayfs, btrfs, git, cp) behind one interface
- ``workload``: the corpus's editable files, the seeded edit script, the MCTS agents
- ``pyspy``: the daemon profiled with py-spy during a second mix
- ``sections``: the sections of a run: import, single agent and MCTS mix; read path; growth;
  mount time
- ``targets``: every target line with its must and aim, the peers' reference figures, and
  the current figures of a run judged against the targets
- ``tables``, ``plots``: the report's Markdown tables and its PNG plots

The package is ``tools.bench``: the repository root is on ``sys.path`` when Python runs from it
(``python -m tools.bench.mcts``) and in the project's virtual environment, whose editable
install puts the repository there.
"""
