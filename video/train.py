"""`python run.py train temporal` / `train interpolation`: only the temporal layers train, the prior frozen
(Make-A-Video, sec. 3.2); for interpolation and image-to-video also the known-frame input channels, with
frames given in advance under a mask (sec. 3.3). Clips come from a clip source (`video.data`): ToyWorld's
renders or a folder of videos; `captions=false` trains on unlabeled video. The loss is the prior's own
`training_target` (epsilon or v) on the video latents, with an EMA of the temporal weights; docs/video.md
has the recipe and why `noise_start` trains some clips on the sampler's pure-noise input.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from einops import rearrange

from pipelines.config import to_dict
from pipelines.errors import UserError
from pipelines.prior import Prior
from pipelines.runtime import install_dir, write_json
from pipelines.training import (Stage, accelerator, checkpoint_step, open_run, plot_losses, run_stage,
                                step_generator)

from .config import TrainTemporalConfig
from .data import ClipSource
from .temporal import TemporalConfig, inflate

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_clips(prior: Prior, clips: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """uint8 clips (N, 3, F, H, W) -> latents (N, C, F, h, w), float32 on the prior's device."""
    n, f = clips.shape[0], clips.shape[2]
    frames = rearrange(clips, "n c f h w -> (n f) c h w")
    latents = torch.cat([prior.encode_images(frames[i:i + chunk].float() / 255, sample=False, chunk=chunk)
                         for i in range(0, len(frames), chunk)])
    return rearrange(latents, "(n f) c h w -> n c f h w", n=n, f=f)


def known_frames_mask(mode: str, n: int, frames: int, g: torch.Generator) -> torch.Tensor | None:
    """(n, 1, F, 1, 1) masks of the frames given in advance: frame 0 (image-to-video) or every k-th
    frame (interpolation, k in 2..4); `mixed` draws one of the two per clip."""
    if mode == "none":
        return None
    first = torch.zeros(n, frames)
    first[:, 0] = 1
    k = torch.randint(2, 5, (n, 1), generator=g)
    every_k = (torch.arange(frames)[None, :] % k == 0).float()
    pick = {"first": torch.ones(n, 1), "interpolation": torch.zeros(n, 1),
            "mixed": (torch.rand(n, 1, generator=g) < 0.5).float()}[mode]
    return (pick * first + (1 - pick) * every_k)[:, None, :, None, None]


# ------------------------------------------------------------------------------------------ training
class TemporalObjective(torch.nn.Module):
    """The diffusion loss of the video UNet against the prior's training target (epsilon or v, as the prior
    predicts), counted in epsilon units so that `weighting` means the same on any prior; only the temporal
    layers train. The prior is held, not registered: it is frozen and stays out of the checkpoints."""

    def __init__(self, video_unet, prior: Prior, weighting: str = "eps", max_weight: float = 20.0):
        super().__init__()
        self.video_unet, self.prior = video_unet, prior
        abar = prior.alphas_cumprod
        weight = torch.ones_like(abar) if weighting == "eps" else (1 / abar).clamp(max=max_weight)
        weight = weight / weight.mean() * prior.eps_error_factor()  # mean 1 over uniform t, in epsilon units
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, ids, z0, noise, t, fps, mask=None, pure=None) -> torch.Tensor:
        """`pure` (b,) bool: clips whose input is the noise alone, as the sampler's first step sees it (its
        x_T holds nothing of any clip, while training's x_t at the same t still holds a faint copy of z0,
        which gives away the layout and the direction). Their target is the noise that, added to z0 at t,
        makes that input: (x_t - sqrt(abar) z0) / sqrt(1 - abar), so the UNet must predict E[z0 | prompt]."""
        prior = self.prior
        x_t = prior.add_noise(z0, noise, t)
        if pure is not None:
            pure = pure.view(-1, 1, 1, 1, 1)
            x_t = torch.where(pure, noise, x_t)
            noise = torch.where(pure, prior.eps_from_x0(noise, z0, t), noise)  # the noise that makes x_t = noise
        with torch.no_grad():
            emb, words = prior.embed(ids, words=self.video_unet.temporal.cfg.word_states)
        known = None if mask is None else z0  # the known frames are given clean, as at inference
        pred = self.video_unet(x_t, t, emb, fps=fps, known=known, mask=mask, words=words).sample
        target = prior.training_target(z0, noise, t)
        per_clip = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3, 4))
        return (self.weight[t] * per_clip).mean()


