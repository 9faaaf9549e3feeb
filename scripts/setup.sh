#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs torch from this machine's disk, builds (or reuses) the
# mmcv 2.1.0 wheel with ops, then installs kd-tasks with every extra.  Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KD_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH=2.14.1
TORCHVISION=0.29.1
MMCV=2.1.0
CACHE=${KD_WHEEL_CACHE:-$HOME/.cache/kd-tasks/wheels}
STAMP="$VENV/.kd-tasks-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Never let a dependency pull another torch.
CONSTRAINTS="$(pwd)/scripts/constraints.txt"
export PIP_CONSTRAINT="$CONSTRAINTS"

have() { "$VENV/bin/python" - "$@" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
name, want = sys.argv[1], sys.argv[2]
try:
    sys.exit(0 if version(name) == want else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

if ! have torch "$TORCH" || ! have torchvision "$TORCHVISION"; then
  echo "[setup] installing torch $TORCH / torchvision $TORCHVISION"
  $PIP install -q "torch==$TORCH" "torchvision==$TORCHVISION"
fi

if ! have mmcv "$MMCV"; then
  PYTAG=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  KEY="$CACHE/mmcv-$MMCV-torch$TORCH-$PYTAG"
  mkdir -p "$KEY"
  WHEEL=$(ls "$KEY"/mmcv-$MMCV-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$WHEEL" ]; then
    echo "[setup] building mmcv $MMCV with ops (about 8 minutes on 2 cores; cached in $KEY)"
    $PIP install -q wheel "setuptools>=77.0.3,<81"
    SRC=$(mktemp -d)
    $PIP download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV" -d "$SRC"
    tar xzf "$SRC/mmcv-$MMCV.tar.gz" -C "$SRC"
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g; s#/std:c\+\+1[47]#/std:c++20#g' "$SRC/mmcv-$MMCV/setup.py"
    TMPW=$(mktemp -d)
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP wheel -q --no-deps --no-build-isolation -w "$TMPW" "$SRC/mmcv-$MMCV"
    mv "$TMPW"/mmcv-$MMCV-*.whl "$KEY"/   # appears in the cache only once complete
    rm -rf "$SRC" "$TMPW"
    WHEEL=$(ls "$KEY"/mmcv-$MMCV-*.whl | head -n1)
  fi
  echo "[setup] installing $WHEEL"
  $PIP install -q "$WHEEL"
fi

HASH=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup] installing kd-tasks[all,dev]"
  $PIP install -q -e ".[all,dev]"
  echo "$HASH" > "$STAMP"
fi
echo "[setup] ready: $VENV"
