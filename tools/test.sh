#!/usr/bin/env bash
# Install everything (tools/install.sh), run the static gates (tools/lint.sh) and the whole test
# suite, then check that the run left no mount, daemon process or staging directory behind. Any
# pytest exit code other than 0 (including 5, "no tests collected") fails.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash tools/install.sh || exit 1

# The static gates (ruff, mypy) first: a lint or type error fails the run like a failing test.
bash tools/lint.sh || { echo "lint FAILED (tools/lint.sh)" >&2; exit 1; }

status=0
.venv/bin/python -m pytest -ra "$@" || status=$?

# (cascowfs-unmounted: the read-only placeholder of a branch a full disk left unmounted)
leaks=$(grep -E '^cascowfs-unmounted | (fuse\.cascowfs|overlay) ' /proc/mounts \
    | grep -E 'cascowfs|pytest' || true)
if [ -n "$leaks" ]; then
    echo "LEAK: mounts left behind by the test run:" >&2
    echo "$leaks" >&2
    status=1
fi
procs=$(pgrep -a -f 'cascowfs (mount|daemon)' | grep -v -e pgrep || true)
if [ -n "$procs" ]; then
    echo "LEAK: cascowfs processes left behind by the test run:" >&2
    echo "$procs" >&2
    status=1
fi
if [ "$status" -ne 0 ]; then
    echo "tests FAILED (exit $status)" >&2
fi
exit "$status"
