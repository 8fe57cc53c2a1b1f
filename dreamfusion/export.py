"""A trained field as files: a density grid, a mesh (OBJ / GLB / PLY) and turntable MP4s.

Marching cubes (scikit-image's Lewiner variant) on a density grid at an iso-level, picked by default as the
level whose mesh silhouette best matches the NeRF's rendered one (`auto_iso_level`); trimesh cleans the mesh
and the field's albedo colours its vertices. `render_mesh` draws the mesh with a small plain-PyTorch
z-buffer rasterizer (no OpenGL needed), with the shared cameras and ToyWorld's light. Writes are atomic.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import trimesh
from einops import rearrange
from torch import Tensor

from pipelines.errors import UserError
from pipelines.geometry import AMBIENT, DIFFUSE, camera_frame, key_light, ray_aabb
from pipelines.runtime import atomic_path

from .config import MESH_FORMATS

logger = logging.getLogger(__name__)

FALLBACK_AVAILABLE_BYTES = 4 * 2**30  # when /proc/meminfo cannot be read (macOS, Windows)
MEMORY_FRACTION = 0.8  # of MemAvailable we allow export to use
# Working memory, per voxel: the float32 grid and the padded float32 copy marching cubes reads.
GRID_BYTES_PER_VOXEL = 8
# Per R^2: the mesh (a noisy NeRF surface can have ~10 R^2 vertices) and trimesh's float64 copies,
# adjacency and component labels while cleaning it (~400 bytes a vertex). Deliberately generous.
MESH_BYTES_PER_SLICE = 4096
NEAR = 1e-3  # triangles with a vertex closer than this to the camera plane are not drawn
# glTF 2.0 is +Y up, right-handed, and "the front of an asset faces +Z" (the spec's coordinate-system section,
# which is where viewers put their default camera). Our world (pipelines.geometry) is +Z up with the front on
# +X, so mesh.glb gets the rotation world +Z -> glTF +Y, world +X -> glTF +Z and hence world +Y -> glTF +X:
# (x, y, z) -> (y, z, x), a cyclic permutation (determinant +1, so no mirroring and faces keep their winding).
# It is baked into the vertices (the node has no transform), so every reader, with or without scene graphs,
# gets the same upright mesh. OBJ and PLY have no axis convention of their own and stay in the world frame.
WORLD_TO_GLTF = np.array([[0.0, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 1.0, 0.0],
                          [1.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0]])


# ---------------------------------------------------------------- density grid and memory

def estimate_grid_bytes(resolution: int) -> int:
    """Peak bytes to sample an R^3 grid, run marching cubes on it and clean the mesh up."""
    r = int(resolution)
    return GRID_BYTES_PER_VOXEL * r**3 + MESH_BYTES_PER_SLICE * r**2


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a fixed 4 GiB budget."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_AVAILABLE_BYTES


def check_resolution(resolution: int, available_bytes: int | None = None) -> None:
    """Raise UserError when an R^3 export would not fit in memory (or R is too small to mesh)."""
    if int(resolution) != resolution or resolution < 8:
        raise UserError(f"export.mesh_resolution={resolution} is too small: use an integer of at least 8 "
                        "(e.g. export.mesh_resolution=256)")
    budget = MEMORY_FRACTION * (available_memory_bytes() if available_bytes is None else available_bytes)
    need = estimate_grid_bytes(resolution)
    if need > budget:
        fits = max((r for r in range(32, int(resolution), 32) if estimate_grid_bytes(r) <= budget), default=8)
        raise UserError(f"export.mesh_resolution={resolution} needs about {need / 2**30:.1f} GiB but only "
                        f"{budget / 2**30:.1f} GiB is free: use export.mesh_resolution={fits} or less")


def voxel_centres(resolution: int, bound: float) -> Tensor:
    """World coordinates of the R voxel centres along one axis of [-bound, bound]. (R,)"""
    step = 2 * bound / resolution
    return -bound + (torch.arange(resolution, dtype=torch.float32) + 0.5) * step


def density_grid(field, resolution: int, bound: float | None = None, chunk: int = 65536,
                 device: torch.device | str = "cpu") -> Tensor:
    """Density at the voxel centres of [-bound, bound]^3: (R, R, R) float32 on CPU, indexed [x, y, z].

    Points are built per chunk from flat indices, so no (R^3, 3) coordinate array is ever held.
    `bound` defaults to `field.bound`; `device` is where the field's parameters live.
    """
    bound = float(field.bound if bound is None else bound)
    r = int(resolution)
    axis = voxel_centres(r, bound).to(device)
    grid = torch.empty(r**3, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, r**3, chunk):
            idx = torch.arange(start, min(start + chunk, r**3), device=device)
            x = torch.stack([axis[idx // (r * r)], axis[(idx // r) % r], axis[idx % r]], -1)  # (n, 3)
            grid[start:start + len(idx)] = field.query_density(x).reshape(-1).float().cpu()
    return rearrange(grid, "(x y z) -> x y z", x=r, y=r)


def max_density_along_rays(field, origins: Tensor, dirs: Tensor, bound: float, samples: int = 256,
                           chunk: int = 4096) -> Tensor:
    """Largest density at `samples` evenly spaced points where each ray crosses the box. (N,)

    origins, dirs: (N, 3). Rays that miss the box get 0. This is the mesh-side input of
    `auto_iso_level` (the NeRF-side input is the rendered opacity of the same rays).
    """
    out = torch.zeros(len(origins), device=origins.device)
    near, far = ray_aabb(origins, dirs, bound)
    s = (torch.arange(samples, device=origins.device) + 0.5) / samples  # (S,)
    with torch.no_grad():
        for i in range(0, len(origins), chunk):
            o, d, n, f = origins[i:i + chunk], dirs[i:i + chunk], near[i:i + chunk], far[i:i + chunk]
            t = n[:, None] + (f - n).clamp(min=0)[:, None] * s  # (n, S)
            x = o[:, None, :] + t[..., None] * d[:, None, :]  # (n, S, 3)
            sigma = field.query_density(rearrange(x, "n s c -> (n s) c")).reshape(len(o), samples)
            out[i:i + chunk] = torch.where(f > n, sigma.amax(-1), torch.zeros_like(n))
    return out


def auto_iso_level(max_density: Tensor, opacity: Tensor) -> float:
    """The density level whose mesh silhouette best matches the NeRF's rendered silhouette.

    For a ray, the mesh extracted at level L is hit iff the largest density along the ray exceeds L
    (`max_density > L`), while the NeRF "hits" it iff its rendered opacity exceeds one half
    (`opacity > 0.5`). Over rays from several views, we pick the L maximising the IoU of these two
    masks. Only L between two consecutive distinct values of `max_density` change the mask, so the
    sweep is exact: sort the rays by max density, descending; the level just below the k-th value
    selects the top k rays, and a cumulative sum of the target mask gives every IoU at once. The
    level returned is the midpoint of the winning gap.

    max_density, opacity: any shape, one entry per ray (flattened). Returns a Python float.
    """
    m, target = max_density.detach().reshape(-1).double().cpu(), opacity.detach().reshape(-1).cpu() > 0.5
    if m.numel() != target.numel() or m.numel() == 0:
        raise ValueError(f"need one max density per opacity, got {m.numel()} and {target.numel()}")
    positives = int(target.sum())
    if positives == 0:
        raise UserError("the NeRF renders nothing opaque (no ray has opacity > 0.5): train longer or pass export.iso_level=")
    s, order = m.sort(descending=True)  # (R,)
    floor = torch.tensor([0.0 if s[-1] > 0 else float(s[-1]) - 1.0], dtype=s.dtype)
    s_next = torch.cat([s[1:], floor])  # the value just below each one
    valid = s > s_next  # a level in (s_next[k-1], s[k-1]) selects exactly the top k rays
    k = torch.arange(1, len(s) + 1, dtype=torch.float64)
    tp = torch.cumsum(target[order].double(), 0)
    iou = torch.where(valid, tp / (k + positives - tp), torch.full_like(tp, -1.0))
    best = int(iou.argmax())
    return float((s[best] + s_next[best]) / 2)


# ---------------------------------------------------------------- marching cubes and cleanup

def extract_mesh(grid: Tensor, bound: float, level: float, albedo_fn: Callable[[Tensor], Tensor] | None = None,
                 keep_components: int = 1, device: torch.device | str = "cpu", chunk: int = 65536) -> trimesh.Trimesh:
    """Marching cubes at `level` on a density grid (R, R, R) indexed [x, y, z], in world coordinates.

    The grid is padded by one voxel of its minimum, so surfaces cut by the box are closed (the mesh is
    watertight wherever the level set is). Faces are wound so normals point out of the dense region.
    Cleanup keeps the `keep_components` largest connected pieces (by area; 0 keeps all), drops
    collapsed and duplicate faces and unreferenced vertices, and merges vertices. With `albedo_fn`
    (vertices (V, 3) on `device` -> (V, 3) in [0, 1]) the mesh gets uint8 RGBA vertex colours.
    """
    from skimage.measure import marching_cubes

    if grid.dim() != 3 or len(set(grid.shape)) != 1:
        raise ValueError(f"grid must be a cube (R, R, R), got {tuple(grid.shape)}")
    grid = grid.detach().float().cpu()
    lo, hi = float(grid.min()), float(grid.max())
    if not lo < level < hi:
        fix = "lower export.iso_level= or train longer" if level >= hi else "raise export.iso_level= (everything is denser than it)"
        raise UserError(f"no surface at iso-level {level:g} (density range {lo:.4g}..{hi:.4g}): {fix}")
    r = grid.shape[0]
    step = 2 * bound / r
    volume = np.pad(grid.numpy(), 1, mode="constant", constant_values=lo)  # (R+2,)*3
    # "ascent": the values grow towards the object of interest (density is high inside), which makes
    # scikit-image wind the faces so that their normals point outwards.
    verts, faces, _, _ = marching_cubes(volume, level=level, spacing=(step,) * 3, gradient_direction="ascent")
    # Padded index p sits at voxel centre p - 1, i.e. at -bound + (p - 0.5) * step.
    verts = np.clip(verts - bound - 0.5 * step, -bound, bound)
    mesh = _clean(trimesh.Trimesh(verts, faces, process=False), keep_components)
    if len(mesh.faces) == 0:
        raise UserError(f"no surface left at iso-level {level:g} after removing degenerate faces: "
                        "lower export.iso_level= or raise export.mesh_resolution=")
    if albedo_fn is not None:
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=_vertex_colors(mesh, albedo_fn, device, chunk))
    return mesh


def _clean(mesh: trimesh.Trimesh, keep_components: int) -> trimesh.Trimesh:
    mesh.merge_vertices()
    # Only collapsed faces (a vertex repeated, as merging leaves them) go. A zero-area face with three
    # distinct vertices stays: marching cubes makes such slivers, and dropping one opens a hole in the mesh.
    faces = mesh.faces
    mesh.update_faces((faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2]))
    mesh.update_faces(mesh.unique_faces())
    if keep_components > 0 and len(mesh.faces):
        labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
        area = np.bincount(labels, weights=mesh.area_faces)  # (components,)
        keep = np.argsort(-area, kind="stable")[:keep_components]
        mesh.update_faces(np.isin(labels, keep))
        logger.info("mesh: kept %d of %d connected components (%.1f%% of the area)", len(keep), len(area),
                    100 * area[keep].sum() / max(area.sum(), 1e-12))
    mesh.remove_unreferenced_vertices()
    return mesh


def _vertex_colors(mesh: trimesh.Trimesh, albedo_fn, device, chunk: int) -> np.ndarray:
    """Albedo at the vertices as uint8 RGBA (V, 4), queried in chunks without gradients."""
    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    with torch.no_grad():
        rgb = torch.cat([torch.as_tensor(albedo_fn(verts[i:i + chunk].to(device))).float().cpu().reshape(-1, 3)
                         for i in range(0, len(verts), chunk)])  # (V, 3)
    rgba = torch.cat([rgb.clamp(0, 1), torch.ones(len(rgb), 1)], -1)
    return (rgba * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- files

def write_meshes(mesh: trimesh.Trimesh, folder: str | Path, formats=MESH_FORMATS) -> dict[str, Path]:
    """Write `mesh.<fmt>` for each format into `folder`, atomically; returns {format: path}.

    Vertex colours travel in all three: PLY and GLB store them natively (GLB as COLOR_0), and
    trimesh writes OBJ vertex colours as the common `v x y z r g b` extension, which trimesh,
    MeshLab and Blender read back. A mesh with a texture would also get `mesh.mtl` (+ image).
    Axes: OBJ and PLY are in the world frame (+Z up, front on +X); GLB is in glTF's own (+Y up, front
    on +Z), rotated by `WORLD_TO_GLTF`, so glTF viewers show the asset upright and facing them.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown:
        raise UserError(f"unknown mesh format(s) {', '.join(map(str, unknown))}: use any of {', '.join(MESH_FORMATS)}")
    folder = Path(folder)
    paths = {}
    for fmt in formats:
        paths[fmt] = folder / f"mesh.{fmt}"
        if fmt == "obj":
            _write_obj(mesh, paths[fmt])
        elif fmt == "glb":
            gltf = mesh.copy()  # vertex colours come along; the caller's mesh stays in the world frame
            gltf.apply_transform(WORLD_TO_GLTF)
            with atomic_path(paths[fmt]) as tmp:
                gltf.export(tmp, file_type=fmt)
        else:
            with atomic_path(paths[fmt]) as tmp:
                mesh.export(tmp, file_type=fmt)
    return paths


