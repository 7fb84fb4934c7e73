#!/usr/bin/env bash
# Wheels a bare CUDA image (Python 3.12, with torch, transformers' dependencies, numpy, pandas,
# pyarrow, accelerate) lacks to run the project, downloaded here into .whl/ (git-ignored, ~32 MB)
# so they can travel to a machine that cannot reach a package index:
#
#   bash scripts/gpu_wheels.sh                      # here, where pip reaches an index
#   bash scripts/gpu_check.sh                       # there: installs .whl/ first when present
#
# Pinned to the versions this repository is tested with (transformers and peft included: an
# image's own may be older). vllm is not among them (hundreds of MB): its tests skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" \
    tinker==0.38.0 distro orjson pyqwest==0.12.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types typing-inspection sniffio zstandard hydra-core==1.3.8 omegaconf==2.3.1 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fastapi starlette uvicorn trl==1.16.0 \
    transformers==5.25.0 peft==0.21.2
# omegaconf's parser runtime exists only as a source distribution (pure Python): build it.
"$PY" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$DEST"
du -sh "$DEST"
