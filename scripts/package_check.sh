#!/usr/bin/env bash
# Packaging check (CI, after scripts/test.sh): build the wheel and the sdist with `python -m build`, build a
# second wheel from the sdist (so the sdist holds all a build needs), install the wheel into a fresh venv and
# run every console script's --help there, away from the source tree. Any failure exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
# Building the wheel from the tree leaves setuptools' build/ there: remove it unless it was there already.
tree=$PWD
[ -e build ] && keep_build=1 || keep_build=0
trap 'rm -rf "$work"; [ $keep_build = 1 ] || rm -rf "$tree/build"' EXIT

# --sdist --wheel: both from the tree (plain `build` makes the wheel from the sdist, which would hide a file
# the sdist lacks). Isolated builds: each gets the setuptools that pyproject.toml asks for from the index.
"$PY" -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/zdut-*.whl)
sdist=$(ls "$work"/dist/zdut-*.tar.gz)

tar -tzf "$sdist" >"$work/sdist.txt"
for need in pyproject.toml README.md zdut/__init__.py zdut/cli.py; do
  grep -q "^zdut-[^/]*/$need\$" "$work/sdist.txt" || { echo "package_check: $need missing from $sdist" >&2; exit 1; }
done
mkdir "$work/from-sdist"
tar -xzf "$sdist" -C "$work/from-sdist"
"$PY" -m build --wheel --outdir "$work/from-sdist/dist" "$work"/from-sdist/zdut-*/ \
  >"$work/build2.log" 2>&1 || { echo "package_check: no wheel builds from the sdist" >&2; cat "$work/build2.log"; exit 1; }
# The wheel built from the sdist has the same files as the one built from the tree.
names() { "$PY" -c 'import sys, zipfile; print("\n".join(sorted(zipfile.ZipFile(sys.argv[1]).namelist())))' "$1"; }
diff <(names "$wheel") <(names "$(ls "$work"/from-sdist/dist/zdut-*.whl)") \
  || { echo "package_check: the sdist's wheel differs from the tree's" >&2; exit 1; }

"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
cd "$work"   # not the source tree: the installed package must be the one imported
for script in zdut zdut-broker zdut-agent; do
  "$work/venv/bin/$script" --help >"$work/help.txt" 2>&1 \
    || { echo "package_check: $script --help failed" >&2; cat "$work/help.txt"; exit 1; }
done
"$work/venv/bin/python" -c 'import zdut, sys; sys.exit(0 if zdut.__file__.startswith(sys.prefix) else 1)' \
  || { echo "package_check: zdut was not imported from the fresh venv" >&2; exit 1; }
echo "package_check: OK ($(basename "$wheel"), $(basename "$sdist"))"
