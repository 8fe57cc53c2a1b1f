"""Volume rendering of the field along rays: a plain-PyTorch batched renderer, and nerfacc's on CUDA.

NeRF's quadrature (Mildenhall et al. 2020, eq. 3): w_i = T_i alpha_i, alpha_i = 1 - exp(-sigma_i delta_i),
T_i = exp(-sum_{j<i} sigma_j delta_j); rgb, depth and normal are w-weighted sums plus (1 - sum w) background,
and DreamFusion's orientation penalty is sum stopgrad(w_i) max(0, n_i . d)^2. Rays are clipped to the cube
[-bound, bound]^3. As in nerfacc and nerfstudio, a renderer takes callables (the field, the background, a
shading function) and never imports a field class. docs/3d.md has the design notes.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import Tensor, nn

from pipelines.errors import UserError
from pipelines.geometry import ray_aabb

from .config import RenderConfig

logger = logging.getLogger(__name__)

OUTPUTS = {"rgb": 3, "opacity": 1, "depth": 1, "normal": 3, "orientation": 0}  # channels (0: per-ray scalar)

ShadingFn = Callable[[Tensor, Optional[Tensor], Tensor, Tensor], Tensor]


class Field(Protocol):
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]: ...
    def query_density(self, x: Tensor) -> Tensor: ...
    def normals(self, x: Tensor, create_graph: bool = False) -> Tensor: ...


class BackgroundFn(Protocol):
    def __call__(self, dirs: Tensor, train: bool, generator: torch.Generator | None) -> Tensor: ...


# The batched renderer shades (and takes normals at) only samples whose weight exceeds these: in training, where the
# gradient matters; in evaluation renders, where only the image does (what is dropped is at most a percent of a pixel).
MIN_WEIGHT, EVAL_MIN_WEIGHT = 1e-4, 1e-3


def _query_samples(field: Field, shading_fn: ShadingFn, points: Tensor, ray_index: Tensor,
                   need_normals: bool, train: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Density (M,), shaded colour (M, 3) and normals (M, 3) or None at sample points (M, 3)."""
    density, albedo = field(points)
    normals = field.normals(points, create_graph=train and torch.is_grad_enabled()) if need_normals else None
    rgb = shading_fn(albedo, normals, points, ray_index)
    # Compositing runs in fp32 even under autocast: transmittance is a long product.
    return density.float(), rgb.float(), None if normals is None else normals.float()


def _facing_away(normals: Tensor, dirs: Tensor) -> Tensor:
    """DreamFusion's orientation penalty per sample (M,): max(0, n . d)^2 (d points into the scene)."""
    return (normals * dirs).sum(-1).clamp(min=0) ** 2


def _scatter(values: Tensor, index: Tensor, n: int) -> Tensor:
    """values (K, ...) at rows `index` (K,) of n rows, zeros elsewhere (differentiable in values)."""
    return values.new_zeros((n,) + values.shape[1:]).index_copy(0, index, values)


def _empty_outputs(n: int, like: Tensor) -> dict[str, Tensor]:
    return {k: like.new_zeros((n, c) if c else (n,)) for k, c in OUTPUTS.items()}


class OccupancyGrid(nn.Module):
    """Which cells of the cube [-bound, bound]^3 hold matter: nerfacc's occupancy grid, in plain PyTorch.

    `resolution`^3 cells. `refresh(field)` queries the density at every cell corner; a cell is occupied when one of
    its 8 corners has density * `step` above `threshold` (nerfacc's test, on one marching step's optical depth), and
    the occupied cells are dilated by one cell, so a surface can grow between refreshes. Before the first refresh
    every cell counts as occupied. Deterministic (corners, not nerfacc's random points), and the grid is a buffer,
    so a checkpoint holds it and a resumed fit marches the same samples.
    """

    def __init__(self, resolution: int, bound: float, threshold: float, step: float):
        super().__init__()
        self.resolution, self.bound, self.threshold, self.step = resolution, bound, threshold, step
        self.register_buffer("occupied", torch.ones((resolution,) * 3, dtype=torch.bool))
        self.register_buffer("refreshed", torch.tensor(-1))  # the step of the last refresh (-1: never)

    @property
    def ready(self) -> bool:
        return int(self.refreshed) >= 0

    @torch.no_grad()
    def refresh(self, field: Field, step: int = 0, chunk: int = 65536) -> None:
        r = self.resolution
        axis = torch.linspace(-self.bound, self.bound, r + 1, device=self.occupied.device)
        corners = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        density = torch.cat([field.query_density(corners[i:i + chunk]).float() for i in range(0, len(corners), chunk)])
        solid = (density * self.step > self.threshold).float().reshape(1, 1, r + 1, r + 1, r + 1)
        cells = F.max_pool3d(solid, 2, stride=1)  # a cell is solid if any of its corners is
        self.occupied.copy_(F.max_pool3d(cells, 3, stride=1, padding=1)[0, 0] > 0)
        self.refreshed.fill_(step)

    def forward(self, points: Tensor) -> Tensor:
        """Whether each point (M, 3) lies in an occupied cell (M,); points outside the cube are not."""
        r = self.resolution
        cell = ((points + self.bound) * (r / (2 * self.bound))).floor().long()
        inside = ((cell >= 0) & (cell < r)).all(-1)
        cell = cell.clamp(0, r - 1)
        return inside & self.occupied[cell[:, 0], cell[:, 1], cell[:, 2]]

    def fraction(self) -> float:
        return float(self.occupied.float().mean())


