#!/usr/bin/env bash
# CI-optional: the whole test suite under coverage.py, child processes included (the daemons
# started by `python -m cascowfs mount`, their --background forks, the import workers), then
# one combined line-coverage report for cascowfs/. Configuration: [tool.coverage.*] in
# pyproject.toml (fail_under sets the floor). Optional in CI: tools/test.sh and .ci/run do not
# call it. Needs the .venv of tools/install.sh; extra arguments go to pytest. Exits non-zero if a
# test fails or the total is below the floor; the data files are removed in every case.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
# An absolute data file, inherited by every child whatever directory a test starts it in.
export COVERAGE_FILE="$here/.coverage"
rm -f .coverage .coverage.*
trap 'rm -f "$here"/.coverage "$here"/.coverage.*' EXIT

status=0
.venv/bin/coverage run -m pytest -q -p no:cacheprovider "$@" || status=$?
.venv/bin/coverage combine -q || exit 1
report=0
.venv/bin/coverage report || report=$?
if [ "$status" -ne 0 ]; then
    echo "tests FAILED under coverage (pytest exit $status)" >&2
    exit "$status"
fi
exit "$report"
