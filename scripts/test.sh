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
# The whole suite: most tests wait on the processes they start, so two workers share the cores; the tests
# marked `serial` assert on wall-clock time and run alone afterwards.
status=0
.venv/bin/python -m pytest -q -n 2 -m "not serial" || status=$?
.venv/bin/python -m pytest -q -m serial || status=$?
exit "$status"