class _Renderer(nn.Module):
    """Shared driver: background, chunking, compositing with the background. A module, so that its state (an
    occupancy grid) goes into the fit's checkpoints with the field."""

    def __init__(self, cfg: RenderConfig, bound: float):
        super().__init__()
        self.cfg, self.bound = cfg, bound

    def update(self, step: int, field: Field) -> None:
        """Upkeep at the start of each training step (the occupancy grid); nothing for renderers without state."""

    def render_rays(self, origins: Tensor, dirs: Tensor, field: Field, background: BackgroundFn,
                    shading_fn: ShadingFn, train: bool = False, generator: torch.Generator | None = None,
                    need_normals: bool = False, chunk: int | None = None) -> dict[str, Tensor]:
        """Render rays (N, 3) with unit dirs (N, 3): rgb (N, 3), opacity (N, 1), depth (N, 1),
        normal (N, 3) (zeros unless need_normals), orientation (N,) (zeros unless need_normals).

        `chunk` renders that many rays at a time (wrap the call in torch.no_grad for big images);
        the background is drawn once for all rays, so "random" gives one colour per call.
        """
        if origins.shape != dirs.shape or origins.dim() != 2 or origins.shape[-1] != 3:
            raise ValueError(f"origins and dirs must both be (N, 3), got {tuple(origins.shape)} and {tuple(dirs.shape)}")
        bg = background(dirs, train, generator)  # (N, 3)
        n = origins.shape[0]
        step = n if chunk is None or chunk >= n else max(chunk, 1)
        parts = [self._render_chunk(origins[i:i + step], dirs[i:i + step], bg[i:i + step], field, shading_fn,
                                    train, generator, need_normals, offset=i) for i in range(0, n, step)]
        return {k: torch.cat([p[k] for p in parts]) for k in OUTPUTS} if len(parts) > 1 else parts[0]

    def _render_chunk(self, origins, dirs, bg, field, shading_fn, train, generator, need_normals, offset):
        near, far = ray_aabb(origins, dirs, self.bound)  # (n,), (n,)
        out = self._integrate(origins, dirs, near, far, field, shading_fn, train, generator, need_normals, offset)
        out["rgb"] = out["rgb"] + (1 - out["opacity"]) * bg
        return out

    def _integrate(self, origins, dirs, near, far, field, shading_fn, train, generator, need_normals, offset):
        raise NotImplementedError


