"""The video job: `python run.py video "a red ball moving right"` -> video.mp4, preview.gif, frames/.

The prior's UNet inflated with temporal layers (`video.temporal`, or an AnimateDiff MotionAdapter) is
passed to the prior as its denoiser and sampled by the same loop as images, on latents (b, c, f, h, w).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from pipelines.errors import UserError
from pipelines.loading import (MOTION_PATTERNS, check_finite, check_safetensors, download, looks_like_hub_id,
                               preset_folder)
from pipelines.media import from_pil, write_frames, write_gif, write_mp4
from pipelines.prior import Conditioning, Prior
from pipelines.rundir import RunDir
from pipelines.runtime import Timer, pick_device
from pipelines.sampling import initial_noise, sample

from .config import VideoConfig, is_temporal_folder
from .temporal import CONFIG_NAME, WEIGHTS_NAME, VideoUNet, fuse_windows, inflate

logger = logging.getLogger(__name__)
MAX_IMAGE_PIXELS = 64 * 10**6  # image= is resized to the clip's size; a larger one is a mistake or a bomb


class AnimateDiffUNet(nn.Module):
    """diffusers' UNetMotionModel (the 2D UNet + an AnimateDiff MotionAdapter) behind the same call as our
    VideoUNet: (b, c, f, h, w) in and out. AnimateDiff has no fps or word-embedding input; both are unused.
    Clips longer than the adapter's `motion_max_seq_length` run in the project's long-video windows: the
    UNet on half-overlapping windows of that length, fused with weights that fall to each window's ends
    (`fuse_windows`, as our temporal attention's FreeNoise windows)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def from_adapter(cls, unet: nn.Module, folder: Path) -> "AnimateDiffUNet":
        from diffusers import MotionAdapter, UNetMotionModel

        weights = [p for p in folder.glob("*.safetensors") if "fp16" not in p.name]
        if not weights:
            raise UserError(f"{folder} has only pickle weights or none: an AnimateDiff adapter loads from safetensors")
        for p in weights:
            check_safetensors(p)
        try:
            adapter = MotionAdapter.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as e:
            raise UserError(f"{folder} is not a loadable MotionAdapter: {str(e).strip().splitlines()[0][:160]}") from None
        check_finite(adapter.state_dict(), folder)
        param = next(unet.parameters())
        try:
            model = UNetMotionModel.from_unet2d(unet, adapter)
        except RuntimeError as e:  # torch's message names the parameter only inside its block's ModuleList
            raise ValueError(_adapter_mismatch(unet, adapter) or str(e)) from None
        return cls(model.to(param.device, param.dtype).eval().requires_grad_(False))

    @property
    def config(self):
        return self.model.config

    @property
    def window(self) -> int:
        """Frames the motion modules attend at once: the adapter's position table."""
        return int(self.model.config.get("motion_max_seq_length") or 32)

    def forward(self, sample, timestep, encoder_hidden_states, fps=None, words=None, **unet_kwargs):
        from diffusers.models.unets.unet_motion_model import UNetMotionOutput

        if sample.shape[2] <= self.window:
            return self._clip(sample, timestep, encoder_hidden_states, **unet_kwargs)
        clip = lambda part: self._clip(part, timestep, encoder_hidden_states, **unet_kwargs).sample  # noqa: E731
        return UNetMotionOutput(sample=fuse_windows(sample, 2, self.window, clip))

    def _clip(self, sample, timestep, encoder_hidden_states, **unet_kwargs):
        # UNetMotionModel folds frames into the batch but expects the text already repeated per frame.
        text = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return self.model(sample, timestep, encoder_hidden_states=text, **unet_kwargs)


def _adapter_mismatch(unet: nn.Module, adapter: nn.Module) -> str | None:
    """The first motion-module parameter whose shape differs between `adapter` and what `unet` needs (or that
    one side lacks), in one line; None if all fit. The needed shapes come from a weightless (meta) model."""
    from diffusers import UNetMotionModel

    try:
        with torch.device("meta"):
            needed = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False).state_dict()
    except Exception:  # noqa: BLE001 - only an error message is at stake
        return None
    needed = {k: tuple(v.shape) for k, v in needed.items() if "motion_modules" in k}
    given = {k: tuple(v.shape) for k, v in adapter.state_dict().items() if "motion_modules" in k}
    for key in sorted(needed.keys() | given.keys()):
        if key not in given:
            return f"the adapter has no {key} (the model needs shape {list(needed[key])})"
        if key not in needed:
            return f"the adapter's {key} {list(given[key])} has no place in the model"
        if needed[key] != given[key]:
            return f"{key} is {list(given[key])} in the adapter but {list(needed[key])} in the model"
    return None


