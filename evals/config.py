"""Options of `run.py eval image|video|3d|4d` and `train judge` (torch-free, for a fast --help)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dreamfusion.config import ThreeDConfig
from fourd.config import FourDConfig
from pipelines.config import option
from pipelines.errors import UserError
from pipelines.options import SamplingOptions, check_seed
from toyworld.vocab import COLOR_NAMES, MOTIONS, SHAPES
from video.config import MAX_FRAMES, VideoConfig

JUDGE = "models/judge"  # the shipped judge (`python run.py train judge`)


def _pick(chosen: tuple[str, ...], known: tuple[str, ...]) -> list[int]:
    """Indices of the chosen names in the world's order; all of them when none is chosen."""
    return [i for i, x in enumerate(known) if not chosen or x in chosen]


def _check_names(cfg, lists) -> None:
    """Every name in each of cfg's (option, known names) lists must be a known one."""
    for name, known in lists:
        unknown = [x for x in getattr(cfg, name) if x not in known]
        if unknown:
            raise UserError(f"unknown {name[:-1]} '{unknown[0]}': choose from {', '.join(known)}")


@dataclass
class EvalImageConfig(SamplingOptions):
    samples_per_prompt: int = option(4, "images generated per prompt")
    colors: tuple[str, ...] = option((), f"colours of the prompt grid, e.g. [red, blue]; [] for all {len(COLOR_NAMES)}")
    shapes: tuple[str, ...] = option((), f"shapes of the prompt grid, e.g. [cube, sphere]; [] for all {len(SHAPES)}")
    views: bool = option(False, "also score 'a {color} {shape}, {view} view' prompts on the view")
    judge: str = option(JUDGE, "the judge folder (made by `python run.py train judge`)")
    batch_size: int = option(32, "images denoised together (lower it to save memory)")

    def validate(self) -> None:
        super().validate()
        for name in ("samples_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, known in (("colors", COLOR_NAMES), ("shapes", SHAPES)):
            chosen = getattr(self, name)
            unknown = [c for c in chosen if c not in known]
            if unknown:
                raise UserError(f"unknown {name[:-1]} '{unknown[0]}': choose from {', '.join(known)}")
            if len(set(chosen)) != len(chosen):
                raise UserError(f"{name} lists a {name[:-1]} twice")

    # In the world's order whatever order they were listed in, so every table and grid.png agree.
    @property
    def grid_colors(self) -> tuple[str, ...]:
        return tuple(c for c in COLOR_NAMES if c in self.colors or not self.colors)

    @property
    def grid_shapes(self) -> tuple[str, ...]:
        return tuple(s for s in SHAPES if s in self.shapes or not self.shapes)


@dataclass
class EvalVideoConfig(VideoConfig):
    frames: int = option(8, "frames per clip")
    samples_per_prompt: int = option(4, "clips generated per prompt")
    colors: tuple[str, ...] = option(("red", "green", "blue"), "colours of the prompt grid; [] for all")
    shapes: tuple[str, ...] = option(("sphere", "cube"), "shapes of the prompt grid; [] for all")
    motions: tuple[str, ...] = option((), "motions of the prompt grid, e.g. ['moving left']; [] for all")
    judge: str = option(JUDGE, "the judge folder (made by `python run.py train judge`)")
    seam_frames: int = option(32, "length of the long clips for the window-seam measurement (0 skips it)")
    masked_clips: int = option(16, "ground-truth clips for each of the masked-frame model's scores, interpolation "
                                   "(x interpolate, 4 if 1) and image-to-video (0 skips; needs masked_motion= or "
                                   "the preset's interpolation:)")

    def validate(self) -> None:
        super().validate()
        if self.samples_per_prompt < 1:
            raise UserError(f"samples_per_prompt must be at least 1, got {self.samples_per_prompt}")
        if self.seam_frames < 0 or self.seam_frames > MAX_FRAMES:
            raise UserError(f"seam_frames must be between 0 and {MAX_FRAMES}, got {self.seam_frames}")
        if self.masked_clips < 0:
            raise UserError(f"masked_clips must be 0 or more, got {self.masked_clips}")
        if self.frames < 3:
            raise UserError(f"eval video needs at least 3 frames to judge motion, got {self.frames}")
        _check_names(self, (("colors", COLOR_NAMES), ("shapes", SHAPES), ("motions", MOTIONS)))

    def grid(self) -> list[tuple[int, int, int]]:
        return [(c, s, m) for c in _pick(self.colors, COLOR_NAMES) for s in _pick(self.shapes, SHAPES)
                for m in _pick(self.motions, MOTIONS)]


@dataclass
class Eval3DConfig(ThreeDConfig):
    seeds: int = option(2, "assets fitted per prompt (seeds seed, seed + 1, ...)")
    colors: tuple[str, ...] = option((), "colours of the prompt grid; [] for all")
    shapes: tuple[str, ...] = option((), "shapes of the prompt grid; [] for all")
    judge: str = option(JUDGE, "the judge folder (made by `python run.py train judge`)")
    iou_resolution: int = option(64, "sample points per side of the IoU grid")
    rotations: int = option(36, "turns about the vertical axis tried for the best IoU")
    views: int = option(8, "azimuths of the mesh renders the judge scores for colour and shape")
    view_frames: int = option(36, "azimuths (0, 360/n, ...) of the NeRF renders the judge's view is checked on")
    judge_elevation: float = option(15.0, "camera elevation of the judged renders, degrees")
    resume: Optional[str] = option(None, "an eval 3d directory to continue: its scored assets are kept, the one "
                                         "it was fitting continues from its checkpoint, the rest are fitted (--resume)")

    def validate(self) -> None:
        super().validate()
        if self.seeds < 1 or self.iou_resolution < 8 or self.rotations < 1 or min(self.views, self.view_frames) < 1:
            raise UserError("seeds, rotations, views and view_frames must be at least 1, iou_resolution at least 8")
        _check_names(self, (("colors", COLOR_NAMES), ("shapes", SHAPES)))

    def grid(self) -> list[tuple[int, int]]:
        return [(c, s) for c in _pick(self.colors, COLOR_NAMES) for s in _pick(self.shapes, SHAPES)]


MOTIONS_4D = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")


@dataclass
class Eval4DConfig(FourDConfig):
    seeds: int = option(1, "assets per prompt (seeds seed, seed + 1, ...); one static asset per colour, shape and seed "
                           "serves every motion")
    colors: tuple[str, ...] = option(("red",), "colours of the prompt grid; [] for all")
    shapes: tuple[str, ...] = option(("sphere", "cube"), "shapes of the prompt grid; [] for all")
    motions: tuple[str, ...] = option(MOTIONS_4D, f"motions of the prompt grid, any of {', '.join(MOTIONS_4D)}")
    judge: str = option(JUDGE, "the judge folder (made by `python run.py train judge`)")
    iou_resolution: int = option(64, "sample points per side of the IoU grid")
    rotations: int = option(36, "turns about the vertical axis tried for the best IoU")
    resume: Optional[str] = option(None, "an eval 4d directory to continue: scored assets are kept, the rest are "
                                         "fitted or finished (--resume)")

    def validate(self) -> None:
        super().validate()
        if self.seeds < 1 or self.iou_resolution < 8 or self.rotations < 1:
            raise UserError("seeds and rotations must be at least 1, iou_resolution at least 8")
        _check_names(self, (("colors", COLOR_NAMES), ("shapes", SHAPES), ("motions", MOTIONS_4D)))
        if not self.motions or len(set(self.motions)) != len(self.motions):
            raise UserError(f"motions must name each motion once, from {', '.join(MOTIONS_4D)}")
        if self.static is not None:
            raise UserError("eval 4d fits its own static assets: static= is for `run.py 4d`")

    def grid(self) -> list[tuple[int, int]]:
        return [(c, s) for c in _pick(self.colors, COLOR_NAMES) for s in _pick(self.shapes, SHAPES)]


@dataclass
class TrainJudgeConfig:
    steps: int = option(2500, "optimisation steps (AdamW, one-cycle learning rate)")
    batch_size: int = option(96, "images per step")
    lr: float = option(3e-3, "peak learning rate")
    bank_size: int = option(12000, "ground-truth renders to train on (rendered once, then freshly augmented each step)")
    eval_size: int = option(2048, "fresh held-out renders (seed eval_seed) the reported accuracies are measured on")
    augment: bool = option(True, "blur, noise, colour jitter and small shifts, so generated images are judged fairly")
    seed: int = option(0, "seed of the training renders, the initial weights and every augmentation")
    max_offset: float = option(0.5, "objects moved off-centre by up to this many world units, as the prior sees them")
    p_offset: float = option(0.5, "fraction of the renders moved off-centre")
    eval_seed: int = option(1_000_003, "seed of the held-out renders (keep it different from seed)")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    save_to: Optional[str] = option(JUDGE, "also install the trained judge here (null: only in the run directory)")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "bank_size", "eval_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise UserError(f"lr must be between 0 and 1, got {self.lr}")
        check_seed(self.seed)
        check_seed(self.eval_seed, "eval_seed")
        if self.eval_seed == self.seed:
            raise UserError("eval_seed must differ from seed, or the held-out renders are the training renders")
        if self.save_to is not None and not self.save_to.strip():
            raise UserError("save_to is empty: name a folder, or pass save_to=null")