class BatchedRenderer(_Renderer):
    """Plain-PyTorch renderer: `samples_per_ray` equal intervals between near and far per ray. The field is only
    queried at samples in occupied cells of an `OccupancyGrid` (refreshed every `grid_update_every` training steps);
    the other samples have density 0, as nerfacc's marching skips them."""

    def __init__(self, cfg: RenderConfig, bound: float):
        super().__init__(cfg, bound)
        self.grid = OccupancyGrid(cfg.grid_resolution, bound, cfg.occupancy_threshold, cfg.step_size(bound))

    def update(self, step: int, field: Field) -> None:
        if step % self.cfg.grid_update_every == 0 or not self.grid.ready:
            self.grid.refresh(field, step)

    def _integrate(self, origins, dirs, near, far, field, shading_fn, train, generator, need_normals, offset):
        out = _empty_outputs(origins.shape[0], origins)
        hit = (far > near).nonzero().squeeze(1)  # only rays through the cube are marched
        if hit.numel() == 0:
            return out
        if not self.grid.ready:  # a render before any training step (an export of a saved asset)
            self.grid.refresh(field)
        sub = self._march(origins[hit], dirs[hit], near[hit], far[hit], hit + offset, field, shading_fn,
                          train, generator, need_normals)
        return {k: out[k].index_copy(0, hit, sub[k]) for k in OUTPUTS}

    def _sample(self, near: Tensor, far: Tensor, train: bool, generator) -> tuple[Tensor, Tensor]:
        """Sample distances t (R, S) and interval lengths delta (R, S): one sample per equal interval."""
        S = self.cfg.samples_per_ray
        edges = near[:, None] + (far - near)[:, None] * torch.linspace(0, 1, S + 1, device=near.device)  # (R, S+1)
        starts, delta = edges[:, :-1], edges[:, 1:] - edges[:, :-1]  # (R, S)
        if train and self.cfg.stratified:
            device = generator.device if generator is not None else torch.device("cpu")
            u = torch.rand(starts.shape, generator=generator, device=device).to(starts)
        else:
            u = torch.full_like(starts, 0.5)
        return starts + u * delta, delta

    def _march(self, origins, dirs, near, far, ray_ids, field, shading_fn, train, generator, need_normals):
        S = self.cfg.samples_per_ray
        t, delta = self._sample(near, far, train, generator)  # (R, S) each
        points = rearrange(origins[:, None] + t[..., None] * dirs[:, None], "r s c -> (r s) c")  # (R*S, 3)
        ray_index = repeat(ray_ids, "r -> (r s)", s=S)
        n = len(points)
        occupied = self.grid(points).nonzero().squeeze(1)  # the samples the field is queried at
        pts, rid = points[occupied], ray_index[occupied]
        if train or torch.is_grad_enabled():
            density, albedo = field(pts)
        else:  # evaluation: the albedo is taken below, only where it shows
            density, albedo = field.query_density(pts), None
        w = self._weights(rearrange(_scatter(density.float(), occupied, n), "(r s) -> r s", s=S), delta)  # (R, S)
        # Only samples that carry weight are shaded and get normals (the normals' double backward is a quarter
        # of a training step); the others add under MIN_WEIGHT each to a ray, behind the surface or in near-empty
        # space, where a softplus density's gradient is as small as the density.
        least = EVAL_MIN_WEIGHT if albedo is None else MIN_WEIGHT
        shown = (w.detach().reshape(-1)[occupied] > least).nonzero().squeeze(1)  # rows of pts
        if albedo is None:
            albedo = field(pts[shown])[1]
        else:
            albedo = albedo[shown]
        normals = field.normals(pts[shown], create_graph=train and torch.is_grad_enabled()) if need_normals else None
        rgb = _scatter(shading_fn(albedo, normals, pts[shown], rid[shown]).float(), occupied[shown], n)
        normals = None if normals is None else _scatter(normals.float(), occupied[shown], n)
        per_ray = lambda x: rearrange(x, "(r s) c -> r s c", s=S)
        out = {"rgb": einsum(w, per_ray(rgb), "r s, r s c -> r c"),
               "opacity": w.sum(-1, keepdim=True),
               "depth": (w * t).sum(-1, keepdim=True)}
        if normals is None:
            out["normal"], out["orientation"] = torch.zeros_like(origins), torch.zeros_like(near)
        else:
            facing = _facing_away(per_ray(normals), dirs[:, None])  # (R, S)
            out["normal"] = einsum(w, per_ray(normals), "r s, r s c -> r c")
            out["orientation"] = (w.detach() * facing).sum(-1)
        return out

    def _weights(self, density: Tensor, delta: Tensor) -> Tensor:
        """Volume-rendering weights w_i = T_i alpha_i (R, S) from densities and interval lengths (R, S)."""
        tau = density * delta  # optical depth of each interval
        if self.cfg.alpha_threshold > 0:  # as nerfacc: samples with small alpha count as empty
            tau = torch.where(1 - torch.exp(-tau.detach()) < self.cfg.alpha_threshold, 0.0, tau)
        trans = torch.exp(-(torch.cumsum(tau, -1) - tau))  # exclusive: T_i = exp(-sum_{j<i} tau_j)
        return trans * (1 - torch.exp(-tau))


