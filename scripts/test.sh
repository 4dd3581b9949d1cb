#!/usr/bin/env bash
# Set up a virtual environment with zdut and its test tools, check style, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check zdut tests bench
exec .venv/bin/python -m pytest -q "$@"
