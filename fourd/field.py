"""The 4D field: the static stage's field, moved over time by a deformation field.

A point x seen at time tau (in [-1, 1] over the clip, 0 at its middle) is looked up in the static field at
    y = R(-yaw) (x - T) / s,    x_canonical = y + D(y, tau)
with a global motion (translation T, log-scale log s, yaw about +z: an MLP of tau) and a small local
deformation D (an MLP of y and tau). Both are written as g(tau) - g(0), so at the clip's middle the asset is
exactly the static one, as ToyWorld's clips are centred (and D is also zero at the canonical centre, so only the global part carries the asset
away), and both start at zero (zero-initialised heads): the first render is the static
asset at every frame. A deformation field, not MAV3D's HexPlane: ToyWorld's motions (and most of what a
motion adapter makes of a still object) are rigid moves and scalings, which the global part holds in a
handful of numbers; the local part is there for the rest, kept small by an L1 penalty.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamfusion.field import mlp

GLOBAL = ("x", "y", "z", "log_scale", "yaw")  # the global motion's outputs


def time_features(tau: Tensor, octaves: int = 3) -> Tensor:
    """tau (N,) -> [tau, sin(2^k pi tau / 2), cos(...)] (N, 1 + 2 octaves): smooth paths, a few bends."""
    angles = tau[:, None] * (math.pi / 2) * 2.0 ** torch.arange(octaves, device=tau.device, dtype=tau.dtype)
    return torch.cat([tau[:, None], angles.sin(), angles.cos()], -1)


class MotionField(nn.Module):
    """Global motion (T, log s, yaw) of tau, and a local deformation D(y, tau)."""

    def __init__(self, hidden: int, bound: float, octaves: int = 3):
        super().__init__()
        self.bound, self.octaves = bound, octaves
        width = 1 + 2 * octaves
        self.global_net = mlp(width, hidden, 2, len(GLOBAL))
        self.local_net = mlp(3 + width, hidden, 2, 3)
        for head in (self.global_net[-1], self.local_net[-1]):  # identity at the start: the static asset
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def global_motion(self, tau: Tensor) -> Tensor:
        """(N,) times -> (N, 5): translation xyz, log-scale and yaw (radians), zero at tau = 0."""
        both = self.global_net(time_features(torch.cat([tau, tau.new_zeros(1)]), self.octaves))
        return both[:-1] - both[-1:]

    def local(self, y: Tensor, tau: float) -> Tensor:
        """Offsets (N, 3) of points y (N, 3) at time tau: zero at tau = 0 and at the canonical centre, so the local
        part bends the asset but cannot carry it away (moving it is the global part's job)."""
        if tau == 0:
            return torch.zeros_like(y)
        points = torch.cat([y, y.new_zeros(1, 3)])  # the centre rides along as the last row

        def net(t: float) -> Tensor:
            feats = time_features(torch.full((len(points),), t, device=y.device, dtype=y.dtype), self.octaves)
            return self.local_net(torch.cat([points / self.bound, feats], -1))
        out = net(tau) - net(0.0)
        return out[:-1] - out[-1:]

    def to_canonical(self, x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
        """World points (N, 3) at time tau -> canonical points (N, 3), and the local offsets (N, 3)."""
        g = self.global_motion(torch.tensor([tau], device=x.device, dtype=x.dtype))[0]
        y = rotate_z(x - g[:3], -g[4]) * torch.exp(-g[3])
        offset = self.local(y, tau)
        return y + offset, offset

    def to_world(self, canonical: Tensor, tau: float, iterations: int = 8) -> Tensor:
        """Canonical points (N, 3) -> where they are at time tau (the inverse of `to_canonical`: exact for the
        global motion, a fixed-point iteration y = c - D(y) for the small local part)."""
        g = self.global_motion(torch.tensor([tau], device=canonical.device, dtype=canonical.dtype))[0]
        y = canonical
        for _ in range(iterations if tau != 0 else 0):
            y = canonical - self.local(y, tau)
        return rotate_z(y * torch.exp(g[3]), g[4]) + g[:3]


def rotate_z(x: Tensor, angle: Tensor) -> Tensor:
    """Points (N, 3) rotated by `angle` (radians, a 0-d tensor) about +z."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1], x[:, 2]], -1)


class FrameField(nn.Module):
    """The 4D field at one time: the renderer's field protocol (density and albedo at points, normals)."""

    def __init__(self, static: nn.Module, motion: MotionField, tau: float):
        super().__init__()
        self.static, self.motion, self.tau = static, motion, float(tau)
        self.offsets: list[Tensor] = []  # the local offsets of every query, for the penalty

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        canonical, offset = self.motion.to_canonical(x, self.tau)
        if torch.is_grad_enabled():
            self.offsets.append(offset)
        return self.static(canonical)

    def query_density(self, x: Tensor) -> Tensor:
        return self.static.query_density(self.motion.to_canonical(x, self.tau)[0])

    def normals(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """-normalize(d density / dx) through the deformation (as `NeRFField.normals`, autograd)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.query_density(x).sum(), x, create_graph=create_graph)
        return -F.normalize(grad, dim=-1)


class AnyFrame(nn.Module):
    """Density at points as the most of any frame's: what the occupancy grid of a moving asset must hold."""

    def __init__(self, frames: list[FrameField]):
        super().__init__()
        self.frames = frames

    @torch.no_grad()
    def query_density(self, x: Tensor) -> Tensor:
        return torch.stack([f.query_density(x) for f in self.frames]).amax(0)
