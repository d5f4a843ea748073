#!/usr/bin/env bash
# Creates (or reuses) .venv and installs metagrad_rl with its test, science and docs extras
# (EXTRAS=... to choose others).
# torch is pinned to 2.13.0 here (a CPU build); pyproject.toml allows a range.
# Re-running is cheap: nothing is reinstalled while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3 python; do
    if command -v "$c" >/dev/null 2>&1; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: error: no python3.11 found" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.metagrad_rl-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${EXTRAS:-test,science,docs}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import metagrad_rl, torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[${EXTRAS:-test,science,docs}]" "torch==2.13.0"
  echo "$want" > "$stamp"
fi
