#!/usr/bin/env bash
# Download (here, with internet) the wheels the GPU machine lacks into bench/gpu/whl/ (git-ignored;
# pass it to the device run with carry=["bench/gpu/whl"]). The GPU machine runs CPython 3.12 on
# x86_64 and cannot download anything itself.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p whl
PIP="${PIP:-/work/main/.venv/bin/python -m pip}"
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# liger-kernel (the fused linear JSD to compare with), trl + datasets and what datasets needs
# (train_bench.py's TRL run), duckdb (paced imports it); all as CPython 3.12 wheels
$PIP download -q --no-deps -d whl $PLAT liger-kernel==0.8.5 trl datasets dill multiprocess xxhash fsspec \
  duckdb==2.0.1
ls -la whl
