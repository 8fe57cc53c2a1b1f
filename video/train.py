"""`python run.py train temporal` / `train interpolation`: train only the temporal layers on video,
the spatial prior frozen (Make-A-Video, sec. 3.2); for interpolation and image-to-video, also the
known-frame input channels, with frames given in advance under a mask (Make-A-Video, sec. 3.3).

Data: ToyWorld clips (captioned "a blue ball bouncing", rendered at several frame rates so the fps
conditioning means something), encoded once to latents; or a folder of video files (mp4/webm,
decoded with PyAV; optional `captions.txt` of `file<TAB>caption` lines). `captions=false` trains
on unlabeled video as the paper does: every prompt is empty and the layers learn motion alone.
Loss: DDPM epsilon on the video latents (Ho et al. 2020, eq. 14); EMA of the temporal weights.

`noise_start`: the sampler's first steps see pure noise, while training at the same t sees a faint
copy of the clip (SD's schedule never reaches zero signal, Lin et al. 2024), from which the layout and
the direction of motion can be read without the prompt. A fraction of clips is therefore trained on
pure noise, with the target that makes predicting it mean predicting E[z0 | prompt]: on ToyWorld the
x0 estimate from pure noise is where the prompt's motion must show first.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from pipelines.config import option, to_dict
from pipelines.errors import UserError
from pipelines.prior import Prior, embed_tokens
from pipelines.runtime import command_line, install_dir, versions, write_json
from pipelines.training import (Stage, TrainingOptions, checkpoint_step, mixed_precision, open_run, plot_losses,
                                run_stage, step_generator)

from .temporal import TemporalConfig, inflate

logger = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
MASK_MODES = ("none", "first", "interpolation", "mixed")


@dataclass
class TrainTemporalConfig(TrainingOptions):
    model: str = option("toyworld", "the frozen prior: preset, folder or hub id")
    data: str = option("toyworld", "'toyworld' (rendered clips) or a folder of video files")
    captions: bool = option(True, "train on captions; false = caption-free, on unlabeled video")
    frames: int = option(8, "frames per training clip")
    fps_choices: tuple[float, ...] = option((4.0, 8.0, 12.0), "frame rates clips are sampled at (fps conditioning)")
    bank_size: int = option(4000, "number of training clips (rendered, or cut from the video folder)")
    steps: int = option(6000, "optimisation steps")
    batch_size: int = option(16, "clips per step per process")
    lr: float = option(3e-4, "learning rate of the temporal layers (AdamW)")
    warmup_steps: int = option(200, "linear warm-up steps (then cosine decay to 10%)")
    caption_dropout: float = option(0.1, "fraction of captions replaced by '' (classifier-free guidance)")
    ema_decay: float = option(0.999, "EMA decay of the temporal weights (0 disables EMA)")
    cond_dim: int = option(128, "width of the fps + pooled-text conditioning")
    word_states: bool = option(True, "the temporal layers also read the text encoder's word embeddings (its first "
                                     "hidden states), which keep motion words an image-only encoder learned to ignore")
    shift_rank: int = option(8, "basis kernels of the prompt-chosen depthwise 3D convolution that moves content "
                                "(0: one kernel for every prompt, which cannot tell left from right)")
    drift: bool = option(True, "each frame's features also move by a prompt-chosen velocity times the frame's time "
                               "from the clip's centre, so the noisy steps can place each frame on the prompt's path")
    mask_mode: str = option("none", "known-frame conditioning to train: none, first (image-to-video), "
                                    "interpolation (every k-th frame known, k in 2..4) or mixed (half each)")
    init: Optional[str] = option(None, "temporal layers to start from (e.g. trained ones, to fine-tune for interpolation)")
    loss_weighting: str = option("eps", "eps: the DDPM epsilon MSE; v: that error weighted by 1/alpha_bar(t) (clipped at "
                                        "max_loss_weight), the v/x0-space loss that weights the noisy steps where layout "
                                        "and motion are decided")
    max_loss_weight: float = option(20.0, "clip of the v weighting's 1/alpha_bar(t)")
    noise_start: float = option(0.0, "fraction of clips trained as the sampler's first steps see them: pure noise in, "
                                      "at t in noise_start_timesteps, target the noise that would make it from the clip")
    noise_start_timesteps: tuple[int, int] = option((900, 1000), "[first, last) timesteps of the noise_start clips")
    timesteps: tuple[int, int] = option((0, 1000), "training timesteps drawn uniformly from [first, last): a narrower, "
                                                   "noisier range trains what the frames cannot tell (the direction) harder")

    def validate(self) -> None:
        super().validate()
        for name in ("frames", "bank_size", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.fps_choices or min(self.fps_choices) <= 0:
            raise UserError("fps_choices must list positive frame rates")
        if self.mask_mode not in MASK_MODES:
            raise UserError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got '{self.mask_mode}'")
        if self.loss_weighting not in ("eps", "v") or self.max_loss_weight < 1:
            raise UserError(f"loss_weighting must be eps or v (and max_loss_weight >= 1), got {self.loss_weighting}")
        for name in ("timesteps", "noise_start_timesteps"):
            value = getattr(self, name)
            if len(value) != 2 or not 0 <= value[0] < value[1]:
                raise UserError(f"{name} must be [first, last) with 0 <= first < last, got {list(value)}")
        if not 0 <= self.noise_start <= 1:
            raise UserError(f"noise_start is a fraction of clips in [0, 1], got {self.noise_start}")
        if self.data != "toyworld" and not Path(self.data).is_dir():
            raise UserError(f"data={self.data} is neither 'toyworld' nor a folder of videos")


# ----------------------------------------------------------------------------------------------- data
def toyworld_clips(cfg: TrainTemporalConfig, size: int, progress: bool) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Rendered clips (N, 3, F, H, W) uint8, their captions and frame rates."""
    from toyworld.video import sample_clip_batch

    g = torch.Generator().manual_seed(cfg.seed)
    videos, captions, fps = [], [], []
    for start in tqdm(range(0, cfg.bank_size, 256), desc="rendering ToyWorld clips", disable=not progress):
        n = min(256, cfg.bank_size - start)
        rate = torch.tensor(cfg.fps_choices)[torch.randint(len(cfg.fps_choices), (n,), generator=g)]
        for r in rate.unique().tolist():  # the renderer takes one fps per call
            k = int((rate == r).sum())
            v, c, _ = sample_clip_batch(k, g, frames=cfg.frames, size=size, fps=r)
            videos.append((v * 255).round().to(torch.uint8)); captions += c; fps += [r] * k
    return torch.cat(videos), captions, torch.tensor(fps)


