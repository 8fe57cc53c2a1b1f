"""The NeRF field of text-to-3D: density and albedo at points (DreamFusion sec. 3.1), and the background.

threestudio's "implicit-volume" layout: MLPs over a point encoding (NeRF's frequency encoding with
octaves opened coarse to fine, or a plain-PyTorch Instant-NGP hash grid), a trunk that outputs the density
and (`albedo_network=shared`) the albedo, Magic3D's density blob at the start, and normals from the density
gradient. Density is 0 outside [-bound, bound]^3. docs/3d.md has the design notes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import FieldConfig

TRUNC_EXP_MAX = 15.0  # Instant-NGP clamps the exp's gradient at exp(15)


# ---------------------------------------------------------------- encodings

class FrequencyEncoding(nn.Module):
    """NeRF positional encoding of points in [-1, 1]^3: [x, sin(2^k pi x), cos(2^k pi x)] for k < octaves.

    Octave k is weighted by (1 - cos(pi clamp(alpha - k, 0, 1))) / 2 (BARF, Lin et al. 2021): with `alpha`
    growing from 0 to `octaves` during a fit, the field is smooth first and gains detail later. `alpha` is a
    saved buffer, so a resumed or exported field has the octaves it was trained with.
    """

    def __init__(self, octaves: int):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32), persistent=False)
        self.register_buffer("alpha", torch.tensor(float(octaves)))  # all octaves open
        self.out_dim = 3 + 6 * octaves

    def forward(self, x: Tensor) -> Tensor:
        k = torch.arange(len(self.freqs), device=x.device, dtype=x.dtype)
        weight = (1 - torch.cos(math.pi * (self.alpha.to(x.dtype) - k).clamp(0, 1))) / 2  # (F,)
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
            self.encoding = FrequencyEncoding(cfg.frequencies)
        separate = cfg.albedo_network == "separate"
        # raw density + 3 albedo logits, or the density alone when albedo has its own MLP
        self.trunk = mlp(self.encoding.out_dim, cfg.hidden, cfg.layers, 1 if separate else 4)
        self.albedo = mlp(self.encoding.out_dim, cfg.hidden, cfg.layers, 3) if separate else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Points (N, 3) -> density (N,) >= 0 and albedo (N, 3) in [0, 1]."""
        feats = self.encoding(x / self.cfg.bound)
        out = self.trunk(feats)  # (N, 4), or (N, 1) with a separate albedo MLP
        albedo_logits = out[:, 1:] if self.albedo is None else self.albedo(feats)
        return self._density(x, out[:, 0]), torch.sigmoid(albedo_logits)

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
        """The schedule at `progress` (0..1) of the fit: the frequency encoding's octaves open over the first
        `frequency_anneal` of it (nothing to do for a hash grid or with it off)."""
        if self.cfg.frequency_anneal > 0 and isinstance(self.encoding, FrequencyEncoding):
            self.encoding.anneal(progress / self.cfg.frequency_anneal)

    def normals(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """Unit normals (N, 3) = -normalize(d density / dx) (DreamFusion sec. 3.1).

        `normals=autograd`: the exact gradient. Grad is enabled locally, so this also works under
        torch.no_grad (not under torch.inference_mode). With create_graph=True the normals stay
        differentiable with respect to the parameters (for shading and the orientation loss).
        `normals=finite_difference` (threestudio's choice for hash grids): a 4-tap tetrahedron stencil
        of `normal_eps`, differentiable through plain density queries, with no double backward (which
        is slow for gathers). Where the gradient is zero (empty space) the normal is the zero vector.
        """
        if self.cfg.normals == "finite_difference":
            k = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=x.dtype, device=x.device)
            taps = self.query_density(rearrange(x[:, None, :] + self.cfg.normal_eps * k, "n k c -> (n k) c"))
            grad = (rearrange(taps, "(n k) -> n k 1", k=4) * k).sum(1)  # (N, 3), proportional to the gradient
            return -F.normalize(grad if create_graph else grad.detach(), dim=-1)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.query_density(x).sum(), x, create_graph=create_graph)
        return -F.normalize(grad, dim=-1)

    def _blob(self, x: Tensor) -> Tensor:
        """Magic3D's density blob: positive inside blob_radius, increasingly negative outside."""
        return self.cfg.blob_density * (1 - x.norm(dim=-1) / self.cfg.blob_radius)


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