def load_motion(prior: Prior, motion: str | None) -> nn.Module:
    """The prior's 2D UNet inflated with temporal layers: ours (`train temporal`), an AnimateDiff
    `MotionAdapter` (folder or hub id), or fresh identity layers when `motion` is None."""
    if motion is None:
        logger.warning("no trained temporal layers for %s: the frames are independent images "
                       "(pass motion=FOLDER made by `python run.py train temporal`)", prior.model_id)
        return inflate(prior.unet)
    folder = _motion_folder(motion)
    try:
        if is_temporal_folder(folder):
            return inflate(prior.unet, weights=folder)
        if _is_motion_adapter(folder):
            return AnimateDiffUNet.from_adapter(prior.unet, folder)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"motion={motion} does not fit model {prior.model_id}: {str(e).splitlines()[0][:160]}") from None
    raise UserError(f"motion={motion} is not a motion module: expected {WEIGHTS_NAME} + {CONFIG_NAME} "
                    f"(`python run.py train temporal`) or an AnimateDiff MotionAdapter folder")


def _motion_folder(motion: str) -> Path:
    path = Path(motion).expanduser()
    if path.is_dir():
        return path
    if looks_like_hub_id(motion):
        return download(motion, None, MOTION_PATTERNS)
    raise UserError(f"motion={motion}: no such folder")


