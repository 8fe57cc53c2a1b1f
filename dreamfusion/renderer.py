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
from einops import einsum, rearrange, repeat
from torch import Tensor

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


EVAL_MIN_WEIGHT = 1e-4  # evaluation renders skip shading samples whose compositing weight is below this


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


def _empty_outputs(n: int, like: Tensor) -> dict[str, Tensor]:
    return {k: like.new_zeros((n, c) if c else (n,)) for k, c in OUTPUTS.items()}


class _Renderer:
    """Shared driver: background, chunking, compositing with the background."""

    def __init__(self, cfg: RenderConfig, bound: float):
        self.cfg, self.bound = cfg, bound

    def update(self, step: int, field: Field) -> None:
        """Per-training-step upkeep (the occupancy grid); nothing for renderers without state."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

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
    """Plain-PyTorch renderer: `samples_per_ray` equal intervals between near and far per ray."""

    def _integrate(self, origins, dirs, near, far, field, shading_fn, train, generator, need_normals, offset):
        out = _empty_outputs(origins.shape[0], origins)
        hit = (far > near).nonzero().squeeze(1)  # only rays through the cube are marched
        if hit.numel() == 0:
            return out
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
        if train or torch.is_grad_enabled():
            density, rgb, normals = _query_samples(field, shading_fn, points, ray_index, need_normals, train)
            w = self._weights(rearrange(density, "(r s) -> r s", s=S), delta)  # (R, S)
        else:  # evaluation: shade (and take normals) only where a sample carries weight, often a tenth of them
            w = self._weights(rearrange(field.query_density(points).float(), "(r s) -> r s", s=S), delta)
            keep = (w.reshape(-1) > EVAL_MIN_WEIGHT).nonzero().squeeze(1)
            _, rgb_kept, normals_kept = _query_samples(field, shading_fn, points[keep], ray_index[keep], need_normals, False)
            rgb = points.new_zeros(len(points), 3).index_copy(0, keep, rgb_kept)
            normals = None if normals_kept is None else points.new_zeros(len(points), 3).index_copy(0, keep, normals_kept)
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
    `update(step, field)` every training step (it refreshes the grid every `grid_update_every`
    steps with occupancy = density * step size), and a first render refreshes it if nothing has.
    nerfacc's stratified jitter and grid refresh draw from torch's global RNG, not `generator`.
    """

    def __init__(self, cfg: RenderConfig, bound: float, device: torch.device | str = "cuda"):
        super().__init__(cfg, bound)
        import nerfacc  # CUDA-only compiled ops: never imported on the CPU path

        self.nerfacc = nerfacc
        roi = torch.tensor([-bound] * 3 + [bound] * 3, dtype=torch.float32)
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=roi, resolution=cfg.grid_resolution, levels=1).to(device)
        self.step = cfg.step_size(bound)
        self.ready = False  # has the grid been filled once?

    def _occupancy_fn(self, field: Field):
        return lambda x: field.query_density(x)[:, None] * self.step  # (N, 1): opacity of one step

    def update(self, step: int, field: Field) -> None:
        self.estimator.train()
        self.estimator.update_every_n_steps(step=step, occ_eval_fn=self._occupancy_fn(field),
                                            occ_thre=self.cfg.occupancy_threshold, n=self.cfg.grid_update_every)
        self.ready = self.ready or step % self.cfg.grid_update_every == 0

    def refresh(self, field: Field) -> None:
        """Fill the whole grid from the field now (nerfacc's warm-up update of every cell)."""
        self.estimator._update(step=0, occ_eval_fn=self._occupancy_fn(field), occ_thre=self.cfg.occupancy_threshold)
        self.ready = True

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state)
        self.ready = True

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