def main(cfg: TrainTemporalConfig, out: str | Path = "outputs", progress: bool = True, *,
         clip_source: Callable[[str], ClipSource]) -> Path:
    """Train, or with `cfg.resume` train on; `clip_source(data)` gives the clips the run's `data=` names."""
    name = cfg.stage
    run_dir, cfg = open_run(cfg, out, name)
    run_dir.keep = lambda: checkpoint_step(run_dir.path, name) > 0  # a failed new run keeps only a resumable folder
    with run_dir:
        return _train(cfg, run_dir, name, progress, clip_source)


def _train(cfg: TrainTemporalConfig, run_dir, name: str, progress: bool, clip_source) -> Path:
    from diffusers.training_utils import EMAModel

    started = time.monotonic()
    accel = accelerator(cfg.device, cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    device, rank, show = accel.device, accel.process_index, progress and accel.is_main_process
    prior = Prior.from_pretrained(cfg.model, device, torch.float32)  # frozen; autocast handles precision
    if cfg.noise_start_timesteps[0] >= prior.num_train_timesteps:
        raise UserError(f"noise_start_timesteps={list(cfg.noise_start_timesteps)}: the model has "
                        f"{prior.num_train_timesteps} training timesteps")

    # 1. clips -> latents, captions -> token ids (once, so a step does no decoding or string work)
    clips = clip_source(cfg.data)  # the resumed run's data, not this command's default
    videos, captions, fps = clips(cfg.bank_size, cfg.frames, prior.default_size, cfg.fps_choices, cfg.seed, show)
    latents = encode_clips(prior, videos)
    ids = prior.tokenize(captions if cfg.captions else [""] * len(captions))
    empty = prior.tokenize([""])

    # 2. the video UNet: identity-initialised temporal layers (or the checkpoint's), spatial frozen
    torch.manual_seed(cfg.seed)
    layers = TemporalConfig(**to_dict(cfg.layers), text_dim=prior.unet.config.cross_attention_dim, window=cfg.frames,
                            time_range=(cfg.frames - 1) / 2 / float(fps.min()))
    video_unet = inflate(prior.unet, layers, weights=cfg.init)
    video_unet.freeze_spatial()
    params = [p for p in video_unet.temporal.parameters()]
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True) if cfg.ema_decay > 0 else None

    def batch(step):
        g = step_generator(cfg.seed, name, step, rank)
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=g)
        dropped = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=g)
        t = torch.randint(prior.num_train_timesteps, (cfg.batch_size,), generator=g)
        mask = known_frames_mask(cfg.mask_mode, cfg.batch_size, cfg.frames, g)
        pure = None
        if cfg.noise_start > 0:
            pure = torch.rand(cfg.batch_size, generator=g) < cfg.noise_start
            late = torch.randint(cfg.noise_start_timesteps[0], min(cfg.noise_start_timesteps[1], prior.num_train_timesteps),
                                 (cfg.batch_size,), generator=g)
            t = torch.where(pure, late, t)
        return {"ids": torch.where(dropped[:, None], empty, ids[idx]).to(device), "z0": latents[idx.to(device)],
                "noise": noise.to(device), "t": t.to(device), "fps": fps[idx].to(device),
                "mask": None if mask is None else mask.to(device), "pure": None if pure is None else pure.to(device)}

    log_file = run_dir / "losses.json"
    log = json.loads(log_file.read_text()) if log_file.is_file() else []
    stage = Stage(name, cfg.steps, cfg.lr, started + (cfg.max_minutes * 60 if cfg.max_minutes else float("inf")))
    objective = TemporalObjective(video_unet, prior, cfg.loss_weighting, cfg.max_loss_weight)
    done = run_stage(accel, stage, objective, params, batch, cfg, run_dir.path, checkpoint_step(run_dir.path, name),
                     ema=ema, progress=progress, log=log)

    # 3. save the EMA temporal layers on their own (safetensors + config), next to nothing else
    if accel.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        folder = video_unet.temporal.to(torch.float32).save(run_dir / "motion").parent
        summary = {"steps": done, "clips": len(latents), "data": cfg.data, "captions": cfg.captions,
                   "model": prior.model_id, "device": str(device), "mixed_precision": accel.mixed_precision,
                   "wall_s": round(time.monotonic() - started, 1), "config": to_dict(cfg)}
        run_dir.write_metadata(**summary)
        write_json(folder / "training.json", run_dir.metadata())
        write_json(log_file, log)
        plot_losses(run_dir / "loss_curve.png", log)
        if cfg.save_to:
            install_dir(folder, Path(cfg.save_to))
        logger.info("temporal layers saved to %s", folder)
    return run_dir.path
