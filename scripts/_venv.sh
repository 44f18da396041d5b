# Shared by scripts/run-demo and scripts/run-tests: create or update .venv.
# Usage: . scripts/_venv.sh EXTRAS   (EXTRAS like "aws,postgres,quilt,web,dev")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDP_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
extras="$1"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "edp needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.edp-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) $extras"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    echo "installing edp[$extras] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]" >&2
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