def folder_clips(cfg: TrainTemporalConfig, size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Clips cut from every readable video in `cfg.data`, every `source_fps / fps` frames, resized."""
    import av

    folder = Path(cfg.data)
    names = {}
    if (folder / "captions.txt").is_file():
        names = dict(line.split("\t", 1) for line in (folder / "captions.txt").read_text().splitlines() if "\t" in line)
    videos, captions, fps = [], [], []
    g = torch.Generator().manual_seed(cfg.seed)
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                source_fps = float(stream.average_rate or 24)
                frames = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)])
        except (av.FFmpegError, OSError, IndexError, RuntimeError) as e:
            logger.warning("skipping unreadable video %s (%s)", path.name, str(e).splitlines()[0][:80])
            continue
        frames = F.interpolate(rearrange(frames, "t h w c -> t c h w").float(), size=(size, size), mode="area")
        for rate in cfg.fps_choices:
            stride = max(1, round(source_fps / rate))
            span = stride * (cfg.frames - 1) + 1
            for start in range(0, len(frames) - span + 1, max(span // 2, 1)):
                videos.append(rearrange(frames[start:start + span:stride], "f c h w -> c f h w").round().to(torch.uint8))
                captions.append(names.get(path.name, "").strip()); fps.append(source_fps / stride)
    if not videos:
        raise UserError(f"data={folder} holds no readable video of at least {cfg.frames} frames "
                        f"({', '.join(VIDEO_SUFFIXES)})")
    keep = torch.randperm(len(videos), generator=g)[: cfg.bank_size]
    return torch.stack([videos[i] for i in keep]), [captions[i] for i in keep], torch.tensor([fps[i] for i in keep])


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
    """DDPM epsilon loss of the video UNet; only its temporal layers have trainable weights."""

    def __init__(self, video_unet, text_encoder, alphas_cumprod: torch.Tensor, weighting: str = "eps",
                 max_weight: float = 20.0):
        super().__init__()
        self.video_unet, self.text_encoder = video_unet, text_encoder
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        weight = torch.ones_like(alphas_cumprod) if weighting == "eps" else (1 / alphas_cumprod).clamp(max=max_weight)
        self.register_buffer("weight", weight / weight.mean(), persistent=False)  # mean 1 over uniform t

    def forward(self, ids, z0, noise, t, fps, mask=None, pure=None) -> torch.Tensor:
        """`pure` (b,) bool: clips whose input is the noise alone, as the sampler's first step sees it (its
        x_T holds nothing of any clip, while training's x_t at the same t still holds a faint copy of z0,
        which gives away the layout and the direction). Their target is the noise that, added to z0 at t,
        makes that input: (x_t - sqrt(abar) z0) / sqrt(1 - abar), so the UNet must predict E[z0 | prompt]."""
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        if pure is not None:
            pure = pure.view(-1, 1, 1, 1, 1)
            x_t = torch.where(pure, noise, x_t)
            noise = torch.where(pure, (noise - abar.sqrt() * z0) / (1 - abar).sqrt(), noise)
        with torch.no_grad():
            emb, words = embed_tokens(self.text_encoder, ids, words=self.video_unet.temporal.cfg.word_states)
        known = None if mask is None else z0  # the known frames are given clean, as at inference
        pred = self.video_unet(x_t, t, emb, fps=fps, known=known, mask=mask, words=words).sample
        per_clip = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3, 4))
        return (self.weight[t] * per_clip).mean()


def main(cfg: TrainTemporalConfig, out: str | Path = "outputs", progress: bool = True) -> Path:
    import json
    import time

    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    name = "temporal" if cfg.mask_mode == "none" else "interpolation"
    run_dir, cfg = open_run(TrainTemporalConfig, f"train_{name}", cfg, out, name)
    try:  # a bad option found while loading leaves no run directory behind
        started = time.monotonic()
        accel = Accelerator(mixed_precision=mixed_precision(cfg.mixed_precision, cfg.device),
                            gradient_accumulation_steps=cfg.grad_accum, cpu=cfg.device == "cpu")
        device, rank, show = accel.device, accel.process_index, progress and accel.is_main_process
        prior = Prior.from_pretrained(cfg.model, device, torch.float32)  # frozen; autocast handles precision
        for option_name in ("timesteps", "noise_start_timesteps"):
            if getattr(cfg, option_name)[0] >= prior.num_train_timesteps:
                raise UserError(f"{option_name}={list(getattr(cfg, option_name))}: the model has "
                                f"{prior.num_train_timesteps} training timesteps")

        # 1. clips -> latents, captions -> token ids (once, so a step does no decoding or string work)
        clips, captions, fps = (toyworld_clips(cfg, prior.default_size, show) if cfg.data == "toyworld"
                                else folder_clips(cfg, prior.default_size))
        latents = encode_clips(prior, clips)
        if not cfg.captions:
            captions = [""] * len(captions)
        tok = prior.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    except UserError:
        if cfg.resume is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    # 2. the video UNet: identity-initialised temporal layers (or the checkpoint's), spatial frozen
    torch.manual_seed(cfg.seed)
    video_unet = inflate(prior.unet, TemporalConfig(text_dim=prior.unet.config.cross_attention_dim,
                                                    cond_dim=cfg.cond_dim, window=cfg.frames,
                                                    word_states=cfg.word_states, shift_rank=cfg.shift_rank,
                                                    drift=cfg.drift,
                                                    time_range=(cfg.frames - 1) / 2 / float(fps.min())),
                        weights=cfg.init)
    video_unet.freeze_spatial()
    params = [p for p in video_unet.temporal.parameters()]
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True) if cfg.ema_decay > 0 else None

    def batch(step):
        g = step_generator(cfg.seed, name, step, rank)
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=g)
        dropped = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=g)
        t = torch.randint(cfg.timesteps[0], min(cfg.timesteps[1], prior.num_train_timesteps), (cfg.batch_size,), generator=g)
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
    done = run_stage(accel, stage, TemporalObjective(video_unet, prior.text_encoder, prior.alphas_cumprod, cfg.loss_weighting, cfg.max_loss_weight), params,
                     batch, cfg, run_dir, checkpoint_step(run_dir, name), ema=ema, progress=progress, log=log)

    # 3. save the EMA temporal layers on their own (safetensors + config), next to nothing else
    if accel.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        folder = video_unet.temporal.to(torch.float32).save(run_dir / "motion").parent
        summary = {"steps": done, "clips": len(latents), "data": cfg.data, "captions": cfg.captions,
                   "model": prior.model_id, "command": command_line(), "device": str(device),
                   "mixed_precision": accel.mixed_precision, "wall_s": round(time.monotonic() - started, 1),
                   "versions": versions(), "config": to_dict(cfg)}
        write_json(folder / "training.json", summary)
        write_json(run_dir / "metadata.json", summary)
        write_json(log_file, log)
        plot_losses(run_dir / "loss_curve.png", log)
        if cfg.save_to:
            install_dir(folder, Path(cfg.save_to))
        logger.info("temporal layers saved to %s", folder)
    return run_dir
