"""The image job: `python run.py image "a red cube"` -> PNGs in a run directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import option, to_dict
from .errors import UserError
from .options import SamplingOptions
from .prior import Prior
from .runtime import Timer, command_line, make_run_dir, save_image, versions, write_json, write_yaml
from .sampling import initial_noise, sample

logger = logging.getLogger(__name__)


@dataclass
class ImageConfig(SamplingOptions):
    num_images: int = option(1, "images per prompt, generated in one batch")

    def validate(self) -> None:
        super().validate()
        if self.num_images < 1:
            raise UserError(f"num_images must be at least 1, got {self.num_images}")


@torch.no_grad()
def generate(prior: Prior, prompt: str, cfg: ImageConfig, generator: torch.Generator,
             timer: Timer | None = None, progress: bool = True) -> torch.Tensor:
    """`cfg.num_images` images for one prompt, (N, 3, H, W) in [0, 1]."""
    timer = timer or Timer()
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)
    with timer("encode_prompt"):
        text = prior.encode_prompt([prompt], cfg.negative).repeat(cfg.num_images)
    shape = (cfg.num_images, prior.latent_channels, height // prior.vae_scale_factor, width // prior.vae_scale_factor)
    with timer("denoise"):
        latents = initial_noise(shape, generator, prior.device)
        latents = sample(prior, text, latents, cfg.sampler, cfg.steps, cfg.guidance, generator, progress)
    with timer("decode"):
        return prior.decode_latents(latents, cfg.decode_chunk)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images (rounded like diffusers' numpy_to_pil)."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) in [0, 1] (to_pil's inverse, up to its rounding)."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255


def run(prior: Prior, prompt: str, cfg: ImageConfig, seed: int, out: str | Path, model_hash: str,
        setup_s: dict[str, float], progress: bool = True, process: int = 0) -> Path:
    """Generate one prompt's images into a fresh run directory and return it."""
    run_dir = make_run_dir(out, "image", prompt)
    write_yaml(run_dir / "config.yaml", {"prompt": prompt, **to_dict(cfg), "seed": seed, "command": command_line()})
    timer = Timer()
    timer.stages.update(setup_s)  # loading and hashing the model, shared by every prompt of the run
    generator = torch.Generator("cpu").manual_seed(seed)
    images = generate(prior, prompt, cfg, generator, timer, progress)
    files = []
    with timer("save"):
        for i, image in enumerate(to_pil(images)):
            save_image(run_dir / f"image_{i:02d}.png", image)
            files.append(f"image_{i:02d}.png")
    write_json(run_dir / "metadata.json", {
        "job": "image", "prompt": prompt, "negative": cfg.negative, "seed": seed,
        "model": prior.model_id, "model_hash": model_hash, "device": str(prior.device),
        "dtype": str(prior.dtype).removeprefix("torch."), "height": images.shape[-2], "width": images.shape[-1],
        "outputs": files, "process": process, "timings_s": timer.stages, "versions": versions(), "command": command_line(),
    })
    logger.info("wrote %d image(s) to %s", len(files), run_dir)
    return run_dir


def main(cfg: ImageConfig, prompts: list[str], out: str | Path, progress: bool = True) -> list[Path]:
    """Load the prior once, then one run directory per prompt; prompts are split across
    `accelerate launch` processes (prompt i always uses seed + i, whatever the process count)."""
    from accelerate import PartialState

    from .runtime import pick_device

    # cpu=True lets torchrun/accelerate launch start several CPU processes (gloo) when there is no GPU.
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if state.num_processes > 1 and cfg.device == "auto" else pick_device(cfg.device)
    timer = Timer()
    with timer("load"):
        prior = Prior.from_options(cfg, device)
    cfg.image_size(prior.default_size, prior.vae_scale_factor)  # fail on a bad size before writing anything
    with timer("hash"):
        model_hash = prior.content_hash()
    runs = []
    with state.split_between_processes(list(enumerate(prompts))) as mine:
        for i, prompt in mine:
            runs.append(run(prior, prompt, cfg, cfg.seed + i, out, model_hash, timer.stages, progress,
                            state.process_index))
    return runs
