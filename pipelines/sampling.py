"""The denoising loop every sampling job shares: images, videos (with a video UNet as the denoiser), evals."""

from __future__ import annotations

import inspect

import torch
from diffusers.utils.torch_utils import randn_tensor
from .progress import Bar

from .prior import Conditioning, Prior
from .schedulers import make_scheduler


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gaussian latents drawn from the run's generator (a CPU generator gives the same noise on any device)."""
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


@torch.no_grad()
def sample(prior: Prior, text: Conditioning, latents: torch.Tensor, sampler: str, steps: int, guidance: float,
           generator: torch.Generator | None = None, progress: bool = True,
           given: tuple[torch.Tensor, torch.Tensor] | None = None, init: torch.Tensor | None = None,
           strength: float = 1.0, denoiser: torch.nn.Module | None = None, **unet_kwargs) -> torch.Tensor:
    """Denoise unit-variance noise `latents` into clean latents with a diffusers scheduler.

    1. build the scheduler on the prior's noise schedule, 2. scale the noise to the first sigma,
    3. per step: scale the input, guided epsilon from the prior, scheduler step.
    `given` = (clean latents, mask): where the mask is 1, the input of every step is replaced by the given
    latents noised to that step (`scheduler.add_noise`, fresh noise each step), as training noised them
    (the replacement method of Ho et al. 2022, "Video Diffusion Models", sec. 3.1).
    `init` and `strength` < 1 (SDEdit, as diffusers' img2img pipelines do it): start from `init` noised with
    `latents` to the step `strength` of the way up the schedule, and run only the steps from there.
    `denoiser` (default: the prior's UNet) is what `prior.predict_noise` calls.
    """
    # 1. Scheduler
    scheduler = make_scheduler(sampler, prior.noise_config, steps)
    scheduler.set_timesteps(steps, device=prior.device)
    timesteps = scheduler.timesteps
    if init is not None and strength < 1:  # 2'. SDEdit: `init` noised to the first step kept
        first = (steps - min(max(round(steps * strength), 1), steps)) * scheduler.order
        timesteps = timesteps[first:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        latents = scheduler.add_noise(init.to(latents.dtype), latents, timesteps[:1])
    else:  # 2. Noise at the first timestep's scale (1 for DDPM-style samplers, sigma_max for Euler)
        latents = latents * scheduler.init_noise_sigma
    # 3. Denoising loop (`generator` only to schedulers whose step draws noise: PNDM's takes none)
    params = inspect.signature(scheduler.step).parameters.values()
    takes = any(p.name == "generator" or p.kind == p.VAR_KEYWORD for p in params)
    step_kwargs = {"generator": generator} if takes else {}
    for t in Bar(timesteps, desc=f"{sampler} sampling", disable=not progress, leave=False):
        if given is not None:
            clean, mask = given
            noised = scheduler.add_noise(clean, initial_noise(clean.shape, generator, clean.device).to(clean.dtype),
                                         t.reshape(1))
            latents = torch.where(mask.bool(), noised.to(latents.dtype), latents)
        x_in = scheduler.scale_model_input(latents, t)
        eps = prior.predict_noise(x_in, t, text, guidance, denoiser=denoiser, **unet_kwargs)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents
