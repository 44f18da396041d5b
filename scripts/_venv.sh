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
# One stamp line per set of extras installed from this pyproject.toml: run-demo and
# run-tests share the venv without reinstalling each other's extras every time.
stamp="$VENV/.edp-installed"
want="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16) $extras"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    echo "installing edp[$extras] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]" >&2
    hash="${want%% *}"
    { grep -F "$hash " "$stamp" 2>/dev/null || true; echo "$want"; } > "$stamp.new"
    mv "$stamp.new" "$stamp"
fi
export PATH="$VENV/bin:$PATH"
