"""The image job: `python run.py image "a red cube"` -> PNGs in a run directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .media import save_image, to_pil
from .options import ImageConfig
from .prior import Prior
from .rundir import RunDir
from .runtime import Timer
from .sampling import initial_noise, sample

logger = logging.getLogger(__name__)


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


def run(prior: Prior, prompt: str, cfg: ImageConfig, seed: int, out: str | Path, model_hash: str,
        setup_s: dict[str, float], progress: bool = True, process: int = 0) -> Path:
    """Generate one prompt's images into a fresh run directory and return it."""
    with RunDir.create(out, "image", prompt) as run:  # a run that fails removes its folder
        run.write_config(cfg, prompt=prompt, seed=seed)
        timer = Timer()
        timer.stages.update(setup_s)  # loading and hashing the model, shared by every prompt of the run
        generator = torch.Generator("cpu").manual_seed(seed)
        images = generate(prior, prompt, cfg, generator, timer, progress)
        files = []
        with timer("save"):
            for i, image in enumerate(to_pil(images)):
                files.append(save_image(run / f"image_{i:02d}.png", image).name)
        run.write_metadata(job="image", prompt=prompt, negative=cfg.negative, seed=seed, model=prior.model_id,
                           model_hash=model_hash, device=str(prior.device), dtype=str(prior.dtype).removeprefix("torch."),
                           height=images.shape[-2], width=images.shape[-1], outputs=files, process=process,
                           timings_s=timer.stages)
    logger.info("wrote %d image(s) to %s", len(files), run.path)
    return run.path


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
    cfg.check_model(prior)  # fail on a bad size or step count before writing anything
    with timer("hash"):
        model_hash = prior.content_hash()
    runs = []
    with state.split_between_processes(list(enumerate(prompts))) as mine:
        for i, prompt in mine:
            runs.append(run(prior, prompt, cfg, cfg.seed + i, out, model_hash, timer.stages, progress,
                            state.process_index))
    return runs
