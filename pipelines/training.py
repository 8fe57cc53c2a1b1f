"""What every trainer shares (`run.py train prior|temporal`, `3d`): run folders that resume, the Accelerate
optimisation loop, per-step generators, a loss-curve PNG, and checkpoints that load no pickle: tensors in
safetensors, the rest in JSON, each checkpoint written to a temp folder and renamed into place whole."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from .progress import Bar

from .config import changed, job_defaults
from .errors import UserError
from .loading import check_finite
from .rundir import RunDir
from .runtime import atomic_path, pick_device, write_json

logger = logging.getLogger(__name__)


def step_generator(seed: int, stage: str, step: int, process: int) -> torch.Generator:
    """A generator per (stage, step, process): the data stream is reproducible and resumes exactly."""
    key = ((seed * 7 + zlib.crc32(stage.encode())) * 1_000_003 + step) * 1009 + process
    return torch.Generator().manual_seed(key % (1 << 64))  # unchanged below 2**64; any valid seed fits


def mixed_precision(name: str, device: str) -> str:
    """auto -> bf16 autocast on capable GPUs, none on CPU."""
    if name != "auto":
        return name
    return "bf16" if device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def accelerator(device: str, precision: str, **kwargs):
    """Accelerate's `Accelerator` on `device` (auto, cpu, mps, cuda or cuda:N) with `precision` autocast.
    Accelerate moves what it prepares to its own device, where a bare "cuda" is torch's current GPU, so a named
    cuda:N is made current first; under `accelerate launch` (LOCAL_RANK set) the launcher picks each GPU."""
    from accelerate import Accelerator

    chosen = pick_device(device)
    if chosen.type == "cuda" and chosen.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(chosen)
    return Accelerator(mixed_precision=mixed_precision(precision, chosen.type), cpu=chosen.type == "cpu", **kwargs)


def open_run(cfg, out: str | Path, name: str) -> tuple[RunDir, object]:
    """A new run folder OUT/train/<time>-<name>, or the one `cfg.resume` names with its saved options plus
    those this command changed (`resume=RUN unet_steps=50000` trains on to 50k steps); the architecture
    (`arch.`, `layers.`) cannot change."""
    if cfg.resume is None:
        with RunDir.create(out, "train", name) as run:  # a failed write removes the folder
            run.write_config(cfg)
        return run, cfg
    run = RunDir.existing(cfg.resume, "train")
    resumed = run.resumed(type(cfg), changed(cfg, job_defaults(type(cfg))), free=lambda key: not key.startswith(("arch.", "layers.")))
    run.write_config(resumed)
    return run, resumed


@dataclass
class Stage:
    name: str
    steps: int
    lr: float
    deadline: float  # time.monotonic() after which the stage stops early


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def run_stage(accel, stage: Stage, objective, params, batch_fn, cfg, run_dir: Path, start: int,
              ema=None, progress: bool = True, log: list | None = None, after_step=None,
              adam_eps: float = 1e-8) -> int:
    """Optimise `objective(**batch_fn(step))` for `stage.steps` steps; returns the last step done.

    `after_step(step)` runs after each optimiser step (occupancy-grid updates, validation renders).
    Ctrl-C saves a checkpoint first; a checkpoint is only written while loss and weights are finite,
    so a run that diverges keeps its last good one.
    """
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0, eps=adam_eps)
    model, opt = accel.prepare(objective, opt)
    warmup, began = min(cfg.warmup_steps, stage.steps // 5 + 1), time.monotonic()
    ckpt = run_dir / "checkpoints" / stage.name
    earlier = 0.0  # this stage's wall time in earlier sessions
    if start > 0:
        restored = load_checkpoint(accel, checkpoint_folder(run_dir, stage.name), model, opt, ema)
        earlier = restored["seconds"]
        if log is not None:
            log[:] = restored["log"]  # the history up to the checkpoint, whatever was written after it
    bar = Bar(range(start, stage.steps), initial=start, total=stage.steps, desc=f"train {stage.name}",
               disable=not (progress and accel.is_main_process))
    step, running, count, done = start, 0.0, 0, start
    try:
        for step in bar:
            loss = _one_step(accel, stage, model, opt, batch_fn, cfg, params, ema, step, warmup, began)
            running, count = running + loss.detach(), count + 1  # stays on the device: no sync per step
            if step % 50 == 0:  # reading the loss syncs the GPU, so only now and then; log the window's mean
                value, running, count = (running / count).item(), 0.0, 0
                _check_finite(value, stage, step, ckpt)
                if log is not None:
                    log.append({"stage": stage.name, "step": step, "loss": round(value, 6)})
                bar.set_postfix(loss=f"{value:.4f}")
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == stage.steps or time.monotonic() > stage.deadline:
                _check_finite(float(loss.detach()), stage, step, ckpt, params)
                save_checkpoint(accel, ckpt, model, opt, ema, stage.name, done, earlier + time.monotonic() - began, log)
            if after_step is not None:
                after_step(step)
            if time.monotonic() > stage.deadline and done < stage.steps:
                logger.info("%s stage stopped by max_minutes at step %d/%d", stage.name, done, stage.steps)
                return done
    except KeyboardInterrupt:
        if done > start and all(torch.isfinite(p).all() for p in params):
            save_checkpoint(accel, ckpt, model, opt, ema, stage.name, done, earlier + time.monotonic() - began, log)
            logger.warning("interrupted: checkpoint at step %d saved in %s (resume to continue)", done, ckpt)
        raise
    return max(start, step + 1) if stage.steps > start else start


def _one_step(accel, stage: Stage, model, opt, batch_fn, cfg, params, ema, step: int, warmup: int, began: float):
    # The schedule follows steps, or the wall-clock budget when that runs out first (max_minutes).
    progress = max(step / max(1, stage.steps), (time.monotonic() - began) / max(1e-9, stage.deadline - began))
    for group in opt.param_groups:
        group["lr"] = stage.lr * lr_factor(step, warmup, progress)
    with accel.accumulate(model):
        loss = model(**batch_fn(step))
        accel.backward(loss)
        if accel.sync_gradients:
            accel.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if ema is not None and accel.sync_gradients:
        ema.step(params)
    return loss


def _check_finite(value: float, stage: Stage, step: int, ckpt: Path, params=None) -> None:
    """Stop on a NaN/inf loss (or weights) before it reaches a checkpoint: the last good one is kept."""
    bad = not math.isfinite(value) or (params is not None and not all(torch.isfinite(p).all() for p in params))
    if bad:
        what = f"loss became {value}" if not math.isfinite(value) else "weights became NaN/inf"
        last = checkpoint_step(ckpt.parent.parent, stage.name)
        kept = f"the last good checkpoint (step {last}) is in {ckpt}" if last else "no checkpoint was saved yet"
        raise UserError(f"{stage.name}: {what} at step {step}; {kept}. Lower the learning rate and resume")


# ------------------------------------------------------------------------------------------ checkpoints
# A checkpoint folder holds model.safetensors (the trained parameters and the buffers), optimizer.safetensors +
# optimizer.json, ema.safetensors + ema.json (with an EMA), rng.safetensors, and progress.json (stage, steps,
# wall time, loss log). It is written whole into .<stage>.tmp and renamed into place; the one it replaces
# is kept as .<stage>.old until then, so a kill at any moment leaves one complete checkpoint to resume from.
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "progress.json")


def checkpoint_folder(run_dir: Path, stage: str) -> Path:
    """The stage's last complete checkpoint: checkpoints/<stage>, or the one a killed save was replacing."""
    final = Path(run_dir) / "checkpoints" / stage
    old = final.with_name(f".{stage}.old")
    return old if not final.exists() and old.is_dir() else final