class NerfaccRenderer(_Renderer):
    """nerfacc occupancy-grid marching and packed rendering (CUDA); same outputs and maths.

    The grid (roi = the field's cube, `grid_resolution`^3, 1 level) starts empty: call
    `update(step, field)` at the start of every training step (it refreshes the grid every
    `grid_update_every` steps with occupancy = density * step size), and a first render refreshes it if
    nothing has. The estimator is a submodule, so checkpoints hold its grid. nerfacc's stratified jitter
    and grid refresh draw from torch's global RNG, not `generator`.
    """

    def __init__(self, cfg: RenderConfig, bound: float, device: torch.device | str = "cuda"):
        super().__init__(cfg, bound)
        import nerfacc  # CUDA-only compiled ops: never imported on the CPU path

        self.nerfacc = nerfacc
        roi = torch.tensor([-bound] * 3 + [bound] * 3, dtype=torch.float32)
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=roi, resolution=cfg.grid_resolution, levels=1).to(device)
        self.step = cfg.step_size(bound)

    def _occupancy_fn(self, field: Field):
        return lambda x: field.query_density(x)[:, None] * self.step  # (N, 1): opacity of one step

    def update(self, step: int, field: Field) -> None:
        self.estimator.train()
        self.estimator.update_every_n_steps(step=step, occ_eval_fn=self._occupancy_fn(field),
                                            occ_thre=self.cfg.occupancy_threshold, n=self.cfg.grid_update_every)

    @property
    def ready(self) -> bool:
        """Has the grid been filled (by an update, a refresh or a checkpoint)?"""
        return bool(self.estimator.binaries.any())

    def refresh(self, field: Field) -> None:
        """Fill the whole grid from the field now (nerfacc's warm-up update of every cell)."""
        self.estimator._update(step=0, occ_eval_fn=self._occupancy_fn(field), occ_thre=self.cfg.occupancy_threshold)

    def _integrate(self, origins, dirs, near, far, field, shading_fn, train, generator, need_normals, offset):
        if not self.ready:
            self.refresh(field)
        n, nerfacc = origins.shape[0], self.nerfacc
        midpoints = lambda ts, te, ri: origins[ri] + dirs[ri] * ((ts + te) / 2)[:, None]  # (M, 3)
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins, dirs, sigma_fn=lambda ts, te, ri: field.query_density(midpoints(ts, te, ri)),
            t_min=near, t_max=far, render_step_size=self.step, alpha_thre=self.cfg.alpha_threshold,
            stratified=train and self.cfg.stratified)
        ray_indices = ray_indices.long()  # (M,)
        saved = {}

        def rgb_sigma_fn(ts, te, ri):
            density, rgb, saved["normals"] = _query_samples(field, shading_fn, midpoints(ts, te, ri), ri + offset,
                                                            need_normals, train)
            return rgb, density

        rgb, opacity, _, extras = nerfacc.rendering(t_starts, t_ends, ray_indices, n_rays=n, rgb_sigma_fn=rgb_sigma_fn)
        w = extras["weights"]  # (M,)
        accumulate = lambda weights, values: nerfacc.accumulate_along_rays(weights, values, ray_indices, n)
        out = _empty_outputs(n, origins)
        out.update(rgb=rgb, opacity=opacity, depth=accumulate(w, ((t_starts + t_ends) / 2)[:, None]))
        normals = saved.get("normals")
        if normals is not None:
            out["normal"] = accumulate(w, normals)
            out["orientation"] = accumulate(w.detach(), _facing_away(normals, dirs[ray_indices])[:, None])[:, 0]
        return out


def nerfacc_problem(device: torch.device) -> str | None:
    """Why nerfacc cannot render on `device`, or None when it can. nerfacc JIT-builds its CUDA kernels on first
    use, which needs a matching CUDA toolkit and ninja; one tiny grid update and `sampling` call builds (or loads)
    them now, so a missing toolchain shows at start-up and not as a traceback mid-fit."""
    try:
        import nerfacc

        roi = torch.tensor([-1.0] * 3 + [1.0] * 3)
        estimator = nerfacc.OccGridEstimator(roi_aabb=roi, resolution=4, levels=1).to(device)
        estimator._update(step=0, occ_eval_fn=lambda x: torch.ones_like(x[:, :1]), occ_thre=0.0)
        origins, dirs = torch.zeros(1, 3, device=device), torch.tensor([[1.0, 0.0, 0.0]], device=device)
        estimator.sampling(origins, dirs, sigma_fn=lambda ts, te, ri: torch.ones_like(ts), t_min=origins[:, 0],
                           t_max=origins[:, 0] + 1, render_step_size=0.5, alpha_thre=0.0, stratified=False)
    except Exception as e:  # ImportError, a failed JIT build (RuntimeError, OSError, CalledProcessError), ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def make_renderer(device: torch.device | str, cfg: RenderConfig, bound: float) -> BatchedRenderer | NerfaccRenderer:
    """nerfacc on CUDA, the batched renderer elsewhere (or as `cfg.renderer` forces). nerfacc is probed
    first (`nerfacc_problem`); if it cannot run, the batched renderer takes over with a one-line warning."""
    device = torch.device(device)
    kind = cfg.renderer if cfg.renderer != "auto" else ("nerfacc" if device.type == "cuda" else "batched")
    if kind == "batched":
        return BatchedRenderer(cfg, bound)
    if device.type != "cuda":
        raise UserError(f"renderer=nerfacc needs a CUDA device, got {device}; use renderer=batched")
    problem = nerfacc_problem(device)
    if problem is not None:
        logger.warning("nerfacc cannot run here (%s); using the batched renderer instead", problem)
        return BatchedRenderer(cfg, bound)
    return NerfaccRenderer(cfg, bound, device)