def _write_obj(mesh: trimesh.Trimesh, path: Path) -> None:
    from trimesh.exchange.obj import export_obj

    text, extra = export_obj(mesh, include_color=True, include_texture=True, return_texture=True,
                             mtl_name="mesh.mtl")
    for name, data in extra.items():  # the material and texture, only for textured meshes
        with atomic_path(path.parent / name) as tmp:
            tmp.write_bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------- rasterizer

def render_mesh(mesh: trimesh.Trimesh, azimuth_deg, elevation_deg, distance, fov_deg, size: int,
                background: float = 0.92, max_candidates: int = 2**22) -> Tensor:
    """Draw a mesh from B cameras: (B, 3, size, size) in [0, 1]; pixels the mesh misses are `background`.

    Cameras are `pipelines.geometry.camera_frame`'s (angles in degrees; scalars or (B,)).
    Shading is ToyWorld's: vertex colour (perspective-correct interpolation) times
    AMBIENT + DIFFUSE * max(0, n . l), with the flat face normal n turned towards the camera and the
    light l above-left of the camera. Triangles crossing the camera plane are skipped.
    """
    az, el, dist, fov = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                                                  for v in (azimuth_deg, elevation_deg, distance, fov_deg)))
    eye, right, up, forward = camera_frame(az, el, dist)  # (B, 3) each
    half = torch.tan(torch.deg2rad(fov) / 2)  # (B,)
    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)  # (V, 3)
    faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long)  # (F, 3)
    colors = _mesh_colors(mesh)  # (V, 3)
    tri = verts[faces]  # (F, 3, 3)
    normals = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
    frames = []
    for b in range(len(az)):
        light = key_light(right[b:b + 1], up[b:b + 1], forward[b:b + 1])[0]
        screen, depth = _project(verts, eye[b], right[b], up[b], forward[b], half[b], size)
        face_id = _rasterize(screen, depth, faces, size, max_candidates)  # (H*W,)
        image = torch.full((size * size, 3), float(background))
        hit = (face_id >= 0).nonzero().squeeze(1)
        if len(hit):
            f = face_id[hit]
            n = normals[f] * torch.sign(((eye[b] - tri[f, 0]) * normals[f]).sum(-1, keepdim=True))
            lit = AMBIENT + DIFFUSE * (n @ light).clamp(min=0)[:, None]
            albedo = _interpolate(screen, depth, faces, f, hit, size, colors)
            image[hit] = (albedo * lit).clamp(0, 1)
        frames.append(rearrange(image, "(h w) c -> c h w", h=size))
    return torch.stack(frames)


