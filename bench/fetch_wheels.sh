#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu_check.sh carries to the lent H200 (Python 3.12 there; it already has
# torch 2.11, transformers, accelerate, imageio, einops, scikit-image, but not these). Run here, at no device
# time, before the device call; .whl/ is git-ignored. av (36 MB) is left out: with it the carry passes 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata==8.7.0 trimesh==4.8.3 nerfacc==0.5.3
ls -la .whl && du -sh .whl
