"""Random training cameras, turntable cameras, their rays, and view-dependent prompts.

DreamFusion (Poole et al. 2022, sec. 3.2, appendix A.2) samples elevation, azimuth, distance and field of
view uniformly, looking at the origin, and appends "front view" / "side view" / "back view" / "overhead view"
by the camera's angles; the position, look-at and up jitters are threestudio's `random-camera` ones. The
frame, rays and view rule are `pipelines.geometry`'s, the same ToyWorld renders with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines import geometry
from pipelines.geometry import VIEWS

from .config import CameraConfig


@dataclass
class Cameras:
    """A batch of B pinhole cameras with square images.

    azimuth/elevation/distance are the *nominal* sampled values (they pick the view prompt);
    eye and the axes include any jitter.
    """

    azimuth_deg: Tensor  # (B,)
    elevation_deg: Tensor  # (B,)
    distance: Tensor  # (B,)
    fov_deg: Tensor  # (B,) full field of view
    eye: Tensor  # (B, 3) camera position
    right: Tensor  # (B, 3) unit image-right axis
    up: Tensor  # (B, 3) unit image-up axis
    forward: Tensor  # (B, 3) unit viewing direction

    def __len__(self) -> int:
        return self.azimuth_deg.shape[0]

    def to(self, device) -> Cameras:
        return Cameras(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def __getitem__(self, index) -> Cameras:
        """A subset of the cameras (a slice or an index tensor), e.g. to render a turntable in chunks."""
        return Cameras(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _make(azimuth_deg, elevation_deg, distance, fov_deg, eye, center, up) -> Cameras:
    right, true_up, forward = geometry.look_at(eye, center, up)
    return Cameras(azimuth_deg, elevation_deg, distance, fov_deg, eye, right, true_up, forward)


def sample_cameras(n: int, cfg: CameraConfig, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Cameras:
    """n random cameras: uniform elevation, azimuth, distance and fov, then the jitters (DreamFusion A.2).

    Random numbers are drawn on the generator's device (the run's one generator) and moved to
    `device`; the same draws happen whatever the jitters are, so a seed gives the same poses.
    """
    if n < 1:
        raise ValueError(f"need at least one camera, got n={n}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    uniform = lambda lo_hi: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, generator=generator, device=gen_device)
    az, el = uniform(cfg.azimuth_range), uniform(cfg.elevation_range)
    dist, fov = uniform(cfg.distance_range), uniform(cfg.fov_range)
    noise = torch.randn(3, n, 3, generator=generator, device=gen_device)  # (jitter kind, B, 3)
    eye = geometry.orbit_position(az, el, dist) + cfg.position_jitter * noise[0]
    center = cfg.center_jitter * noise[1]
    up = torch.tensor(geometry.Z_UP, device=gen_device) + cfg.up_jitter * noise[2]
    return _make(az, el, dist, fov, eye, center, up.expand(n, 3)).to(device)


def orbit_cameras(n: int, elevation_deg: float = 15.0, distance: float = 3.5, fov_deg: float = 40.0,
                  device: torch.device | str = "cpu") -> Cameras:
    """n turntable cameras at evenly spaced azimuths 0, 360/n, ... looking at the origin, no jitter."""
    if n < 1:
        raise ValueError(f"need at least one camera, got n={n}")
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    full = lambda value: torch.full((n,), float(value))  # noqa: E731
    el, dist, fov = full(elevation_deg), full(distance), full(fov_deg)
    return Cameras(az, el, dist, fov, *geometry.camera_frame(az, el, dist)).to(device)


def camera_rays(cams: Cameras, size: int) -> tuple[Tensor, Tensor]:
    """Per-pixel ray origins and unit directions, each (B, H, W, 3) with H = W = size."""
    return geometry.camera_rays(cams.eye, cams.right, cams.up, cams.forward, cams.fov_deg, size)


def view_names(azimuth_deg, elevation_deg, cfg: CameraConfig) -> list[str]:
    """DreamFusion's view word per camera, with the config's thresholds."""
    idx = geometry.view_index(torch.as_tensor(azimuth_deg).reshape(-1), torch.as_tensor(elevation_deg).reshape(-1),
                              cfg.front_threshold, cfg.back_threshold, cfg.overhead_threshold)
    return [VIEWS[i] for i in idx.tolist()]


def view_prompts(prompt: str, names: list[str]) -> list[str]:
    """"a red cube" and ["front", "side"] -> ["a red cube, front view", "a red cube, side view"]."""
    return [f"{prompt.rstrip()}, {name} view" for name in names]
