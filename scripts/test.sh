#!/usr/bin/env bash
# Set up a virtual environment with zdut and its test tools, check style, types and import rules, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check zdut tests bench
.venv/bin/lint-imports --no-logo   # the layering contracts in pyproject.toml
.venv/bin/mypy                     # zdut/, configured in pyproject.toml
if [ $# -gt 0 ]; then exec .venv/bin/python -m pytest -q "$@"; fi   # the tests you name, in one process
# The whole suite, in order, with its 25 slowest tests listed at the end: the suite must stay within 10 minutes.
if [ "${ZDUT_TEST_WORKERS:-1}" -le 1 ]; then exec .venv/bin/python -m pytest -q --durations=25; fi
# ZDUT_TEST_WORKERS=N: most tests on N xdist workers, then the tests marked `serial` (they assert on wall-clock
# time) alone. Faster, but not the default: on the 2-core CI host, 4 of 4 such runs had one zdut process stall
# for 5-30 s inside its imports (faulthandler: garbage-collecting while unmarshalling asyncio), never seen in
# order (README, "Layout").
status=0
.venv/bin/python -m pytest -q -n "$ZDUT_TEST_WORKERS" -m "not serial" || status=$?
.venv/bin/python -m pytest -q -m serial || status=$?
exit "$status"
