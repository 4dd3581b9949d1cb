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
exec .venv/bin/python -m pytest -q "$@"