def _mesh_colors(mesh: trimesh.Trimesh) -> Tensor:
    """Per-vertex RGB in [0, 1] (V, 3); face colours and textures are converted by trimesh, none is grey."""
    visual = mesh.visual
    if visual is None or visual.kind is None:
        return torch.full((len(mesh.vertices), 3), 0.7)
    if visual.kind == "texture":
        visual = visual.to_color()
    return torch.as_tensor(np.asarray(visual.vertex_colors)[:, :3], dtype=torch.float32) / 255


def _project(verts: Tensor, eye, right, up, forward, half, size: int):
    """Continuous pixel coordinates (V, 2) as (col, row), pixel centres at integers, and depth (V,)."""
    p = verts - eye  # (V, 3)
    depth = p @ forward
    scale = size / 2 / (half * depth.clamp(min=NEAR))
    col = (p @ right) * scale + size / 2 - 0.5
    row = size / 2 - 0.5 - (p @ up) * scale
    return torch.stack([col, row], -1), depth


def _barycentric_planes(screen: Tensor, faces: Tensor) -> Tensor:
    """Per face, the plane coefficients (F, 3, 3) mapping [col, row, 1] to the 3 barycentric weights."""
    a, b, c = screen[faces].unbind(1)  # (F, 2) each
    edge = lambda p, q: torch.stack([p[:, 1] - q[:, 1], q[:, 0] - p[:, 0], p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]], -1)
    planes = torch.stack([edge(b, c), edge(c, a), edge(a, b)], 1)  # (F, 3, 3): weight i = planes[i] . [x, y, 1]
    area = (planes[:, 0] * torch.cat([a, torch.ones(len(a), 1)], -1)).sum(-1)  # twice the signed area
    return planes / torch.where(area.abs() < 1e-12, torch.ones_like(area), area)[:, None, None]


