"""Random training cameras, turntable cameras, their rays, and view-dependent prompts.

DreamFusion (Poole et al. 2022, sec. 3.2 and appendix A.2) samples a camera per step uniformly
in elevation, azimuth, distance and field of view, looking at the origin, and appends
"front view" / "side view" / "back view" / "overhead view" to the prompt from the camera's angles.
The position, look-at and up jitters follow threestudio's `random-camera` data module
(`camera_perturb`, `center_perturb`, `up_perturb`), and Magic3D (Lin et al. 2023) uses the same
sampling.

The geometry is exactly ToyWorld's (see toyworld/render.py, `camera_frame` / `camera_rays`):
+z up, azimuth 0 on +x (the object's front), image right = normalize(forward x up), pixel
[0, 0] at the top-left, `fov_deg` the full field of view of a square image. A test holds the
two in agreement, so a NeRF fitted through the ToyWorld prior sees the views it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from pipelines.config import option
from pipelines.errors import UserError

VIEWS = ("front", "side", "back", "overhead")


@dataclass
class CameraConfig:
    """How training cameras are sampled, and which view word each camera's prompt gets."""

    elevation_range: tuple[float, float] = option((-10.0, 80.0), "elevation range in degrees (uniform)")
    azimuth_range: tuple[float, float] = option((-180.0, 180.0), "azimuth range in degrees (uniform; 0 = front)")
    distance_range: tuple[float, float] = option((3.2, 3.8), "camera distance range to the origin (uniform)")
    fov_range: tuple[float, float] = option((35.0, 45.0), "full field of view range in degrees (uniform)")
    center_jitter: float = option(0.0, "std of the look-at point jitter (world units)")
    position_jitter: float = option(0.0, "std of the camera position jitter (world units)")
    up_jitter: float = option(0.0, "std of the up-vector jitter")
    front_threshold: float = option(45.0, "view prompts: 'front' within this many degrees of azimuth 0")
    back_threshold: float = option(45.0, "view prompts: 'back' within this many degrees of azimuth 180")
    overhead_threshold: float = option(60.0, "view prompts: 'overhead' above this elevation in degrees")

    def validate(self) -> None:
        for name in ("elevation_range", "azimuth_range", "distance_range", "fov_range"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise UserError(f"{name} must be [low, high] with low <= high, got {list(lo_hi)}")
        if not (-90 < self.elevation_range[0] and self.elevation_range[1] < 90):
            raise UserError(f"elevation_range must lie strictly inside (-90, 90), got {list(self.elevation_range)}")
        if not self.distance_range[0] > 0:
            raise UserError(f"distance_range must be positive, got {list(self.distance_range)}")
        if not (0 < self.fov_range[0] and self.fov_range[1] < 180):
            raise UserError(f"fov_range must lie strictly inside (0, 180), got {list(self.fov_range)}")
        for name in ("center_jitter", "position_jitter", "up_jitter"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if min(self.front_threshold, self.back_threshold) < 0 or self.front_threshold + self.back_threshold > 180:
            raise UserError("front_threshold and back_threshold must be >= 0 and add up to at most 180, "
                            f"got {self.front_threshold} and {self.back_threshold}")
        if not -90 <= self.overhead_threshold <= 90:
            raise UserError(f"overhead_threshold must be in [-90, 90], got {self.overhead_threshold}")


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


def _spherical(azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor) -> Tensor:
    """Camera positions (B, 3) on the ToyWorld sphere: d * (cos el cos az, cos el sin az, sin el)."""
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return distance[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)


def _look_at(eye: Tensor, center: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal right, up, forward axes (B, 3) of cameras at `eye` looking at `center`."""
    forward = F.normalize(center - eye, dim=-1)
    right = F.normalize(torch.linalg.cross(forward, up), dim=-1)
    return right, torch.linalg.cross(right, forward), forward


def _make(azimuth_deg, elevation_deg, distance, fov_deg, eye, center, up) -> Cameras:
    right, true_up, forward = _look_at(eye, center, up)
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
    eye = _spherical(az, el, dist) + cfg.position_jitter * noise[0]
    center = cfg.center_jitter * noise[1]
    up = torch.tensor([0.0, 0.0, 1.0], device=gen_device) + cfg.up_jitter * noise[2]
    return _make(az, el, dist, fov, eye, center, up.expand(n, 3)).to(device)


def orbit_cameras(n: int, elevation_deg: float = 15.0, distance: float = 3.5, fov_deg: float = 40.0,
                  device: torch.device | str = "cpu") -> Cameras:
    """n turntable cameras at evenly spaced azimuths 0, 360/n, ... looking at the origin, no jitter."""
    if n < 1:
        raise ValueError(f"need at least one camera, got n={n}")
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    full = lambda value: torch.full((n,), float(value))
    el, dist, fov = full(elevation_deg), full(distance), full(fov_deg)
    up = torch.tensor([0.0, 0.0, 1.0]).expand(n, 3)
    return _make(az, el, dist, fov, _spherical(az, el, dist), torch.zeros(n, 3), up).to(device)


def camera_rays(cams: Cameras, size: int) -> tuple[Tensor, Tensor]:
    """Per-pixel ray origins and unit directions, each (B, H, W, 3) with H = W = size.

    Pixel centres sit at (i + 0.5) / size on [-1, 1]; the top row looks along +up (as
    toyworld.render.camera_rays).
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    half = torch.tan(torch.deg2rad(cams.fov_deg) / 2)  # (B,)
    centres = (torch.arange(size, device=cams.eye.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(-centres, centres, indexing="ij")  # (H, W); v is +1 at the top row
    b = lambda x: rearrange(x, "b c -> b 1 1 c")
    screen = u[..., None] * b(cams.right) + v[..., None] * b(cams.up)  # (B, H, W, 3)
    dirs = F.normalize(b(cams.forward) + half[:, None, None, None] * screen, dim=-1)
    return b(cams.eye).expand_as(dirs), dirs


def view_names(azimuth_deg, elevation_deg, cfg: CameraConfig) -> list[str]:
    """DreamFusion's view word per camera: overhead above `overhead_threshold` elevation, else
    front / back within the thresholds of azimuth 0 / 180, else side (as toyworld.world.view_index)."""
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32).reshape(-1) % 360.0
    el = torch.as_tensor(elevation_deg, dtype=torch.float32).reshape(-1)
    from_front = torch.minimum(az, 360.0 - az)  # angular distance to azimuth 0, in [0, 180]
    idx = torch.ones_like(az, dtype=torch.long)  # side
    idx = torch.where(from_front > 180.0 - cfg.back_threshold, 2, idx)
    idx = torch.where(from_front < cfg.front_threshold, 0, idx)
    idx = torch.where(el > cfg.overhead_threshold, 3, idx)
    return [VIEWS[i] for i in idx.tolist()]


def view_prompts(prompt: str, names: list[str]) -> list[str]:
    """"a red cube" and ["front", "side"] -> ["a red cube, front view", "a red cube, side view"]."""
    return [f"{prompt.rstrip()}, {name} view" for name in names]
