# Sourced by demo.sh and test.sh: create .venv (if missing) and install the package
# with the given extras at the pinned versions of requirements/constraints.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  # Some minimal systems ship Python without the venv/ensurepip module: fall back to virtualenv.
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    "$PYTHON" -m pip install --quiet --user virtualenv
    "$PYTHON" -m virtualenv --quiet "$VENV"
  fi
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c requirements/constraints.txt -e ".[$1]"
