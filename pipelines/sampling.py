"""The denoising loop every sampling job shares (images now, videos on the same prior later)."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .prior import Conditioning, Prior
from .schedulers import make_scheduler


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gaussian latents drawn from the run's generator (a CPU generator gives the same noise on any device)."""
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


@torch.no_grad()
def sample(prior: Prior, text: Conditioning, latents: torch.Tensor, sampler: str, steps: int, guidance: float,
           generator: torch.Generator | None = None, progress: bool = True, **unet_kwargs) -> torch.Tensor:
    """Denoise unit-variance noise `latents` into clean latents with a diffusers scheduler.

    1. build the scheduler on the prior's noise schedule, 2. scale the noise to the first sigma,
    3. per step: scale the input, guided epsilon from the prior, scheduler step.
    """
    # 1. Scheduler
    scheduler = make_scheduler(sampler, prior.noise_config)
    scheduler.set_timesteps(steps, device=prior.device)
    # 2. Noise at the first timestep's scale (1 for DDPM-style samplers, sigma_max for Euler)
    latents = latents * scheduler.init_noise_sigma
    # 3. Denoising loop
    for t in tqdm(scheduler.timesteps, desc=f"{sampler} sampling", disable=not progress, leave=False):
        x_in = scheduler.scale_model_input(latents, t)
        eps = prior.predict_noise(x_in, t, text, guidance, **unet_kwargs)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    return latents
