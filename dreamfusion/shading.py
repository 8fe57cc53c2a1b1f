"""DreamFusion's random shading (Poole et al. 2022, sec. 3.1): c = albedo (ambient + diffuse max(0, n . l)).

In training each step picks one mode for the whole batch, as threestudio does: albedo only (always during
`ambient_only_steps`, then with `albedo_prob`), else textureless (white albedo, `textureless_prob`) or
Lambertian, under a point light near each camera (threestudio's "dreamfusion" light strategy, moved by
`light_offset`). Evaluation renders use ToyWorld's key light and intensities (`pipelines.geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.geometry import AMBIENT, DIFFUSE, key_light, light_toward

from .cameras import Cameras
from .config import ShadingConfig

MODES = ("albedo", "lambertian", "textureless")
FAR_LIGHT = 1e4  # world units: far enough that the point light acts as a directional light


@dataclass
class Shading:
    """How one batch of B cameras is shaded."""

    mode: str  # "albedo" | "lambertian" | "textureless"
    light: Tensor  # (B, 3) point-light position per camera
    ambient: float | None = None  # intensities; None: the config's (training); `eval_shading` uses ToyWorld's
    diffuse: float | None = None


def sample_shading(step: int, cfg: ShadingConfig, cams: Cameras, generator: torch.Generator | None = None) -> Shading:
    """The training step's random shading mode and one random light per camera."""
    device = generator.device if generator is not None else torch.device("cpu")
    coins = torch.rand(2, generator=generator, device=device).tolist()
    if step < cfg.ambient_only_steps or coins[0] < cfg.albedo_prob:
        mode = "albedo"
    else:
        mode = "textureless" if coins[1] < cfg.textureless_prob else "lambertian"
    return Shading(mode, _sample_lights(cfg, cams, generator))


def _sample_lights(cfg: ShadingConfig, cams: Cameras, generator: torch.Generator | None) -> Tensor:
    """Point lights (B, 3) around the camera direction (threestudio's "dreamfusion" strategy)."""
    n, device = len(cams), generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(n, 3, generator=generator, device=device).to(cams.eye)  # (B, 3)
    lo, hi = cfg.light_distance_range
    scale = lo + (hi - lo) * torch.rand(n, generator=generator, device=device).to(cams.eye)  # (B,)
    eye_dist = cams.eye.norm(dim=-1, keepdim=True)  # (B, 1)
    toward = light_toward(cams.eye / eye_dist, cams.right, cams.up, cfg.light_offset)  # (B, 3)
    direction = F.normalize(toward + cfg.light_jitter * noise, dim=-1)
    return direction * eye_dist * scale[:, None]


def eval_shading(cams: Cameras) -> Shading:
    """How evaluation renders are lit: ToyWorld's far key light and intensities, as its renders are."""
    light = key_light(cams.right, cams.up, cams.forward) * FAR_LIGHT
    return Shading(mode="lambertian", light=light, ambient=AMBIENT, diffuse=DIFFUSE)


def shade(albedo: Tensor, normals: Tensor | None, points: Tensor, light: Tensor, mode: str,
          ambient: float, diffuse: float) -> Tensor:
    """Colour (M, 3) of samples: albedo (M, 3), normals (M, 3), points (M, 3), light positions (M, 3).

    albedo:      albedo
    lambertian:  albedo * (ambient + diffuse * max(0, n . l)), l = normalize(light - point)
    textureless: the same with albedo = white
    Not clamped: ambient + diffuse > 1 can exceed 1 (clamp when writing images).
    """
    if mode not in MODES:
        raise ValueError(f"unknown shading mode '{mode}': choose one of {', '.join(MODES)}")
    if mode == "albedo":
        return albedo
    if normals is None:
        raise ValueError(f"shading mode '{mode}' needs normals")
    to_light = F.normalize(light - points, dim=-1)  # (M, 3)
    lit = ambient + diffuse * (normals * to_light).sum(-1, keepdim=True).clamp(min=0)  # (M, 1)
    base = torch.ones_like(albedo) if mode == "textureless" else albedo
    return base * lit
