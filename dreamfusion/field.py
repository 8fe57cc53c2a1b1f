"""The NeRF field of text-to-3D: density and albedo at points, plus the background behind them.

Follows DreamFusion (Poole et al. 2022, "DreamFusion: Text-to-3D using 2D Diffusion", sec. 3.1):
the field outputs a volumetric density and an RGB *albedo* (not view-dependent radiance); shading
is applied later with normals from the negative normalised density gradient. The layout follows
threestudio's "implicit-volume": MLPs over a point encoding. By default (`albedo_network=shared`)
one trunk MLP outputs the density and the albedo together; `separate` gives the albedo an MLP of its
own on the same encoding, as threestudio's density and feature networks. A shared trunk cannot paint
small marks: fitted straight to ToyWorld's renders it loses the front marker that a separate albedo
MLP keeps. With a frequency encoding, though, a separate albedo MLP also prints the encoding's
axis-aligned ripples into the colour, so the ToyWorld recipe keeps it shared.

  * Encoding: NeRF's frequency (positional) encoding (Mildenhall et al. 2020), or a plain-PyTorch
    multiresolution hash encoding with trilinear interpolation (Instant-NGP, Mueller et al. 2022).
  * Density: the raw MLP density plus Magic3D's density blob (Lin et al. 2023, "Magic3D",
    `blob_density * (1 - |x| / blob_radius)`), so the optimisation starts from a ball at the
    centre instead of empty space or fog; then softplus, or Instant-NGP's truncated exp.
  * Everything outside the cube [-bound, bound]^3 has density 0.
  * `albedo_grid=N` adds a dense N^3 grid of albedo logits (trilinear, as DVGO's and Plenoxels' colour
    grids) to the network's. It starts at zero and only the refine stage trains it (dreamfusion.fit):
    each cell is free, so it paints a small local mark without the network's smoothness or ripples.
    `coat_albedo` sets it to cancel the network's albedo down to one plain colour instead.

`Background` is what rays see when they leave the cube: DreamFusion's environment MLP over the
ray direction, a fixed grey, or a random solid colour in training (threestudio's `random_aug`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pipelines.config import option
from pipelines.errors import UserError

ENCODINGS = ("frequency", "hashgrid")
DENSITY_ACTIVATIONS = ("softplus", "exp")
BACKGROUNDS = ("mlp", "fixed", "random")
TRUNC_EXP_MAX = 15.0  # Instant-NGP clamps the exp's gradient at exp(15)


@dataclass
class FieldConfig:
    """The NeRF field and its background."""

    bound: float = option(1.5, "the field lives in the cube [-bound, bound]^3 (density 0 outside)")
    encoding: str = option("frequency", "point encoding: frequency (NeRF positional) or hashgrid (Instant-NGP)")
    frequencies: int = option(6, "frequency encoding: number of octaves (sin/cos of 2^k pi x)")
    frequency_anneal: float = option(0.0, "frequency encoding: open the octaves coarse to fine over this fraction "
                                          "of the steps (BARF / threestudio's progressive band); 0 opens all at once")
    frequency_decay: float = option(1.0, "frequency encoding: octave k's features are scaled by decay^k, so under "
                                         "Adam the fine octaves change the field more slowly; 1 leaves them alone")
    hash_levels: int = option(12, "hashgrid: number of resolution levels")
    hash_features: int = option(2, "hashgrid: features per level")
    hash_log2_size: int = option(15, "hashgrid: log2 of the hash table size per level")
    hash_base_resolution: int = option(8, "hashgrid: coarsest grid resolution")
    hash_max_resolution: int = option(256, "hashgrid: finest grid resolution")
    hidden: int = option(64, "width of the trunk MLP")
    layers: int = option(2, "hidden layers of the trunk MLP")
    albedo_network: str = option("shared", "albedo from the density trunk (shared), or from an MLP of its own on the "
                                           "same encoding (separate: threestudio's feature network; holds small marks)")
    albedo_grid: int = option(0, "cells per side of a dense grid of albedo logits added to the network's (trilinear, "
                                 "zero at the start; trained by the refine stage): it holds small marks; 0: none")
    blob_density: float = option(10.0, "Magic3D density blob: peak added to the raw density at the centre")
    blob_radius: float = option(0.5, "Magic3D density blob: radius where the added density crosses 0")
    blob_fade: float = option(0.0, "fade the blob's positive centre to 0 over this fraction of the steps (its negative "
                                   "outside stays), so a hole can open through the centre; 0 keeps the blob whole")
    density_activation: str = option("softplus", "softplus, or exp (truncated exp with clamped gradient)")
    normals: str = option("autograd", "normals from the density gradient: autograd (exact) or finite_difference")
    normal_eps: float = option(0.01, "finite_difference normals: stencil size in world units")
    background: str = option("mlp", "mlp (environment MLP over ray direction), fixed (grey) or random (per call)")
    background_color: float = option(0.92, "grey level of the fixed background (and of random at eval)")

    def validate(self) -> None:
        if not self.bound > 0:
            raise UserError(f"bound must be positive, got {self.bound}")
        _choice("encoding", self.encoding, ENCODINGS)
        _choice("density_activation", self.density_activation, DENSITY_ACTIVATIONS)
        _choice("background", self.background, BACKGROUNDS)
        _choice("normals", self.normals, ("autograd", "finite_difference"))
        _choice("albedo_network", self.albedo_network, ("shared", "separate"))
        if not self.normal_eps > 0:
            raise UserError(f"normal_eps must be positive, got {self.normal_eps}")
        for name in ("hash_levels", "hash_features", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.frequencies < 0:
            raise UserError(f"frequencies must be >= 0, got {self.frequencies}")
        if not 0 < self.frequency_decay <= 1:
            raise UserError(f"frequency_decay must be in (0, 1], got {self.frequency_decay}")
        if not 0 <= self.frequency_anneal <= 1:
            raise UserError(f"frequency_anneal must be a fraction of the steps in [0, 1], got {self.frequency_anneal}")
        if not 4 <= self.hash_log2_size <= 24:
            raise UserError(f"hash_log2_size must be between 4 and 24, got {self.hash_log2_size}")
        if not 2 <= self.hash_base_resolution <= self.hash_max_resolution:
            raise UserError("hash resolutions must satisfy 2 <= hash_base_resolution <= hash_max_resolution, "
                            f"got {self.hash_base_resolution} and {self.hash_max_resolution}")
        if self.albedo_grid != 0 and not 2 <= self.albedo_grid <= 256:
            raise UserError(f"albedo_grid must be 0 (none) or 2-256 cells per side, got {self.albedo_grid}")
        if self.blob_density < 0 or not self.blob_radius > 0:
            raise UserError(f"blob_density must be >= 0 and blob_radius > 0, got {self.blob_density}, {self.blob_radius}")
        if not 0 <= self.blob_fade <= 1:
            raise UserError(f"blob_fade must be a fraction of the steps in [0, 1], got {self.blob_fade}")
        if not 0 <= self.background_color <= 1:
            raise UserError(f"background_color must be in [0, 1], got {self.background_color}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} '{value}': choose one of {', '.join(choices)}")


# ---------------------------------------------------------------- encodings

class FrequencyEncoding(nn.Module):
    """NeRF positional encoding of points in [-1, 1]^3: [x, sin(2^k pi x), cos(2^k pi x)] for k < octaves.

    Octave k is weighted by (1 - cos(pi clamp(alpha - k, 0, 1))) / 2 (BARF, Lin et al. 2021): with
    `alpha` growing from 0 to `octaves` during a fit, the field is smooth first and gains detail later,
    which keeps SDS from carving the axis-aligned ripples high octaves otherwise print on a shape.
    `alpha` is a saved buffer, so a resumed or exported field has the octaves it was trained with.

    `decay` < 1 also scales octave k by decay^k for good. Adam moves every weight by about the learning
    rate whatever its gradient's size, so the weights on the fine octaves, whose SDS gradients are small
    and noisy, change the field as fast as the coarse ones; the scale slows them in proportion.
    """

    def __init__(self, octaves: int, decay: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32), persistent=False)
        self.register_buffer("alpha", torch.tensor(float(octaves)))  # all octaves open
        self.decay = decay
        self.out_dim = 3 + 6 * octaves

    def forward(self, x: Tensor) -> Tensor:
        k = torch.arange(len(self.freqs), device=x.device, dtype=x.dtype)
        weight = (1 - torch.cos(math.pi * (self.alpha.to(x.dtype) - k).clamp(0, 1))) / 2  # (F,)
        if self.decay != 1.0:
            weight = weight * self.decay ** k
        angles = x[..., None] * self.freqs  # (N, 3, F)
        feats = [angles.sin() * weight, angles.cos() * weight]
        return torch.cat([x] + [rearrange(f, "n c f -> n (c f)") for f in feats], dim=-1)  # (N, 3 + 6F)

    def anneal(self, fraction: float) -> None:
        """Open the octaves up to `fraction` (0..1) of the way."""
        self.alpha.fill_(len(self.freqs) * min(max(fraction, 0.0), 1.0))


class HashGridEncoding(nn.Module):
    """Instant-NGP multiresolution hash encoding (Mueller et al. 2022, sec. 3), trilinear, plain PyTorch.

    Level l has resolution floor(base * growth^l) cells per axis, growth chosen so the last level
    reaches `max_resolution`. A level whose (res + 1)^3 vertices fit in the table is indexed densely
    (no collisions); finer levels use the paper's spatial hash (eq. 4, primes 1, 2654435761, 805459861).
    """

    PRIMES = (1, 2654435761, 805459861)

    def __init__(self, levels: int, features: int, log2_size: int, base_resolution: int, max_resolution: int):
        super().__init__()
        growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(levels - 1, 1))
        self.resolutions = [int(base_resolution * growth**level) for level in range(levels)]
        self.table_size = 2**log2_size
        # Tiny uniform init (paper: U(-1e-4, 1e-4)) so the initial field is the MLP bias plus the blob.
        self.tables = nn.Parameter(torch.empty(levels, self.table_size, features).uniform_(-1e-4, 1e-4))
        corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        self.register_buffer("corners", corners, persistent=False)  # (8, 3)
        self.out_dim = levels * features

    def forward(self, x: Tensor) -> Tensor:
        unit = ((x + 1) / 2).clamp(0, 1)  # (N, 3) in [0, 1]^3
        weights, index = zip(*(self._level(unit, level, res) for level, res in enumerate(self.resolutions)))
        # One lookup for all levels through F.embedding, whose CPU backward sums each row's gradients in a
        # fixed order: indexing's (index_put_ with accumulate) does not with more than one thread, so a
        # hash-grid fit would not repeat exactly, nor resume exactly.
        feats = F.embedding(torch.stack(index, 1), self.tables.flatten(0, 1))  # (N, levels, 8, F)
        return (torch.stack(weights, 1)[..., None] * feats).sum(2).flatten(1)  # (N, levels * F)

    def _level(self, unit: Tensor, level: int, res: int) -> tuple[Tensor, Tensor]:
        """Trilinear weights (N, 8) of a point's 8 cell corners at this level, and their rows (N, 8) in
        the flattened tables."""
        pos = unit * res  # (N, 3) in grid units
        cell = pos.floor().long().clamp(0, res - 1)
        frac = pos - cell  # (N, 3)
        vertices = cell[:, None, :] + self.corners  # (N, 8, 3)
        # Trilinear weight of each corner: product over axes of frac or (1 - frac).
        weights = torch.where(self.corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # (N, 8)
        return weights, self._index(vertices, res) + level * self.table_size

    def _index(self, v: Tensor, res: int) -> Tensor:
        if (res + 1) ** 3 <= self.table_size:
            return v[..., 0] + (res + 1) * (v[..., 1] + (res + 1) * v[..., 2])
        h = (v[..., 0] * self.PRIMES[0]) ^ (v[..., 1] * self.PRIMES[1]) ^ (v[..., 2] * self.PRIMES[2])
        return h % self.table_size


def mlp(in_dim: int, hidden: int, layers: int, out_dim: int) -> nn.Sequential:
    """`layers` hidden ReLU layers of width `hidden`, then a linear head."""
    dims = [in_dim] + [hidden] * layers
    body = [m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*body, nn.Linear(dims[-1], out_dim))


# ---------------------------------------------------------------- density activations

class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)) (Instant-NGP / torch-ngp `trunc_exp`).

    The backward is written in differentiable ops, so second derivatives (normals with
    create_graph=True) work through it.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=TRUNC_EXP_MAX))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


# ---------------------------------------------------------------- field

class NeRFField(nn.Module):
    """Density and albedo at world points (threestudio "implicit-volume" with DreamFusion's shading split)."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoding == "hashgrid":
            self.encoding = HashGridEncoding(cfg.hash_levels, cfg.hash_features, cfg.hash_log2_size,
                                             cfg.hash_base_resolution, cfg.hash_max_resolution)
        else:
            self.encoding = FrequencyEncoding(cfg.frequencies, cfg.frequency_decay)
        separate = cfg.albedo_network == "separate"
        # raw density + 3 albedo logits, or the density alone when albedo has its own MLP
        self.trunk = mlp(self.encoding.out_dim, cfg.hidden, cfg.layers, 1 if separate else 4)
        self.albedo = mlp(self.encoding.out_dim, cfg.hidden, cfg.layers, 3) if separate else None
        self.register_buffer("blob_scale", torch.tensor(1.0))  # the blob's centre, faded by `anneal` (blob_fade)
        n = cfg.albedo_grid
        # logits on an n^3 lattice spanning the cube, indexed [x, y, z]; zero adds nothing
        self.albedo_grid = nn.Parameter(torch.zeros(1, 3, n, n, n)) if n else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Points (N, 3) -> density (N,) >= 0 and albedo (N, 3) in [0, 1]."""
        out, albedo_logits = self._network(x)
        if self.albedo_grid is not None:
            albedo_logits = albedo_logits + self._grid_logits(x)
        return self._density(x, out[:, 0]), torch.sigmoid(albedo_logits)

    def _network(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The trunk's output (N, 4 or 1) and the network's albedo logits (N, 3), without the grid's."""
        feats = self.encoding(x / self.cfg.bound)
        out = self.trunk(feats)  # (N, 4), or (N, 1) with a separate albedo MLP
        return out, out[:, 1:] if self.albedo is None else self.albedo(feats)

    @torch.no_grad()
    def coat_albedo(self, rgb: Tensor) -> None:
        """Set the albedo grid so that the albedo is `rgb` (3,) at each of its lattice points, cancelling the
        network's logits there (exactly at the points, trilinearly between them): a plain coat of one colour
        over whatever the network painted, for the refine stage to paint on (`refine_canvas=plain`)."""
        n, b = self.albedo_grid.shape[-1], self.cfg.bound
        axis = torch.linspace(-b, b, n, device=self.albedo_grid.device)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)  # [x, y, z] order
        network = torch.cat([self._network(p)[1].float() for p in points.split(1 << 16)])
        target = torch.logit(rgb.float().clamp(1e-3, 1 - 1e-3)).to(network.device)
        self.albedo_grid.copy_(rearrange(target - network, "(x y z) c -> 1 c x y z", x=n, y=n))

    def _grid_logits(self, x: Tensor) -> Tensor:
        """The albedo grid's logits (N, 3) at points (N, 3), trilinear. grid_sample reads its coordinates as
        (W, H, D) indices, so they are flipped to (z, y, x) to index the [x, y, z] lattice."""
        coords = (x / self.cfg.bound).flip(-1).view(1, -1, 1, 1, 3).to(self.albedo_grid.dtype)
        sampled = F.grid_sample(self.albedo_grid, coords, mode="bilinear", align_corners=True)  # (1, 3, N, 1, 1)
        return rearrange(sampled, "1 c n 1 1 -> n c").to(x.dtype)

    def query_density(self, x: Tensor) -> Tensor:
        """Points (N, 3) -> density (N,) >= 0 (a separate albedo MLP is not run)."""
        return self._density(x, self.trunk(self.encoding(x / self.cfg.bound))[:, 0])

    def _density(self, x: Tensor, raw: Tensor) -> Tensor:
        raw = raw + self._blob(x)  # (N,)
        density = F.softplus(raw) if self.cfg.density_activation == "softplus" else trunc_exp(raw)
        inside = (x.abs() <= self.cfg.bound).all(-1)
        # `where`, not a multiply: exp may overflow to inf outside, and inf * 0 is nan.
        return torch.where(inside, density, torch.zeros_like(density))

    def anneal(self, progress: float) -> None:
        """The schedules at `progress` (0..1) of the fit: the frequency encoding's octaves open over the first
        `frequency_anneal` of it (nothing to do for a hash grid or with it off), and the blob's centre fades
        out over the first `blob_fade`."""
        if self.cfg.frequency_anneal > 0 and isinstance(self.encoding, FrequencyEncoding):
            self.encoding.anneal(progress / self.cfg.frequency_anneal)
        if self.cfg.blob_fade > 0:
            self.blob_scale.fill_(max(0.0, 1 - progress / self.cfg.blob_fade))

    def normals(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """Unit normals (N, 3) = -normalize(d density / dx) (DreamFusion sec. 3.1).

        `normals=autograd`: the exact gradient. Grad is enabled locally, so this also works under
        torch.no_grad (not under torch.inference_mode). With create_graph=True the normals stay
        differentiable with respect to the parameters (for shading and the orientation loss).
        `normals=finite_difference` (threestudio's choice for hash grids): a 4-tap tetrahedron stencil
        of `normal_eps`, differentiable through plain density queries, with no double backward (which
        is slow for gathers). Where the gradient is zero (empty space) the normal is the zero vector.
        No graph is built while no parameter of the density trains (the refine stage's frozen geometry):
        it would carry no gradient, and the double backward through the trunk costs time.
        """
        create_graph = create_graph and self.density_trains()
        if self.cfg.normals == "finite_difference":
            k = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=x.dtype, device=x.device)
            taps = self.query_density(rearrange(x[:, None, :] + self.cfg.normal_eps * k, "n k c -> (n k) c"))
            grad = (rearrange(taps, "(n k) -> n k 1", k=4) * k).sum(1)  # (N, 3), proportional to the gradient
            return -F.normalize(grad if create_graph else grad.detach(), dim=-1)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.query_density(x).sum(), x, create_graph=create_graph)
        return -F.normalize(grad, dim=-1)

    def density_trains(self) -> bool:
        """Whether a parameter that the density depends on (the encoding's or the trunk's) takes gradients."""
        return any(p.requires_grad for module in (self.encoding, self.trunk) for p in module.parameters())

    def _blob(self, x: Tensor) -> Tensor:
        """Magic3D's density blob: positive inside blob_radius (scaled by blob_scale), increasingly negative outside."""
        blob = self.cfg.blob_density * (1 - x.norm(dim=-1) / self.cfg.blob_radius)
        return blob.clamp(max=0) + self.blob_scale * blob.clamp(min=0)