def _rasterize(screen: Tensor, depth: Tensor, faces: Tensor, size: int, max_candidates: int) -> Tensor:
    """Index of the nearest face at each pixel centre (H*W,) long, -1 where there is none.

    Every face enumerates the pixel centres inside its screen bounding box (repeat_interleave over
    box sizes, in chunks of faces), keeps those passing the barycentric inside test, and competes in a
    z-buffer. Depth is positive, so its float32 bit pattern orders like the depth itself: the key
    (depth bits << 32 | face) under one `scatter_reduce("amin")` yields depth test and winner at once.
    """
    planes = _barycentric_planes(screen, faces)  # (F, 3, 3)
    tri, inv_z = screen[faces], 1 / depth.clamp(min=NEAR)[faces]  # (F, 3, 2), (F, 3)
    inv_z_plane = torch.einsum("fij,fi->fj", planes, inv_z)  # 1/depth is affine in screen space
    lo = tri.amin(1).ceil().clamp(0, size).long()  # (F, 2) first pixel (col, row)
    hi = tri.amax(1).floor().clamp(-1, size - 1).long()
    extent = (hi - lo + 1).clamp(min=0)  # (F, 2)
    ok = (depth[faces] > NEAR).all(1) & (planes.abs().sum((1, 2)) > 0) & (extent.prod(1) > 0)
    ids = ok.nonzero().squeeze(1)
    counts = extent[ids].prod(1)
    keys = torch.full((size * size,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    for chunk in _chunks_by_total(counts, max_candidates):
        f, n = ids[chunk], counts[chunk]
        owner = torch.repeat_interleave(torch.arange(len(f)), n)  # (N,) candidate -> face in chunk
        k = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        width = extent[f, 0][owner]
        col, row = lo[f, 0][owner] + k % width, lo[f, 1][owner] + k // width
        fo = f[owner]
        xy1 = torch.stack([col.float(), row.float(), torch.ones_like(col, dtype=torch.float32)], -1)  # (N, 3)
        inside = (torch.einsum("nij,nj->ni", planes[fo], xy1) >= -1e-6).all(-1)
        z = 1 / (inv_z_plane[fo] * xy1).sum(-1)
        inside &= z > NEAR
        key = (z[inside].view(torch.int32).long() << 32) | fo[inside]
        keys.scatter_reduce_(0, (row * size + col)[inside], key, "amin")
    return torch.where(keys == torch.iinfo(torch.int64).max, -1, keys & 0xFFFFFFFF)


def _chunks_by_total(counts: Tensor, budget: int):
    """Consecutive index ranges of `counts` whose sums stay under `budget` (a range may be one big item)."""
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < len(counts):
        base = int(ends[start - 1]) if start else 0
        stop = max(int(torch.searchsorted(ends, base + budget, right=True)), start + 1)
        yield slice(start, stop)
        start = stop


def _interpolate(screen, depth, faces, face_id, pixel, size, values) -> Tensor:
    """Perspective-correct interpolation of vertex values (V, C) at the given pixels (P,) -> (P, C)."""
    planes = _barycentric_planes(screen, faces[face_id])  # (P, 3, 3)
    xy1 = torch.stack([(pixel % size).float(), (pixel // size).float(), torch.ones(len(pixel))], -1)
    bary = torch.einsum("pij,pj->pi", planes, xy1).clamp(min=0)  # (P, 3) screen-space weights
    w = bary / depth.clamp(min=NEAR)[faces[face_id]]  # divide by depth for perspective correctness
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return torch.einsum("pi,pic->pc", w, values[faces[face_id]])
