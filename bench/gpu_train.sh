#!/usr/bin/env bash
# Train on the lent GPU machine in one call (see DEVELOPERS.md):  bash bench/gpu_train.sh prior|temporal|interpolation [key=value ...]
# Carry .whl (diffusers + importlib_metadata wheels, which that machine lacks). The trained folder comes
# back under $OUT as a split tarball (files return at most 16 MiB each): cat $OUT/result.tgz.part-* | tar xz
# The shipped ToyWorld prior came from: bash bench/gpu_train.sh prior bank_size=100000 vae_steps=5000 \
#     unet_steps=40000 batch_size=256 checkpoint_every=2000 max_minutes=7.5
# CPU dry run: OUT=/tmp/o bash bench/gpu_train.sh temporal bank_size=16 steps=2 batch_size=2 frames=4
set -uo pipefail
what=${1:?usage: bench/gpu_train.sh prior|temporal|interpolation [key=value ...]}; shift
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
rm -rf /tmp/runs
python3 run.py train "$what" "$@" --out /tmp/runs 2>&1 | tee "$OUT/train.log" | tail -c 4000
run=$(ls -d /tmp/runs/train/*/ | head -1)
cp "$run"/losses.json "$run"/metadata.json "$run"/loss_curve.png "$OUT"/ 2>/dev/null
result=$([ "$what" = prior ] && echo model || echo motion)
if [ -d "$run/$result" ]; then
  tar czf - -C "$run" "$result" | split -b 15M - "$OUT/result.tgz.part-" && ls -la "$OUT"
else
  echo "no $result folder: the run stopped early; see train.log"
fi