def save_checkpoint(accel, folder: Path, model, opt, ema, stage: str, step: int, seconds: float,
                    log: list | None = None) -> None:
    """Write the state to resume from, atomically (see CHECKPOINT_FILES)."""
    from safetensors.torch import save_file

    accel.wait_for_everyone()
    if not accel.is_main_process:
        return
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    module = accel.unwrap_model(model)
    trained = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}
    tensors = {k: v for k, v in module.state_dict().items() if k in trained}
    optimizer, opt_json = _split(opt.state_dict())
    files = {"model.safetensors": tensors, "optimizer.safetensors": optimizer, "rng.safetensors": _rng_state()}
    meta = {"optimizer.json": opt_json}
    if ema is not None:
        files["ema.safetensors"], meta["ema.json"] = _split(ema.state_dict())
    if accel.scaler is not None:
        meta["scaler.json"] = accel.scaler.state_dict()
    for name, state in files.items():
        with atomic_path(tmp / name) as path:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    for name, data in meta.items():
        write_json(tmp / name, data)
    write_json(tmp / "progress.json", {"stage": stage, "step": step, "seconds": round(seconds, 2), "log": log or []})
    if folder.exists():  # keep the last complete checkpoint until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accel, folder: Path, model, opt, ema) -> dict:
    """Restore what save_checkpoint wrote (no pickle is read); returns progress.json. A folder that is not a
    complete checkpoint of this format is refused with one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    names = CHECKPOINT_FILES + (("ema.safetensors", "ema.json") if ema is not None else ())
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} is not a complete checkpoint of this version (no {missing[0]}); start a new run")
    try:
        progress = _read(folder / "progress.json")
        state = load_file(folder / "model.safetensors")
        check_finite(state, folder / "model.safetensors")
        module = accel.unwrap_model(model)
        result = module.load_state_dict(state, strict=False)
        trained = {n for n, p in module.named_parameters() if p.requires_grad}
        if result.unexpected_keys or trained - set(state):
            raise ValueError(f"its model does not fit this run: {(result.unexpected_keys or sorted(trained - set(state)))[0]}")
        opt.load_state_dict(_join(load_file(folder / "optimizer.safetensors"), _read(folder / "optimizer.json")))
        if ema is not None:
            ema_state = load_file(folder / "ema.safetensors")
            check_finite(ema_state, folder / "ema.safetensors")
            ema.load_state_dict(_join(ema_state, _read(folder / "ema.json")))
            ema.to(accel.device)
        if accel.scaler is not None and (folder / "scaler.json").is_file():
            accel.scaler.load_state_dict(_read(folder / "scaler.json"))
        _set_rng_state(load_file(folder / "rng.safetensors"))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot resume from {folder}: {first}") from None
    return progress


def _read(path: Path):
    return json.loads(path.read_text())


def _split(state, prefix: str = "") -> tuple[dict, object]:
    """A nested state dict -> (its tensors by dotted path, the rest as JSON with {"tensor": path} in their places)."""
    tensors = {}
    if isinstance(state, torch.Tensor):
        return {prefix: state}, {"tensor": prefix}
    if isinstance(state, dict):
        rest = {}
        for k, v in state.items():
            t, rest[str(k)] = _split(v, f"{prefix}{k}.")
            tensors.update(t)
        return tensors, {"dict": rest, "int_keys": all(isinstance(k, int) for k in state) and bool(state)}
    if isinstance(state, (list, tuple)):
        items = []
        for i, v in enumerate(state):
            t, item = _split(v, f"{prefix}{i}.")
            tensors.update(t)
            items.append(item)
        return tensors, {"list": items, "tuple": isinstance(state, tuple)}
    return {}, {"value": state}


def _join(tensors: dict, rest):
    """_split's inverse."""
    if "tensor" in rest:
        return tensors[rest["tensor"]]
    if "dict" in rest:
        return {(int(k) if rest["int_keys"] else k): _join(tensors, v) for k, v in rest["dict"].items()}
    if "list" in rest:
        items = [_join(tensors, v) for v in rest["list"]]
        return tuple(items) if rest["tuple"] else items
    return rest["value"]


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _progress(run_dir: Path, stage: str) -> dict:
    f = checkpoint_folder(run_dir, stage) / "progress.json"
    if not f.is_file():
        return {}
    try:
        progress = json.loads(f.read_text())
        if isinstance(progress, dict) and isinstance(progress.get("step", 0), int):
            return progress
    except (ValueError, UnicodeDecodeError):
        pass
    raise UserError(f"{f} is corrupt: this checkpoint cannot be resumed; start a new run")


