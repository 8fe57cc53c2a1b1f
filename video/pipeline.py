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
from pipelines.image import from_pil
from pipelines.options import SamplingOptions
from pipelines.prior import Prior
from pipelines.runtime import Timer, command_line, make_run_dir, pick_device, versions, write_json, write_yaml
from pipelines.sampling import initial_noise, sample

from .export import write_frames, write_gif, write_mp4
from .temporal import CONFIG_NAME, WEIGHTS_NAME, VideoUNet, inflate

logger = logging.getLogger(__name__)
MAX_FRAMES = 256  # longer than the trained window: temporal attention runs in overlapping windows


@dataclass
class VideoConfig(SamplingOptions):
    frames: int = option(16, f"number of frames (1..{MAX_FRAMES})")
    fps: float = option(8.0, "frames per second of the clip (also conditions the motion speed); with interpolate=k "
                             "the video is written at k * fps, so it lasts as long and moves more smoothly")
    motion: Optional[str] = option(None, "trained temporal layers, or an AnimateDiff MotionAdapter (default: the preset's `motion:`)")
    interpolate: int = option(1, "frame interpolation factor k: F frames become (F - 1) * k + 1 (needs a masked-frame model)")
    image: Optional[str] = option(None, "animate this image: it becomes the first frame (needs a masked-frame model)")
    masked_motion: Optional[str] = option(None, "masked-frame model from `train interpolation` (default: the preset's `interpolation:`)")
    interpolate_strength: float = option(0.3, "interpolate=: 1 fills the frames in between from pure noise; lower starts "
                                              "them from their neighbours' blend noised that far up the schedule (SDEdit)")
    replace_known: bool = option(True, "with interpolate= or image=, each step's input at the known frames is those frames "
                                       "noised to the step, as in training (false: only the mask channels carry them)")
    save_frames: bool = option(False, "also write every frame as a PNG under frames/")

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.frames <= MAX_FRAMES:
            raise UserError(f"frames must be between 1 and {MAX_FRAMES}, got {self.frames}")
        if not self.fps > 0 or self.fps == float("inf"):
            raise UserError(f"fps must be a positive number, got {self.fps}")
        if self.interpolate < 1:
            raise UserError(f"interpolate must be at least 1 (1 = no interpolation), got {self.interpolate}")
        if (self.frames - 1) * self.interpolate + 1 > 4 * MAX_FRAMES:
            raise UserError(f"frames={self.frames} with interpolate={self.interpolate} makes more than {4 * MAX_FRAMES} frames")
        if not 0 < self.interpolate_strength <= 1:
            raise UserError(f"interpolate_strength must be in (0, 1], got {self.interpolate_strength}")
        if self.image is not None and not Path(self.image).is_file():
            raise UserError(f"image={self.image} does not exist")

    @property
    def output_fps(self) -> float:
        """Frame rate of the written video: interpolate=k puts k - 1 frames between each pair, 1 / (k fps) apart."""
        return self.fps * self.interpolate


def load_motion(prior: Prior, motion: str | None, unet: nn.Module | None = None) -> nn.Module:
    """Inflate the prior's 2D UNet (or `unet`) with temporal layers: ours (`train temporal`), an AnimateDiff
    `MotionAdapter` (folder or hub id), or fresh identity layers when `motion` is None."""
    unet = prior.unet if unet is None else unet
    if motion is None:
        logger.warning("no trained temporal layers for %s: the frames are independent images "
                       "(pass motion=FOLDER made by `python run.py train temporal`)", prior.model_id)
        return inflate(unet)
    folder = _motion_folder(motion)
    try:
        if (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file():
            return inflate(unet, weights=folder)
        if _is_motion_adapter(folder):
            return AnimateDiffUNet.from_adapter(unet, folder)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"motion={motion} does not fit model {prior.model_id}: {str(e).splitlines()[0][:160]}") from None
    raise UserError(f"motion={motion} is not a motion module: expected {WEIGHTS_NAME} + {CONFIG_NAME} "
                    f"(`python run.py train temporal`) or an AnimateDiff MotionAdapter folder")


def _motion_folder(motion: str) -> Path:
    from pipelines.loading import download, looks_like_hub_id

    path = Path(motion).expanduser()
    if path.is_dir():
        return path
    if looks_like_hub_id(motion):
        return download(motion, None)
    raise UserError(f"motion={motion}: no such folder")


