"""The video job: `python run.py video "a red ball moving right"` -> video.mp4, preview.gif, frames/.

The prior's UNet is inflated with temporal layers (`video.temporal`) and sampled with the same
loop as images (`pipelines.sampling.sample`), on latents shaped (b, c, f, h, w).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from pipelines.config import option, to_dict
from pipelines.errors import UserError
from pipelines.options import SamplingOptions
from pipelines.prior import Prior
from pipelines.runtime import Timer, command_line, make_run_dir, pick_device, pick_dtype, versions, write_json, write_yaml
from pipelines.sampling import initial_noise, sample

from .export import write_frames, write_gif, write_mp4
from .temporal import CONFIG_NAME, WEIGHTS_NAME, inflate

logger = logging.getLogger(__name__)
MAX_FRAMES = 256  # longer than the trained window: temporal attention runs in overlapping windows


@dataclass
class VideoConfig(SamplingOptions):
    frames: int = option(16, f"number of frames (1..{MAX_FRAMES})")
    fps: float = option(8.0, "frames per second of the clip (also conditions the motion speed)")
    motion: Optional[str] = option(None, "folder of trained temporal layers (default: the model preset's `motion:`)")
    save_frames: bool = option(False, "also write every frame as a PNG under frames/")

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.frames <= MAX_FRAMES:
            raise UserError(f"frames must be between 1 and {MAX_FRAMES}, got {self.frames}")
        if not self.fps > 0 or self.fps == float("inf"):
            raise UserError(f"fps must be a positive number, got {self.fps}")


def load_motion(prior: Prior, motion: str | None) -> nn.Module:
    """Inflate the prior's UNet with temporal layers: ours (`train temporal`), an AnimateDiff
    `MotionAdapter` (folder or hub id), or fresh identity layers when `motion` is None."""
    if motion is None:
        logger.warning("no trained temporal layers for %s: the frames are independent images "
                       "(pass motion=FOLDER made by `python run.py train temporal`)", prior.model_id)
        return inflate(prior.unet)
    folder = _motion_folder(motion)
    try:
        if (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file():
            return inflate(prior.unet, weights=folder)
        if _is_motion_adapter(folder):
            return AnimateDiffUNet.from_adapter(prior.unet, folder)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"motion={motion} does not fit model {prior.model_id}: {str(e).splitlines()[0][:160]}") from None
    raise UserError(f"motion={motion} is not a motion module: expected {WEIGHTS_NAME} + {CONFIG_NAME} "
                    f"(`python run.py train temporal`) or an AnimateDiff MotionAdapter folder")


def _motion_folder(motion: str) -> Path:
    from pipelines.loading import _download, _looks_like_hub_id

    path = Path(motion).expanduser()
    if path.is_dir():
        return path
    if _looks_like_hub_id(motion):
        return _download(motion, None)
    raise UserError(f"motion={motion}: no such folder")


def _is_motion_adapter(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "MotionAdapter"


class AnimateDiffUNet(nn.Module):
    """diffusers' UNetMotionModel (the 2D UNet + an AnimateDiff MotionAdapter) behind the same call
    as our VideoUNet: (b, c, f, h, w) in and out. AnimateDiff has no fps conditioning, so fps is unused."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def from_adapter(cls, unet: nn.Module, folder: Path) -> "AnimateDiffUNet":
        from diffusers import MotionAdapter, UNetMotionModel

        adapter = MotionAdapter.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        param = next(unet.parameters())
        model = UNetMotionModel.from_unet2d(unet, adapter).to(param.device, param.dtype).eval().requires_grad_(False)
        return cls(model)

    @property
    def config(self):
        return self.model.config

    def forward(self, sample, timestep, encoder_hidden_states, fps=None, **unet_kwargs):
        # UNetMotionModel folds frames into the batch but expects the text already repeated per frame.
        text = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return self.model(sample, timestep, encoder_hidden_states=text, **unet_kwargs)


