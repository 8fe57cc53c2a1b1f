"""ToyWorld's batched sphere-tracing renderer (plain PyTorch, any device).

Each shape is a signed distance function of roughly unit size in object space; rays are moved into
object space (undoing offset, yaw and scale) once, so the march evaluates one fixed SDF. Cameras and the
key light are `pipelines.geometry`'s; the front marker is a dark cap on the +x side of every shape.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from pipelines.geometry import AMBIENT, DIFFUSE, camera_frame, camera_rays, key_light

from .world import COLORS, SHAPES, Scene

BACKGROUND = 0.92
MARKER_RGB = (0.06, 0.06, 0.06)
MARKER_HALF_ANGLE_DEG = 19.0  # marker = surface seen within this angle of +x from the centre

SPHERE_RADIUS = 0.8
BOX_HALF, BOX_ROUND = 0.6, 0.06
CONE_RADIUS, CONE_HEIGHT = 0.72, 1.4
CYL_RADIUS, CYL_HALF_HEIGHT = 0.6, 0.62
TORUS_MAJOR, TORUS_MINOR = 0.58, 0.28
PYR_HALF, PYR_HEIGHT = 0.68, 1.3
BOUND_RADIUS = 1.15  # every shape fits in this object-space sphere

STEPS, CHUNK = 48, 8  # march steps; rays that finish are dropped every CHUNK steps
HIT_EPS = 2e-3  # object-space distance that counts as "on the surface"


# ---------------------------------------------------------------- shapes (object space, p: (N, 3) -> (N,))

def _radial(p: Tensor):
    return torch.hypot(p[:, 0], p[:, 1]), p[:, 2]


def sdf_sphere(p: Tensor) -> Tensor:
    return p.norm(dim=-1) - SPHERE_RADIUS


def sdf_cube(p: Tensor) -> Tensor:
    # Slightly rounded edges give the silhouette a smooth, less aliased outline.
    q = p.abs() - (BOX_HALF - BOX_ROUND)
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0) - BOX_ROUND


def sdf_cone(p: Tensor) -> Tensor:
    # Intersection of the slanted side and the base plane: a distance lower
    # bound (exact near the surface), which is all sphere tracing needs.
    rho, z = _radial(p)
    side = (CONE_HEIGHT * rho + CONE_RADIUS * (z - CONE_HEIGHT / 2)) / math.hypot(CONE_HEIGHT, CONE_RADIUS)
    return torch.maximum(side, -z - CONE_HEIGHT / 2)


def sdf_cylinder(p: Tensor) -> Tensor:
    rho, z = _radial(p)
    dr, dz = rho - CYL_RADIUS, z.abs() - CYL_HALF_HEIGHT
    return torch.hypot(dr.clamp(min=0), dz.clamp(min=0)) + torch.maximum(dr, dz).clamp(max=0)


def sdf_torus(p: Tensor) -> Tensor:
    rho, z = _radial(p)  # lies flat: the ring is in the xy-plane
    return torch.hypot(rho - TORUS_MAJOR, z) - TORUS_MINOR


def sdf_pyramid(p: Tensor) -> Tensor:
    # Square base with faces towards +-x and +-y; same plane-intersection bound as the cone.
    across = torch.maximum(p[:, 0].abs(), p[:, 1].abs())
    side = (PYR_HEIGHT * across + PYR_HALF * (p[:, 2] - PYR_HEIGHT / 2)) / math.hypot(PYR_HEIGHT, PYR_HALF)
    return torch.maximum(side, -p[:, 2] - PYR_HEIGHT / 2)


SDFS = {"sphere": sdf_sphere, "cube": sdf_cube, "cone": sdf_cone,
        "cylinder": sdf_cylinder, "torus": sdf_torus, "pyramid": sdf_pyramid}
if tuple(SDFS) != SHAPES:
    raise ImportError("render.SDFS must list the same shapes, in the same order, as world.SHAPES")


# ---------------------------------------------------------------- marching and shading

def _rotate_z(v: Tensor, angle_rad: Tensor) -> Tensor:
    """Rotate vectors (..., 3) about +z by per-item angles broadcastable to v[..., 0]."""
    c, s = angle_rad.cos(), angle_rad.sin()
    x, y = v[..., 0], v[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y, v[..., 2]], -1)


def _to_object_space(origins: Tensor, dirs: Tensor, scene: Scene):
    """Undo the object's offset, yaw and scale; (B, H, W, 3) -> same shapes."""
    yaw = -torch.deg2rad(scene.yaw_deg)[:, None, None]
    o = _rotate_z(origins - scene.offset[:, None, None, :], yaw) / scene.scale[:, None, None, None]
    return o, _rotate_z(dirs, yaw)  # uniform scale keeps directions unit length


def _bound_interval(o: Tensor, d: Tensor):
    """Entry/exit ray distances of the bounding sphere (N,), and which rays touch it."""
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - BOUND_RADIUS**2)
    root = disc.clamp(min=0).sqrt()
    return (-b - root).clamp(min=0), -b + root, disc > 0


