"""The one camera frame, view rule and key light, shared by ToyWorld's renderer and the 3D job.

+z is up and objects sit at the origin. A camera at azimuth az, elevation el and distance d is at
d (cos el cos az, cos el sin az, sin el): azimuth 0 is on +x, an object's front. Image right is
normalize(forward x up), image up is right x forward, pixel [0, 0] is the top-left corner, and images
are square with `fov_deg` the full field of view. docs/3d.md has the reasoning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

VIEWS = ("front", "side", "back", "overhead")
AMBIENT, DIFFUSE = 0.4, 0.65  # ToyWorld's light intensities; a lit face can exceed 1 (clamp when writing)
KEY_LIGHT_OFFSET = (0.6, -0.4)  # (up, right): ToyWorld's key light sits above-left of the camera
Z_UP = (0.0, 0.0, 1.0)


def _batch(x, device=None) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1)


def orbit_position(azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor) -> Tensor:
    """Camera positions (B, 3) on the sphere: d (cos el cos az, cos el sin az, sin el)."""
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return distance[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)


def look_at(eye: Tensor, center: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal right, up, forward axes (B, 3) of cameras at `eye` looking at `center`."""
    forward = F.normalize(center - eye, dim=-1)
    right = F.normalize(torch.linalg.cross(forward, up), dim=-1)
    return right, torch.linalg.cross(right, forward), forward


def camera_frame(azimuth_deg, elevation_deg, distance) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eye (B, 3) and right, up, forward axes (B, 3) of orbit cameras looking at the origin (scalars or (B,))."""
    az = _batch(azimuth_deg)
    az, el, dist = torch.broadcast_tensors(az, _batch(elevation_deg, az.device), _batch(distance, az.device))
    eye = orbit_position(az, el, dist)
    up = torch.tensor(Z_UP, device=eye.device).expand_as(eye)
    return (eye, *look_at(eye, torch.zeros_like(eye), up))


def camera_rays(eye: Tensor, right: Tensor, up: Tensor, forward: Tensor, fov_deg, size: int) -> tuple[Tensor, Tensor]:
    """Per-pixel ray origins and unit directions, each (B, H, W, 3) with H = W = size; pixel centres sit
    at (i + 0.5) / size on [-1, 1] and the top row looks along +up."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    half = torch.tan(torch.deg2rad(_batch(fov_deg, eye.device)) / 2)  # (B,)
    centres = (torch.arange(size, device=eye.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(-centres, centres, indexing="ij")  # (H, W); v is +1 at the top row
    b = lambda x: rearrange(x, "b c -> b 1 1 c")  # noqa: E731
    screen = u[..., None] * b(right) + v[..., None] * b(up)  # (B, H, W, 3)
    dirs = F.normalize(b(forward) + half[:, None, None, None] * screen, dim=-1)
    return b(eye).expand_as(dirs), dirs


def view_index(azimuth_deg, elevation_deg, front: float = 45.0, back: float = 45.0,
               overhead: float = 60.0) -> Tensor:
    """DreamFusion's view rule, an index into VIEWS per camera: overhead above `overhead` degrees of
    elevation, else front / back within `front` / `back` degrees of azimuth 0 / 180, else side."""
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32) % 360.0
    el = torch.as_tensor(elevation_deg, dtype=torch.float32)
    from_front = torch.minimum(az, 360.0 - az)  # angular distance to azimuth 0, in [0, 180]
    idx = torch.ones_like(az, dtype=torch.long)  # side
    idx = torch.where(from_front > 180.0 - back, 2, idx)
    idx = torch.where(from_front < front, 0, idx)
    return torch.where(el > overhead, 3, idx)


def light_toward(toward: Tensor, right: Tensor, up: Tensor, offset: tuple[float, float]) -> Tensor:
    """`toward` (B, 3) moved by offset = (u, r) in each camera's frame: toward + u up + r right (not normalised)."""
    return toward + offset[0] * up + offset[1] * right


def key_light(right: Tensor, up: Tensor, forward: Tensor) -> Tensor:
    """ToyWorld's key light (B, 3): the unit direction towards a far light above-left of each camera."""
    return F.normalize(light_toward(-forward, right, up, KEY_LIGHT_OFFSET), dim=-1)


def ray_aabb(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Near and far distances (N,) of rays (N, 3) in the cube [-bound, bound]^3 (the slab method).
    Rays that start inside get near = 0; rays that miss get far = near (an empty interval)."""
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (-bound - origins) / safe, (bound - origins) / safe  # (N, 3) each
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, torch.maximum(far, near)
