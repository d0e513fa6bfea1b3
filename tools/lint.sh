#!/usr/bin/env bash
# The static gates, configured in pyproject.toml: ruff (lint, 100 columns) and mypy over
# cascowfs/ and tools/bench/. tools/test.sh runs them before the tests. `--fix` lets ruff
# apply its safe fixes first (import order, modern syntax), e.g. after a merge.
set -euo pipefail
cd "$(dirname "$0")/.."
fix=()
if [ "${1:-}" = "--fix" ]; then
    fix=(--fix)
fi
.venv/bin/ruff check "${fix[@]}" cascowfs tools/bench
.venv/bin/mypy