def _is_motion_adapter(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "MotionAdapter"


class VideoModel:
    """The prior with its video UNet (and the masked-frame model when interpolate= or image= needs one)."""

    def __init__(self, prior: Prior, unet: nn.Module, motion: str | None, masked: VideoUNet | None = None,
                 masked_motion: str | None = None):
        self.prior, self.unet, self.motion = prior, unet, motion
        self.masked, self.masked_motion = masked, masked_motion

    @classmethod
    def load(cls, cfg: VideoConfig, masked: bool | None = None) -> "VideoModel":
        """The prior inflated with `cfg.motion` (or the preset's), and the masked-frame model when `masked`
        (default: when interpolate= or image= needs one)."""
        prior = Prior.from_options(cfg, pick_device(cfg.device), speed_up=False)  # the fast path goes on after
        motion = cfg.motion or preset_folder(cfg.model, "motion")
        unet = load_motion(prior, motion)
        if masked is None:
            masked = cfg.interpolate > 1 or cfg.image is not None
        masked_unet, masked_motion = None, cfg.masked_motion or preset_folder(cfg.model, "interpolation")
        if masked:
            if masked_motion is None:
                raise UserError("interpolate= and image= need a masked-frame model: train one with "
                                "`python run.py train interpolation init=MOTION_FOLDER` and pass masked_motion=FOLDER")
            masked_unet = load_motion(prior, masked_motion)
            if not isinstance(masked_unet, VideoUNet):
                raise UserError(f"masked_motion={masked_motion} must come from `python run.py train interpolation`")
        # the masked model shares the spatial UNet, which this fuses too
        prior.speed_up(cfg.fuse_qkv, cfg.channels_last, cfg.compile, cfg.cuda_graphs, denoiser=unet)
        return cls(prior, unet, motion, masked_unet, masked_motion if masked else None)

    @property
    def window(self) -> int:
        """Frames the video UNet's temporal attention sees at once (longer clips run in overlapping windows)."""
        return temporal_window(self.unet)

    def sample(self, text: Conditioning, shape: tuple, cfg: VideoConfig, generator: torch.Generator, progress: bool,
               known: torch.Tensor | None = None, fps: float | None = None, init: torch.Tensor | None = None,
               strength: float = 1.0) -> torch.Tensor:
        """Video latents of `shape`. Frames where `known` is non-zero are given (the masked-frame model; they
        come back exactly as given, and each step's input there is them noised to the step). `fps` conditions
        the temporal layers (default `cfg.fps`); `init` and `strength` < 1 start part of the way up the schedule."""
        denoiser = self.unet if known is None else self.masked
        latents = reschedule_noise(initial_noise(shape, generator, self.prior.device), temporal_window(denoiser),
                                   generator)
        kwargs = {"fps": fps or cfg.fps, "init": init, "strength": strength}
        if known is not None:
            mask = (known.abs().sum(1, keepdim=True) > 0).float()
            kwargs.update(known=known, mask=mask, given=(known, mask))
        latents = sample(self.prior, text, latents, cfg.sampler, cfg.steps, cfg.guidance, generator, progress,
                         denoiser=denoiser, **kwargs)
        return latents if known is None else torch.where(kwargs["mask"].bool(), known.to(latents.dtype), latents)

    @torch.no_grad()
    def generate(self, prompt: str, cfg: VideoConfig, generator: torch.Generator, timer: Timer | None = None,
                 progress: bool = True, first_frame: torch.Tensor | None = None) -> torch.Tensor:
        """One clip (F', 3, H, W) in [0, 1], F' = (frames - 1) * interpolate + 1: 1. the clip, from the video
        UNet, or with `first_frame` (1, 3, H, W) from the masked-frame model with frame 0 known; 2. with
        interpolate=k, k - 1 frames filled between each pair at k * fps (Make-A-Video's interpolation)."""
        prior, timer = self.prior, timer or Timer()
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
            latents = self.sample(text, shape, cfg, generator, progress, known)
            if cfg.interpolate > 1:
                k = cfg.interpolate
                known = torch.zeros(*shape[:2], (cfg.frames - 1) * k + 1, *shape[3:], device=prior.device)
                known[:, :, ::k] = latents
                latents = self.sample(text, known.shape, cfg, generator, progress, known, cfg.output_fps,
                                      init=blend_known(known, k), strength=cfg.interpolate_strength)
        with timer("decode"):  # `decode_chunk` frames at a time, so memory does not grow with the length
            return prior.decode_latents(rearrange(latents, "b c f h w -> (b f) c h w"), cfg.decode_chunk)


def temporal_window(denoiser: nn.Module) -> int:
    """Frames a video UNet's temporal attention sees at once (AnimateDiff: its adapter's position table)."""
    temporal = getattr(denoiser, "temporal", None)
    return temporal.cfg.window if temporal is not None else getattr(denoiser, "window", 10**9)


def blend_known(known: torch.Tensor, k: int) -> torch.Tensor:
    """Latents (b, c, F, h, w) whose every k-th frame is given: each frame between two given ones as their
    linear blend (the cross-fade an interpolation starts from with interpolate_strength < 1)."""
    out = known.clone()
    for j in range(known.shape[2]):
        a, w = (j // k) * k, (j % k) / k
        if w:
            out[:, :, j] = (1 - w) * known[:, :, a] + w * known[:, :, a + k]
    return out


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


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """The first frame for image=: (1, 3, H, W) in [0, 1], resized (with a note) to the clip's size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # read from the header, before anything is decoded
                raise UserError(f"image={path} is {im.width}x{im.height}: larger than {MAX_IMAGE_PIXELS // 10**6} "
                                "megapixels; give a smaller image")
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"image={path} cannot be read as an image ({str(e).splitlines()[0][:80]})") from None
    if image.size != (width, height):
        logger.warning("image=%s is %dx%d; resized to the clip's %dx%d", path, *image.size, width, height)
        image = image.resize((width, height), Image.BICUBIC)
    return from_pil(image)


def main(cfg: VideoConfig, prompts: list[str], out: str | Path, progress: bool = True) -> list[Path]:
    timer = Timer()
    with timer("load"):
        model = VideoModel.load(cfg)
    prior = model.prior
    height, width = cfg.check_model(prior)  # fail before writing anything
    first = load_image(cfg.image, height, width) if cfg.image else None
    with timer("hash"):
        model_hash = prior.content_hash()
    return [run(model, prompt, cfg, cfg.seed + i, out, model_hash, timer.stages, progress, first)
            for i, prompt in enumerate(prompts)]


def run(model: VideoModel, prompt: str, cfg: VideoConfig, seed: int, out: str | Path, model_hash: str,
        setup_s: dict, progress: bool = True, first_frame: torch.Tensor | None = None) -> Path:
    with RunDir.create(out, "video", prompt) as run_dir:  # a run that fails removes its folder
        run_dir.write_config(cfg, prompt=prompt, seed=seed)
        timer, prior = Timer(), model.prior
        timer.stages.update(setup_s)
        frames = model.generate(prompt, cfg, torch.Generator("cpu").manual_seed(seed), timer, progress, first_frame)
        with timer("save"):
            outputs = [write_mp4(run_dir / "video.mp4", frames, cfg.output_fps).name,
                       write_gif(run_dir / "preview.gif", frames, cfg.output_fps).name]
            if cfg.save_frames:
                outputs += [f"frames/{p.name}" for p in write_frames(run_dir / "frames", frames)]
        run_dir.write_metadata(
            job="video", prompt=prompt, negative=cfg.negative, seed=seed, model=prior.model_id, model_hash=model_hash,
            motion=model.motion, device=str(prior.device), dtype=str(prior.dtype).removeprefix("torch."),
            frames=len(frames), fps=cfg.output_fps, interpolate=cfg.interpolate, image=cfg.image,
            masked_motion=model.masked_motion,
            interpolate_strength=cfg.interpolate_strength if cfg.interpolate > 1 else None,
            height=frames.shape[-2], width=frames.shape[-1], outputs=outputs, timings_s=timer.stages)
    logger.info("wrote %d frames to %s", len(frames), run_dir / "video.mp4")
    return run_dir.path