def checkpoint_step(run_dir: Path, stage: str) -> int:
    return _progress(run_dir, stage).get("step", 0)


def checkpoint_seconds(run_dir: Path, stage: str) -> float:
    """Wall time the stage had spent when its last checkpoint was saved (0 without one)."""
    return _progress(run_dir, stage).get("seconds", 0.0)


def plot_losses(path: str | Path, log: list[dict], width: int = 640, height: int = 360) -> Path:
    """A loss-curve PNG (log10 loss against step, one colour per stage), drawn with PIL."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(r["stage"], r["step"], math.log10(max(r["loss"], 1e-8))) for r in log]
    if points:
        stages = list(dict.fromkeys(p[0] for p in points))
        x_max = max(p[1] for p in points) or 1
        lo, hi = min(p[2] for p in points), max(p[2] for p in points)
        hi = hi if hi > lo else lo + 1
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
        for k, stage in enumerate(stages):
            xy = [(40 + (width - 60) * s / x_max, 20 + (height - 50) * (hi - v) / (hi - lo))
                  for st, s, v in points if st == stage]
            if len(xy) > 1:
                draw.line(xy, fill=colours[k % 4], width=2)
            draw.text((50 + 90 * k, 4), stage, fill=colours[k % 4])
        draw.text((4, height - 16), f"step 0..{x_max}   log10 loss {lo:.2f}..{hi:.2f}", fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
