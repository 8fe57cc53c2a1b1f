#!/usr/bin/env bash
# Everything that needs the lent GPU, in one call (see DEVELOPERS.md): the GPU test group (nerfacc vs the
# batched renderer, a CUDA 3D fit, the fast path on/off, bf16 vs fp32) and the full-size benchmarks
# against the peers, written to $OUT/bench/. Carry .whl: diffusers, importlib_metadata, trimesh and
# nerfacc wheels, which `bash bench/fetch_wheels.sh` downloads here first (av is 36 MB and does not fit
# next to the repository: the one test that writes an mp4 skips without it). nerfacc JIT-builds its CUDA
# code on first use (about 60 s).
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# CPU dry run (the GPU tests skip, the bench runs small): OUT=/tmp/o SIZE=small DEVICE=cpu bash bench/gpu_check.sh
set -uo pipefail
if ! python3 -c "import diffusers, trimesh, nerfacc" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_dreamfusion_render.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
python3 -m bench --device "${DEVICE:-cuda}" --size "${SIZE:-full}" --cases "${CASES:-image,video,video-dpm,sds}" --repeats 3 \
  --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -40
# torch.compile'd ours as its own table (-compiled), its compile time in the warm-up column: COMPILE=1
if [ -n "${COMPILE:-}" ]; then
  python3 -m bench --device "${DEVICE:-cuda}" --size "${SIZE:-full}" --cases "${COMPILE_CASES:-video,sds}" --repeats 3 \
    --compile --out "$OUT/bench" 2>&1 | tee "$OUT/bench_compiled.log" | tail -20
fi
# the SDS step compiled and replayed as CUDA graphs (cuda_graphs=true), its own table (-compiled-graphs): GRAPHS=1
if [ -n "${GRAPHS:-}" ]; then
  python3 -m bench --device "${DEVICE:-cuda}" --size "${SIZE:-full}" --cases "${GRAPHS_CASES:-sds}" --repeats 3 \
    --compile --cuda-graphs --out "$OUT/bench" 2>&1 | tee "$OUT/bench_graphs.log" | tail -20
fi