@torch.no_grad()
def generate(prior: Prior, prompt: str, cfg: VideoConfig, generator: torch.Generator,
             timer: Timer | None = None, progress: bool = True) -> torch.Tensor:
    """One clip for `prompt`: (F, 3, H, W) in [0, 1]. `prior.unet` must be a VideoUNet."""
    timer = timer or Timer()
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)
    f = prior.vae_scale_factor
    with timer("encode_prompt"):
        text = prior.encode_prompt([prompt], cfg.negative)
    with timer("denoise"):
        latents = initial_noise((1, prior.latent_channels, cfg.frames, height // f, width // f), generator, prior.device)
        latents = reschedule_noise(latents, _window(prior.unet), generator)
        latents = sample(prior, text, latents, cfg.sampler, cfg.steps, cfg.guidance, generator, progress, fps=cfg.fps)
    with timer("decode"):  # frames decode `decode_chunk` at a time, so memory does not grow with the length
        return prior.decode_latents(rearrange(latents, "b c f h w -> (b f) c h w"), cfg.decode_chunk)


def _window(unet) -> int:
    temporal = getattr(unet, "temporal", None)
    return temporal.cfg.window if temporal is not None else 10**9  # AnimateDiff: its own full attention


def reschedule_noise(latents: torch.Tensor, window: int, generator: torch.Generator) -> torch.Tensor:
    """FreeNoise's noise rescheduling (Qiu et al. 2023, sec. 3.2): frames past the first window reuse the
    first window's noise frames, shuffled per window, so far-apart windows start from correlated noise."""
    frames = latents.shape[2]
    if frames <= window:
        return latents
    out = latents.clone()
    for start in range(window, frames, window):
        order = torch.randperm(window, generator=generator)[: min(window, frames - start)]
        out[:, :, start:start + len(order)] = latents[:, :, order.to(latents.device)]
    return out


def main(cfg: VideoConfig, prompts: list[str], out: str | Path, progress: bool = True) -> list[Path]:
    device = pick_device(cfg.device)
    timer = Timer()
    with timer("load"):
        prior = Prior.from_pretrained(cfg.model, device, pick_dtype(cfg.dtype, device), cfg.allow_pickle,
                                      cfg.beta_schedule, cfg.revision)
        motion = cfg.motion or default_motion(cfg.model)
        prior.unet = load_motion(prior, motion)
    cfg.image_size(prior.default_size, prior.vae_scale_factor)  # fail on a bad size before writing anything
    with timer("hash"):
        model_hash = prior.content_hash()
    return [run(prior, prompt, cfg, cfg.seed + i, out, model_hash, timer.stages, progress, motion)
            for i, prompt in enumerate(prompts)]


def default_motion(model: str) -> str | None:
    """A model preset may name its shipped temporal layers (`motion:` in configs/models/<name>.yaml)."""
    from pipelines.loading import REPO_ROOT, model_presets

    motion = model_presets().get(model, {}).get("motion")
    return str(REPO_ROOT / motion) if motion else None


def run(prior: Prior, prompt: str, cfg: VideoConfig, seed: int, out: str | Path, model_hash: str,
        setup_s: dict, progress: bool = True, motion: str | None = None) -> Path:
    run_dir = make_run_dir(out, "video", prompt)
    write_yaml(run_dir / "config.yaml", {"prompt": prompt, **to_dict(cfg), "seed": seed, "command": command_line()})
    timer = Timer()
    timer.stages.update(setup_s)
    frames = generate(prior, prompt, cfg, torch.Generator("cpu").manual_seed(seed), timer, progress)
    with timer("save"):
        outputs = [write_mp4(run_dir / "video.mp4", frames, cfg.fps).name,
                   write_gif(run_dir / "preview.gif", frames, cfg.fps).name]
        if cfg.save_frames:
            outputs += [f"frames/{p.name}" for p in write_frames(run_dir / "frames", frames)]
    write_json(run_dir / "metadata.json", {
        "job": "video", "prompt": prompt, "negative": cfg.negative, "seed": seed, "model": prior.model_id,
        "model_hash": model_hash, "motion": motion, "device": str(prior.device),
        "dtype": str(prior.dtype).removeprefix("torch."), "frames": cfg.frames, "fps": cfg.fps,
        "height": frames.shape[-2], "width": frames.shape[-1], "outputs": outputs, "timings_s": timer.stages,
        "versions": versions(), "command": command_line(),
    })
    logger.info("wrote %d frames to %s", cfg.frames, run_dir / "video.mp4")
    return run_dir
