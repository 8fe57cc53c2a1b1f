"""What every trainer shares (`run.py train prior|judge|temporal`): run directories that resume,
the Accelerate optimisation loop with checkpoints, per-step generators, and a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import changed, job_defaults
from .errors import UserError
from .rundir import RunDir
from .runtime import atomic_path, write_json

logger = logging.getLogger(__name__)


def step_generator(seed: int, stage: str, step: int, process: int) -> torch.Generator:
    """A generator per (stage, step, process): the data stream is reproducible and resumes exactly."""
    return torch.Generator().manual_seed(((seed * 7 + zlib.crc32(stage.encode())) * 1_000_003 + step) * 1009 + process)


def mixed_precision(name: str, device: str) -> str:
    """auto -> bf16 autocast on capable GPUs, none on CPU."""
    if name != "auto":
        return name
    return "bf16" if device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def open_run(cfg, out: str | Path, name: str) -> tuple[RunDir, object]:
    """A new run folder OUT/train/<time>-<name>, or the one `cfg.resume` names with its saved options plus
    those this command changed (`resume=RUN unet_steps=50000` trains on to 50k steps); the architecture
    (`arch.`, `layers.`) cannot change."""
    if cfg.resume is None:
        run = RunDir.create(out, "train", name)
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
    if ema is not None:
        accel.register_for_checkpointing(ema)
    ckpt = run_dir / "checkpoints" / stage.name
    earlier = checkpoint_seconds(run_dir, stage.name) if start > 0 else 0.0  # this stage's time in earlier sessions
    if start > 0:
        accel.load_state(str(ckpt))
        if ema is not None:
            ema.to(accel.device)  # EMAModel.load_state_dict leaves its shadow weights on the CPU
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=f"train {stage.name}",
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
                save_checkpoint(accel, ckpt, stage.name, done, earlier + time.monotonic() - began)
            if after_step is not None:
                after_step(step)
            if time.monotonic() > stage.deadline and done < stage.steps:
                logger.info("%s stage stopped by max_minutes at step %d/%d", stage.name, done, stage.steps)
                return done
    except KeyboardInterrupt:
        if done > start and all(torch.isfinite(p).all() for p in params):
            save_checkpoint(accel, ckpt, stage.name, done, earlier + time.monotonic() - began)
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


def save_checkpoint(accel, folder: Path, stage: str, step: int, seconds: float) -> None:
    """Accelerate's state, plus progress.json: the steps done and the stage's wall time so far, over all sessions."""
    accel.wait_for_everyone()
    accel.save_state(str(folder))
    if accel.is_main_process:
        write_json(folder / "progress.json", {"stage": stage, "step": step, "seconds": round(seconds, 2)})


def _progress(run_dir: Path, stage: str) -> dict:
    f = run_dir / "checkpoints" / stage / "progress.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def checkpoint_step(run_dir: Path, stage: str) -> int:
    return _progress(run_dir, stage).get("step", 0)


def checkpoint_seconds(run_dir: Path, stage: str) -> float:
    """Wall time the stage had spent when its last checkpoint was saved (0 without one, or from before it was kept)."""
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
