#!/usr/bin/env bash
# Run the torch-free part of the test suite on every other Python this machine has (pyenv or PATH).
# torch has a CPU wheel here only for the Python of .venv, so tests that need torch skip themselves there.
#   scripts/check_pythons.sh [WORKDIR]      # venvs go to WORKDIR (default: /tmp/mergekit-pythons)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/mergekit-pythons}"
mkdir -p "$work"
tests="tests/test_arch_blocks.py tests/test_arch_lbw.py tests/test_arch_mbw.py tests/test_arch_tables.py
 tests/test_io_posio.py tests/test_keymap.py tests/test_lora_names.py tests/test_recipe_address.py
 tests/test_recipe_formula.py tests/test_recipe_planner.py tests/test_recipe_schema.py tests/test_platform.py
 tests/test_layers.py"
found=0
for minor in 10 11 12 13; do
  py=""
  for cand in "$(command -v python3.$minor || true)" "$HOME"/.pyenv/versions/3.$minor.*/bin/python; do
    if [ -x "$cand" ]; then py="$cand"; fi
  done
  [ -n "$py" ] || { echo "python3.$minor: not installed here"; continue; }
  found=1
  venv="$work/py3.$minor"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q numpy safetensors click rich pyyaml pytest hypothesis pytest-timeout
  echo "== $("$venv/bin/python" --version)"
  # shellcheck disable=SC2086
  PYTHONPATH=. "$venv/bin/python" -m pytest -q -p no:cacheprovider $tests | tail -1
done
[ "$found" = 1 ]
