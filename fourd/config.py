"""Options of `run.py 4d` (torch-free, for a fast --help).

`python run.py 4d "a red ball moving right" dynamic.steps=300 dynamic.guidance=20`. The static stage takes
every option of `run.py 3d` under the same names (its recipe, and ToyWorld's `4d:` preset section, are the
3D job's); `dynamic.` holds the motion stage's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from dreamfusion.config import RESUME_FREE, ThreeDConfig, _range
from pipelines.config import group, option
from pipelines.errors import UserError

MAX_FRAMES = 32


@dataclass
class DynamicConfig:
    """The motion stage: video SDS through the inflated UNet moves the frozen static asset over time."""

    steps: int = option(200, "optimisation steps of the motion field")
    lr: float = option(1e-2, "Adam learning rate of the motion field (cosine decay to 10%)")
    frames: int = option(8, f"frames per rendered clip, at times t_1 ... t_F (3..{MAX_FRAMES})")
    fps: float = option(4.0, "frames per second of the clip: the clip lasts frames / fps seconds, and our temporal "
                             "layers read it as the motion's speed (AnimateDiff's do not)")
    guidance: float = option(100.0, "classifier-free guidance scale of the video SDS")
    t_range: tuple[float, float] = option((0.5, 0.98), "[low, high] noise levels of the video SDS, as fractions of "
                                                       "the schedule (motion is decided at the noisy end)")
    azimuth_range: tuple[float, float] = option((-30.0, 30.0), "azimuths of the clip cameras, degrees around the "
                                                               "front (0, on +x): motion words are camera-relative")
    elevation_range: tuple[float, float] = option((0.0, 30.0), "elevations of the clip cameras, degrees")
    hidden: int = option(32, "width of the motion field's MLPs")
    margin: float = option(0.8, "world units the render box grows by on every side of the static field's: room "
                                "for the asset to move (the samples per ray grow with it, to keep their spacing)")
    smooth: float = option(10.0, "weight of the temporal smoothness penalty (squared second differences over frames)")
    local: float = option(1.0, "weight of the local deformation's L1 penalty: the shape stays as the static stage "
                               "made it where nothing needs to move")

    def validate(self) -> None:
        if self.steps < 1 or self.hidden < 1:
            raise UserError("dynamic.steps and dynamic.hidden must be at least 1")
        if not 3 <= self.frames <= MAX_FRAMES:  # the smoothness penalty needs a second difference
            raise UserError(f"dynamic.frames must be between 3 and {MAX_FRAMES}, got {self.frames}")
        if not 0.1 <= self.fps <= 120:
            raise UserError(f"dynamic.fps must be between 0.1 and 120, got {self.fps}")
        for name in ("lr", "guidance"):
            if not 0 < getattr(self, name) < math.inf:
                raise UserError(f"dynamic.{name} must be a positive number, got {getattr(self, name)}")
        for name in ("smooth", "local"):
            if not 0 <= getattr(self, name) < math.inf:
                raise UserError(f"dynamic.{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.margin <= 10:
            raise UserError(f"dynamic.margin must be between 0 and 10 world units, got {self.margin}")
        _range("dynamic.t_range", self.t_range)
        if not 0 <= self.t_range[0] < self.t_range[1] <= 1:
            raise UserError(f"dynamic.t_range must lie in [0, 1] with low < high, got {list(self.t_range)}")
        _range("dynamic.azimuth_range", self.azimuth_range)
        _range("dynamic.elevation_range", self.elevation_range)
        if not (-90 < self.elevation_range[0] and self.elevation_range[1] < 90):
            raise UserError(f"dynamic.elevation_range must lie inside (-90, 90), got {list(self.elevation_range)}")


@dataclass
class FourDConfig(ThreeDConfig):
    motion: Optional[str] = option(None, "the video UNet's temporal layers: ours (`train temporal`) or an AnimateDiff "
                                         "MotionAdapter (default: the model preset's `motion:`)")
    static: Optional[str] = option(None, "a finished `run.py 3d` run to animate, in place of the static stage (its "
                                         "field options come from that run)")
    resume: Optional[str] = option(None, "a 4d run directory to continue from where it stopped (same as --resume)")
    dynamic: DynamicConfig = group(DynamicConfig, "the motion stage (video SDS)")

    def validate(self) -> None:
        super().validate()
        self.dynamic.validate()
        if self.static is not None:
            check_static(self.static)


def check_static(folder: str) -> None:
    """`static=` must name a finished 3d run that still holds its field."""
    path = Path(folder)
    if not (path / "metadata.json").is_file() or not (path / "asset.safetensors").is_file():
        raise UserError(f"static={folder} is not a finished 3d run (it needs metadata.json and asset.safetensors)")
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or "field" not in saved or "dynamic" in saved:
        raise UserError(f"static={folder} is not a 3d run (its config.yaml is not a 3d job's)")


def resume_free(key: str) -> bool:
    """Options that may differ when a 4d run resumes (what is written or how fast, not what is optimised)."""
    return key in RESUME_FREE or key.startswith("export.")
