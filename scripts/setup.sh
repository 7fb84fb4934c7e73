#!/usr/bin/env bash
# Create .venv and install the project into it. Safe to rerun: it reinstalls only when
# pyproject.toml changed.
#
# On a machine without an NVIDIA GPU, torch's CPU build is installed first: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. Override the choice with
# HOMEFIRE_TORCH_SPEC (e.g. HOMEFIRE_TORCH_SPEC="torch==2.13.0" or "torch" for the default build).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
stamp="$VENV/.homefire-installed"

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${HOMEFIRE_TORCH_SPEC:-}" ]; then
        echo "setup: installing $HOMEFIRE_TORCH_SPEC"
        "${pip[@]}" "$HOMEFIRE_TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found; installing torch==$TORCH_VERSION (CUDA build)"
        "${pip[@]}" "torch==$TORCH_VERSION"
    elif "${pip[@]}" --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        # A wheel in pip's local find-links (a CPU build on machines without a GPU).
        echo "setup: no GPU; installed torch==$TORCH_VERSION from the local wheel cache"
    else
        echo "setup: no GPU; installing the CPU build of torch==$TORCH_VERSION"
        "${pip[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
            --extra-index-url https://pypi.org/simple
    fi
fi

echo "setup: installing homefire and its dependencies"
"${pip[@]}" -e ".[dev]"
# The cookbook the trainer server is tested against (tests/test_tinker_cookbook.py). Without
# --no-deps pip refuses it: it requires tml-renderers>=0.4.1, which the registry does not serve.
"${pip[@]}" --no-deps "tinker-cookbook==0.6.1"
touch "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