# ---------------------------------------------------------------- background

class Background(nn.Module):
    """Colour (N, 3) seen along rays that leave the field, from their unit directions (N, 3).

    * "mlp": DreamFusion's environment map, a small MLP over the encoded direction with a
      sigmoid output (learned with the field).
    * "fixed": the constant grey `background_color`.
    * "random": in training, one uniform random solid colour per call, drawn from `generator`
      (threestudio's `random_aug`, which stops the field from painting the background into the
      object); at evaluation the fixed grey. Call once per image for one colour per image.
    """

    def __init__(self, cfg: FieldConfig, hidden: int = 32, octaves: int = 4):
        super().__init__()
        self.mode, self.color = cfg.background, cfg.background_color
        if self.mode == "mlp":
            self.encoding = FrequencyEncoding(octaves)
            self.net = mlp(self.encoding.out_dim, hidden, 1, 3)

    def forward(self, dirs: Tensor, train: bool = False, generator: torch.Generator | None = None) -> Tensor:
        if self.mode == "mlp":
            return torch.sigmoid(self.net(self.encoding(dirs)))
        if self.mode == "random" and train:
            device = generator.device if generator is not None else torch.device("cpu")
            color = torch.rand(3, generator=generator, device=device).to(dirs)
        else:
            color = torch.full((3,), self.color, dtype=dirs.dtype, device=dirs.device)
        return color.expand(dirs.shape[0], 3)
