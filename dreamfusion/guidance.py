"""Score distillation sampling (SDS, DreamFusion, Poole et al. 2022, eq. 3) from the shared prior.

A render is encoded into the prior's latents (latent SDS, as Magic3D and threestudio), noised to a random
t and denoised once with guidance through `Prior.predict_noise`; the gradient w(t) (eps_hat - eps) is
written as threestudio's reparameterised loss `target = (latents - grad).detach()`, so no gradient flows
through the UNet. Perp-Neg (Armandpour et al. 2023) removes only the perpendicular part of the other views'
guidance directions, against multi-faced ("Janus") assets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from pipelines.prior import Conditioning, Prior

from .config import GuidanceConfig


def perpendicular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The part of x perpendicular to y, per sample: x - (<x, y> / <y, y>) y."""
    dims = tuple(range(1, x.ndim))
    dot = (x * y).sum(dims, keepdim=True)
    return x - dot / (y * y).sum(dims, keepdim=True).clamp(min=1e-12) * y


class SDS:
    """Latent score distillation from a frozen `Prior`."""

    def __init__(self, prior: Prior, cfg: GuidanceConfig):
        self.prior, self.cfg = prior, cfg
        self.size = cfg.encode_size or prior.default_size
        abar = prior.alphas_cumprod
        self.weights = {"sds": 1 - abar, "uniform": torch.ones_like(abar),
                        "snr": abar.sqrt() * (1 - abar).sqrt()}[cfg.weighting]

    def t_range(self, progress: float) -> tuple[int, int]:
        """Integer [t_lo, t_hi] at `progress` in [0, 1] of the fit (the upper bound may anneal)."""
        n = self.prior.num_train_timesteps
        hi = self.cfg.t_max if self.cfg.t_max_end is None else (
            self.cfg.t_max + (self.cfg.t_max_end - self.cfg.t_max) * min(max(progress, 0.0), 1.0))
        lo = int(self.cfg.t_min * n)
        return lo, max(lo + 1, int(hi * n))

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> latents with gradient (the VAE encoder is differentiable)."""
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, (self.size, self.size), mode="bilinear", align_corners=False)
        return self.prior.encode_images(images, generator, chunk=len(images))

    def grad(self, latents: torch.Tensor, text: Conditioning, t: torch.Tensor, noise: torch.Tensor,
             negatives: list[Conditioning] | None = None, **denoiser) -> torch.Tensor:
        """w(t) (eps_hat - eps) for latents (B, C, h, w), or clips (B, C, F, h, w) with a video `denoiser=`
        (and its keywords, e.g. fps=), one t per sample; no graph is kept."""
        with torch.no_grad():
            x_t = self.prior.add_noise(latents.detach().float(), noise, t)
            if negatives:
                eps_hat = self._perp_neg(x_t, t, text, negatives)
            else:
                eps_hat = self.prior.predict_noise(x_t, t, text, self.cfg.scale, **denoiser)
            w = self.weights[t].view(-1, *([1] * (latents.ndim - 1)))
            return torch.nan_to_num(w * (eps_hat - noise))

    def _perp_neg(self, x_t, t, text: Conditioning, negatives: list[Conditioning]) -> torch.Tensor:
        """eps_u + s (d_pos - w sum_j perp(d_neg_j, d_pos)), every prediction in one batched call."""
        k = 2 + len(negatives)
        stacked = Conditioning(cond=torch.cat([text.uncond, text.cond] + [n.cond for n in negatives]),
                               uncond=torch.cat([text.uncond] * k))
        eps = self.prior.predict_noise(torch.cat([x_t] * k), torch.cat([t] * k), stacked, 1.0).chunk(k)
        eps_u, d_pos = eps[0], eps[1] - eps[0]
        d_neg = sum(perpendicular(e - eps_u, d_pos) for e in eps[2:])
        return eps_u + self.cfg.scale * (d_pos - self.cfg.perp_neg_weight * d_neg)

    def loss(self, images: torch.Tensor, text: Conditioning, progress: float, generator: torch.Generator,
             negatives: list[Conditioning] | None = None, frames: int = 1, **denoiser) -> tuple[torch.Tensor, dict]:
        """The SDS loss of renders (B, 3, H, W) in [0, 1] under per-render prompts `text` (B rows). With
        `frames` F > 1 the renders are B / F clips, frame-major within each, scored as (B/F, C, F, h, w)
        latents by the video UNet given as `denoiser=` (video SDS, as MAV3D: one t per clip)."""
        latents = self.encode(images, generator)
        if frames > 1:
            latents = rearrange(latents, "(b f) c h w -> b c f h w", f=frames)
        lo, hi = self.t_range(progress)
        t = torch.randint(lo, hi + 1, (len(latents),), generator=generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        grad = self.grad(latents, text, t, noise, negatives, **denoiser)
        target = (latents - grad).detach()
        loss = 0.5 * F.mse_loss(latents, target, reduction="sum") / len(latents)
        return loss, {"t": t, "grad_norm": grad.norm() / len(latents)}