def _is_motion_adapter(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "MotionAdapter"


class AnimateDiffUNet(nn.Module):
    """diffusers' UNetMotionModel (the 2D UNet + an AnimateDiff MotionAdapter) behind the same call
    as our VideoUNet: (b, c, f, h, w) in and out. AnimateDiff has no fps conditioning and no word-embedding input, so fps and words are unused."""

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

    def forward(self, sample, timestep, encoder_hidden_states, fps=None, words=None, **unet_kwargs):
        # UNetMotionModel folds frames into the batch but expects the text already repeated per frame.
        text = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return self.model(sample, timestep, encoder_hidden_states=text, **unet_kwargs)


@torch.no_grad()
def generate(prior: Prior, prompt: str, cfg: VideoConfig, generator: torch.Generator, timer: Timer | None = None,
             progress: bool = True, masked_unet: nn.Module | None = None,
             first_frame: torch.Tensor | None = None) -> torch.Tensor:
    """One clip for `prompt`: (F', 3, H, W) in [0, 1], F' = (frames - 1) * interpolate + 1.

    1. the clip: `prior.unet` (a video UNet), or with `first_frame` (1, 3, H, W) the masked-frame model
       with frame 0 known (image-to-video); 2. with interpolate=k, the masked-frame model fills k - 1
       frames between each pair, the clip's frames known, conditioned on k * fps (Make-A-Video's frame
       interpolation)."""
    timer = timer or Timer()
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)
    f = prior.vae_scale_factor
    with timer("encode_prompt"):
        text = prior.encode_prompt([prompt], cfg.negative, words=True)
    with timer("denoise"):
        shape = (1, prior.latent_channels, cfg.frames, height // f, width // f)
        known = None
        if first_frame is not None:
            known = torch.zeros(shape, device=prior.device)
            known[:, :, 0] = prior.encode_images(first_frame.to(prior.device), sample=False)
        latents = denoise(prior, masked_unet if known is not None else prior.unet, text, shape, cfg, generator,
                          progress, known)
        if cfg.interpolate > 1:
            k = cfg.interpolate
            known = torch.zeros(*shape[:2], (cfg.frames - 1) * k + 1, *shape[3:], device=prior.device)
            known[:, :, ::k] = latents
            latents = denoise(prior, masked_unet, text, known.shape, cfg, generator, progress, known, cfg.output_fps,
                              init=blend_known(known, k), strength=cfg.interpolate_strength)
    with timer("decode"):  # frames decode `decode_chunk` at a time, so memory does not grow with the length
        return prior.decode_latents(rearrange(latents, "b c f h w -> (b f) c h w"), cfg.decode_chunk)


def denoise(prior: Prior, unet: nn.Module, text, shape: tuple, cfg: VideoConfig, generator: torch.Generator,
            progress: bool, known: torch.Tensor | None = None, fps: float | None = None,
            init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Sample video latents of `shape` with `unet`; frames where `known` is non-zero are given (mask 1) and
    come back exactly as given. `fps` conditions the temporal layers (default: the clip's `cfg.fps`); `init`
    and `strength` < 1 start from `init` part of the way up the schedule (`pipelines.sampling.sample`)."""
    latents = reschedule_noise(initial_noise(shape, generator, prior.device), temporal_window(unet), generator)
    kwargs = {"fps": fps or cfg.fps, "init": init, "strength": strength}
    if known is not None:
        kwargs.update(known=known, mask=(known.abs().sum(1, keepdim=True) > 0).float())
        if cfg.replace_known:
            kwargs["given"] = (known, kwargs["mask"])
    spatial, prior.unet = prior.unet, unet
    try:
        latents = sample(prior, text, latents, cfg.sampler, cfg.steps, cfg.guidance, generator, progress, **kwargs)
    finally:
        prior.unet = spatial
    return latents if known is None else torch.where(kwargs["mask"].bool(), known.to(latents.dtype), latents)


def blend_known(known: torch.Tensor, k: int) -> torch.Tensor:
    """Latents (b, c, F, h, w) whose every k-th frame is given: each frame between two given ones as their
    linear blend (the cross-fade an interpolation starts from with interpolate_strength < 1)."""
    out = known.clone()
    for j in range(known.shape[2]):
        a, w = (j // k) * k, (j % k) / k
        if w:
            out[:, :, j] = (1 - w) * known[:, :, a] + w * known[:, :, a + k]
    return out


def temporal_window(unet) -> int:
    """Frames the video UNet's temporal attention sees at once (longer clips run in overlapping windows)."""
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
    timer = Timer()
    with timer("load"):
        prior, motion, masked = load_video_prior(cfg)
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)  # fail before writing anything
    first = load_image(cfg.image, height, width) if cfg.image else None
    with timer("hash"):
        model_hash = prior.content_hash()
    return [run(prior, prompt, cfg, cfg.seed + i, out, model_hash, timer.stages, progress, motion, masked, first)
            for i, prompt in enumerate(prompts)]


def load_video_prior(cfg: VideoConfig, masked: bool | None = None) -> tuple[Prior, str | None, nn.Module | None]:
    """The prior with its UNet inflated by `cfg.motion` (or the preset's), the motion folder used, and the
    masked-frame model when `masked` (default: when interpolate= or image= needs one)."""
    device = pick_device(cfg.device)
    prior = Prior.from_options(cfg, device, speed_up=False)  # the fast path goes on after inflation
    motion = cfg.motion or default_motion(cfg.model)
    spatial = prior.unet
    prior.unet = load_motion(prior, motion)
    if masked is None:
        masked = cfg.interpolate > 1 or cfg.image is not None
    masked_unet = load_masked(spatial, prior, cfg) if masked else None
    prior.speed_up(cfg.fuse_qkv, cfg.channels_last, cfg.compile, cfg.cuda_graphs)  # the masked model shares the spatial UNet, fused here
    return prior, motion, masked_unet


def load_masked(spatial: nn.Module, prior: Prior, cfg: VideoConfig) -> nn.Module:
    """The masked-frame model that interpolate= and image= need (its own temporal layers on the same UNet)."""
    folder = cfg.masked_motion or default_motion(cfg.model, "interpolation")
    if folder is None:
        raise UserError("interpolate= and image= need a masked-frame model: train one with "
                        "`python run.py train interpolation init=MOTION_FOLDER` and pass masked_motion=FOLDER")
    masked = load_motion(prior, folder, unet=spatial)
    if not isinstance(masked, VideoUNet):
        raise UserError(f"masked_motion={folder} must come from `python run.py train interpolation`")
    return masked


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """The first frame for image=: (1, 3, H, W) in [0, 1], resized (with a note) to the clip's size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"image={path} cannot be read as an image ({str(e).splitlines()[0][:80]})") from None
    if image.size != (width, height):
        logger.warning("image=%s is %dx%d; resized to the clip's %dx%d", path, *image.size, width, height)
        image = image.resize((width, height), Image.BICUBIC)
    return from_pil(image)


def default_motion(model: str, key: str = "motion") -> str | None:
    """A model preset may name its shipped temporal layers (`motion:` / `interpolation:` in configs/models/)."""
    from pipelines.loading import REPO_ROOT, model_presets

    motion = model_presets().get(model, {}).get(key)
    return str(REPO_ROOT / motion) if motion else None


def run(prior: Prior, prompt: str, cfg: VideoConfig, seed: int, out: str | Path, model_hash: str,
        setup_s: dict, progress: bool = True, motion: str | None = None, masked: nn.Module | None = None,
        first_frame: torch.Tensor | None = None) -> Path:
    run_dir = make_run_dir(out, "video", prompt)
    write_yaml(run_dir / "config.yaml", {"prompt": prompt, **to_dict(cfg), "seed": seed, "command": command_line()})
    timer = Timer()
    timer.stages.update(setup_s)
    frames = generate(prior, prompt, cfg, torch.Generator("cpu").manual_seed(seed), timer, progress, masked, first_frame)
    with timer("save"):
        outputs = [write_mp4(run_dir / "video.mp4", frames, cfg.output_fps).name,
                   write_gif(run_dir / "preview.gif", frames, cfg.output_fps).name]
        if cfg.save_frames:
            outputs += [f"frames/{p.name}" for p in write_frames(run_dir / "frames", frames)]
    write_json(run_dir / "metadata.json", {
        "job": "video", "prompt": prompt, "negative": cfg.negative, "seed": seed, "model": prior.model_id,
        "model_hash": model_hash, "motion": motion, "device": str(prior.device),
        "dtype": str(prior.dtype).removeprefix("torch."), "frames": len(frames), "fps": cfg.output_fps,
        "interpolate": cfg.interpolate, "image": cfg.image,
        "masked_motion": None if masked is None else cfg.masked_motion or default_motion(cfg.model, "interpolation"),
        "interpolate_strength": cfg.interpolate_strength if cfg.interpolate > 1 else None,
        "height": frames.shape[-2], "width": frames.shape[-1], "outputs": outputs, "timings_s": timer.stages,
        "versions": versions(), "command": command_line(),
    })
    logger.info("wrote %d frames to %s", len(frames), run_dir / "video.mp4")
    return run_dir