def _sphere_trace(sdf, o: Tensor, d: Tensor):
    """March rays (N, 3) to the surface; returns ray distance t (N,) and hit mask (N,)."""
    t0, t1, touches = _bound_interval(o, d)
    t = t0.clone()
    active = touches.nonzero().squeeze(1)
    for _ in range(STEPS // CHUNK):
        if active.numel() == 0:
            break
        oa, da, ta = o[active], d[active], t[active]
        for _ in range(CHUNK):
            dist = sdf(oa + ta[:, None] * da)
            ta = ta + dist
        t[active] = ta
        # Compacting only every CHUNK steps keeps indexing overhead small.
        active = active[(dist > HIT_EPS) & (ta < t1[active])]
    hit = touches & (t < t1)
    hit[hit.clone()] = sdf(o[hit] + t[hit, None] * d[hit]) < 4 * HIT_EPS
    return t, hit


def _normals(sdf, p: Tensor) -> Tensor:
    """Unit SDF gradient at points (N, 3) via the 4-tap tetrahedron stencil."""
    k = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=p.dtype, device=p.device)
    h = 1e-3
    vals = sdf(rearrange(p[:, None, :] + h * k, "n k c -> (n k) c"))
    grad = (rearrange(vals, "(n k) -> n k 1", k=4) * k).sum(1)
    return torch.nn.functional.normalize(grad, dim=-1)


def _light_dirs(scene: Scene) -> Tensor:
    """Object-space direction towards the key light (B, 3), which follows the camera, so the visible side is
    always lit and an object's colour reads the same from every view."""
    _, right, up, forward = camera_frame(scene.azimuth_deg, scene.elevation_deg, scene.distance)
    return _rotate_z(key_light(right, up, forward), -torch.deg2rad(scene.yaw_deg))


def _shade(sdf, p: Tensor, light: Tensor, albedo: Tensor) -> Tensor:
    """Lambert + ambient colour (N, 3) at object-space hit points, with the front marker."""
    n = _normals(sdf, p)
    lit = AMBIENT + DIFFUSE * (n * light).sum(-1, keepdim=True).clamp(min=0)
    toward_front = torch.nn.functional.normalize(p, dim=-1)[:, 0]  # cos of angle to +x
    # The facing test stops the marker showing on the torus' inner wall from behind.
    marker = (toward_front > math.cos(math.radians(MARKER_HALF_ANGLE_DEG))) & (n[:, 0] > 0.3)
    return torch.where(marker[:, None], torch.tensor(MARKER_RGB, device=p.device), albedo * lit)


def _render_pixels(scene: Scene, size: int):
    """One ray per pixel: rgb (B, 3, H, W), hard alpha and depth (B, 1, H, W)."""
    B, HW, dev = len(scene), size * size, scene.shape.device
    origins, dirs = camera_rays(*camera_frame(scene.azimuth_deg, scene.elevation_deg, scene.distance), scene.fov_deg, size)
    o_obj, d_obj = (rearrange(x, "b h w c -> (b h w) c") for x in _to_object_space(origins, dirs, scene))
    palette = torch.tensor(list(COLORS.values()), device=dev)  # (8, 3)
    light = _light_dirs(scene)  # (B, 3)

    rgb = torch.full((B * HW, 3), BACKGROUND, device=dev)
    alpha = torch.zeros(B * HW, device=dev)
    depth = torch.zeros(B * HW, device=dev)
    # One trace per shape type, so each march runs a single SDF over all its rays.
    for k, sdf in enumerate(SDFS.values()):
        items = (scene.shape == k).nonzero().squeeze(1)
        if items.numel() == 0:
            continue
        rays = (items[:, None] * HW + torch.arange(HW, device=dev)).flatten()
        t, hit = _sphere_trace(sdf, o_obj[rays], d_obj[rays])
        rays, t, item = rays[hit], t[hit], rays[hit] // HW
        p = o_obj[rays] + t[:, None] * d_obj[rays]
        rgb[rays] = _shade(sdf, p, light[item], palette[scene.color[item]])
        alpha[rays] = 1.0
        depth[rays] = t * scene.scale[item]  # object-space distance -> world units

    image = rearrange(rgb, "(b h w) c -> b c h w", b=B, h=size)
    as_map = lambda x: rearrange(x, "(b h w) -> b 1 h w", b=B, h=size)
    return image.clamp(0, 1), as_map(alpha), as_map(depth)


def render_with_aux(scene: Scene, size: int = 64, supersample: int = 2):
    """Render a batch: rgb (B, 3, H, W) in [0, 1], alpha and depth (B, 1, H, W).

    With supersample = s, each pixel averages s x s rays (anti-aliasing), so
    alpha is the fractional pixel coverage in [0, 1] and depth is the mean
    depth of the covered sub-rays (0 where nothing is hit).
    """
    if size < 1 or supersample < 1:
        raise ValueError(f"size and supersample must be positive, got {size}, {supersample}")
    rgb, alpha, depth = _render_pixels(scene, size * supersample)
    if supersample == 1:
        return rgb, alpha, depth
    pool = lambda x: torch.nn.functional.avg_pool2d(x, supersample)
    coverage = pool(alpha)
    return pool(rgb), coverage, pool(depth) / coverage.clamp(min=1e-6)


def render(scene: Scene, size: int = 64, supersample: int = 2) -> Tensor:
    """Render a batch of scenes to images (B, 3, size, size) in [0, 1]."""
    return render_with_aux(scene, size, supersample)[0]


def render_uint8(scene: Scene, size: int = 64, device=None, chunk: int = 256, progress: bool = False,
                 desc: str = "rendering") -> Tensor:
    """Render a large batch in chunks to uint8 images (B, 3, size, size) on `device` (a data bank)."""
    device = torch.device(device) if device is not None else scene.shape.device
    n = len(scene)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
    for i in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False):
        part = scene.map(lambda x: x[i:i + chunk]).to(device)
        images[i:i + chunk] = (render(part, size) * 255).round().to(torch.uint8)
    return images
