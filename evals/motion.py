"""Motion metrics of `eval video`, from the object's silhouette (pixels away from ToyWorld's plain background),
and the judge on every frame of a clip."""

from __future__ import annotations

import torch

from toyworld.render import BACKGROUND

SIGNED = {"moving left": ("x", -1), "moving right": ("x", 1), "moving up": ("y", -1), "moving down": ("y", 1),
          "growing": ("area", 1), "shrinking": ("area", -1)}


def silhouettes(clips: torch.Tensor, threshold: float = 0.12) -> torch.Tensor:
    """(n, F, 3, H, W) in [0, 1] -> (n, F, H, W) masks of pixels away from the plain background."""
    return ((clips - BACKGROUND).abs().amax(dim=2) > threshold).float()


def tracks(clips: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per frame: silhouette centroid x, y (pixels; y grows downwards) and area fraction, each (n, F)."""
    mask = silhouettes(clips)
    h, w = mask.shape[-2:]
    area = mask.sum((-2, -1)).clamp(min=1.0)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    return {"x": (mask * xs).sum((-2, -1)) / area, "y": (mask * ys).sum((-2, -1)) / area, "area": area / (h * w)}


def slope(series: torch.Tensor) -> torch.Tensor:
    """Least-squares slope per row of (n, F) over frame index."""
    t = torch.arange(series.shape[-1], dtype=torch.float32)
    t = t - t.mean()
    return ((series - series.mean(-1, keepdim=True)) * t).sum(-1) / (t * t).sum()


def motion_correct(clips: torch.Tensor, motion: list[str], min_reversal_px: float = 0.5) -> list[bool | None]:
    """Did each clip move as its motion word says? None where there is no criterion (spinning)."""
    track = tracks(clips)
    out: list[bool | None] = []
    for i, m in enumerate(motion):
        if m in SIGNED:
            key, sign = SIGNED[m]
            out.append(bool(slope(track[key][i : i + 1])[0] * sign > 0))
        elif m == "bouncing":  # a bounce goes up, then comes down (or the reverse): dy changes sign
            dy = track["y"][i].diff()
            big = dy[dy.abs() > min_reversal_px / max(1, len(dy) // 4)]
            out.append(bool(len(big) > 1 and (big[:-1] * big[1:] < 0).any()))
        else:
            out.append(None)
    return out


def smoothness(clips: torch.Tensor) -> float:
    """Mean absolute frame-to-frame pixel change (0..1)."""
    return float((clips[:, 1:] - clips[:, :-1]).abs().mean())


def displacement_per_frame(clips: torch.Tensor) -> float:
    """Mean |centroid step| in pixels per frame."""
    track = tracks(clips)
    return float(torch.sqrt(track["x"].diff(dim=1) ** 2 + track["y"].diff(dim=1) ** 2).mean())


def judge_frames(judge, clips: torch.Tensor) -> dict[str, torch.Tensor]:
    """The judge on every frame: colour and shape indices, (n, F)."""
    n, f = clips.shape[:2]
    predicted = judge.predict(clips.reshape(n * f, *clips.shape[2:]))
    return {k: predicted[k].reshape(n, f) for k in ("color", "shape")}


def identity_stability(judged: dict[str, torch.Tensor]) -> float:
    """Fraction of frames whose judged colour and shape are both their clip's majority."""
    majority = lambda x: x.mode(dim=1).values[:, None]  # noqa: E731
    stable = (judged["color"] == majority(judged["color"])) & (judged["shape"] == majority(judged["shape"]))
    return round(float(stable.float().mean()), 4)


def rate(flags: list) -> float | None:
    scored = [x for x in flags if x is not None]
    return round(sum(scored) / len(scored), 4) if scored else None
