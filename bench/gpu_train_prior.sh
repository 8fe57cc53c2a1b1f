#!/usr/bin/env bash
# Train the shipped ToyWorld prior on the lent GPU machine in one call (see DEVELOPERS.md):
#   carry .whl (diffusers + importlib_metadata wheels), write the model as a tarball under $OUT.
# Extra arguments are passed to `run.py train prior` (a CPU dry run: OUT=/tmp/o bash bench/gpu_train_prior.sh bank_size=64 ...).
set -uo pipefail
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
rm -rf /tmp/runs
python3 run.py train prior "$@" --out /tmp/runs 2>&1 | tee "$OUT/train.log" | tail -c 4000
run=$(ls -d /tmp/runs/train/*/ | head -1)
cp "$run"/losses.json "$run"/metadata.json "$OUT"/ 2>/dev/null
if [ -f "$run/model/model_index.json" ]; then
  # files come back at most 16 MiB each: split the tarball
  tar czf - -C "$run" model | split -b 15M - "$OUT/model.tgz.part-" && ls -la "$OUT"
else
  echo "no final model; packing the last checkpoint folders"; tar czf "$OUT/run.tgz" -C "$run" --exclude='*.bin' --exclude='*.pkl' . ; ls -la "$OUT"
fi
