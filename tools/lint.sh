#!/usr/bin/env bash
# The static gates, configured in pyproject.toml: ruff (lint and format, 100 columns) and mypy
# over cascowfs/ and tools/bench/. tools/test.sh runs them before the tests. `--fix` lets ruff
# apply its safe fixes and its formatting first (import order, modern syntax, layout), e.g.
# after a merge.
set -euo pipefail
cd "$(dirname "$0")/.."
fix=()
format=(--check)
if [ "${1:-}" = "--fix" ]; then
    fix=(--fix)
    format=()
fi
.venv/bin/ruff check "${fix[@]}" cascowfs tools/bench
.venv/bin/ruff format "${format[@]}" cascowfs tools/bench
.venv/bin/mypy
