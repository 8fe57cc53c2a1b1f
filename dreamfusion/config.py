"""Typed options of the 3D jobs: `python run.py 3d PROMPT` (ThreeDConfig) and `python run.py export RUN_DIR`.

The fit's options are composed from the parts' own option groups (prior, field, cameras, shading,
renderer, guidance, export), so each part validates what it owns and every key stays flat on the
command line: `python run.py 3d "a red cube" steps=500 resolution=64 guidance=50`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipelines.config import option
from pipelines.errors import UserError
from pipelines.options import PriorOptions

from .cameras import CameraConfig
from .export import MESH_FORMATS
from .field import FieldConfig
from .guidance import GuidanceOptions
from .renderer import RenderConfig
from .shading import ShadingConfig


@dataclass
class ExportOptions:
    mesh_resolution: int = option(128, "marching-cubes grid resolution per side")
    iso_level: Optional[float] = option(None, "density iso-level of the mesh (None: automatic, from the rendered opacity)")
    keep_components: int = option(1, "keep this many largest connected mesh components (0 keeps them all)")
    formats: tuple[str, ...] = option(MESH_FORMATS, "mesh files to write: obj, glb, ply")
    turntable_frames: int = option(48, "frames of the 360-degree turntable videos")
    turntable_fps: float = option(12.0, "frames per second of the turntable videos")
    turntable_size: int = option(128, "turntable frame size in pixels")
    turntable_elevation: float = option(15.0, "camera elevation of the turntables, degrees")

    def validate(self) -> None:
        if self.mesh_resolution < 8:
            raise UserError(f"mesh_resolution must be at least 8, got {self.mesh_resolution}")
        if self.keep_components < 0:
            raise UserError(f"keep_components must be >= 0 (0 keeps every component), got {self.keep_components}")
        unknown = [f for f in self.formats if f not in MESH_FORMATS]
        if unknown or not self.formats:
            raise UserError(f"formats must list some of {', '.join(MESH_FORMATS)}, got {list(self.formats)}")
        if self.turntable_frames < 1 or self.turntable_size < 8 or not self.turntable_fps > 0:
            raise UserError("turntable_frames must be >= 1, turntable_size >= 8 and turntable_fps > 0")


@dataclass
class ThreeDConfig(ExportOptions, GuidanceOptions, RenderConfig, ShadingConfig, CameraConfig, FieldConfig, PriorOptions):
    negative: str = option("", "negative prompt (what SDS steers away from)")
    steps: int = option(1500, "optimisation steps")
    batch_size: int = option(4, "cameras (renders) per step")
    resolution: int = option(64, "render resolution in pixels (renders are resized to encode_size for the VAE)")
    lr: float = option(1e-2, "Adam learning rate of the field and background (cosine decay to 10%)")
    warmup_steps: int = option(50, "linear learning-rate warm-up steps")
    refine_steps: int = option(0, "then this many steps that train only the albedo grid (albedo_grid=N), the geometry "
                                  "frozen and every render lit: an appearance stage that paints small marks on the "
                                  "settled surface")
    refine_lr: float = option(0.1, "Adam learning rate of the refine stage (cosine decay to 10%)")
    refine_t_max: float = option(0.5, "largest diffusion time of the refine stage (detail is drawn at low noise)")
    refine_canvas: str = option("fit", "what the refine stage paints on: the fit's albedo (fit), or a plain coat of "
                                       "its median surface colour (plain), which hides the shading the fit baked in")
    orient_weight: float = option(1e-2, "orientation loss weight (DreamFusion: normals must not face away from the camera)")
    orient_ramp: int = option(500, "steps over which the orientation weight ramps up from 0")
    opacity_weight: float = option(0.0, "sparsity: weight of the mean rendered opacity")
    entropy_weight: float = option(1e-3, "weight of the opacity's binary entropy (pushes pixels to empty or solid)")
    normal_smooth_weight: float = option(0.0, "weight of the rendered normal map's total variation over covered pixels "
                                              "(2D normal smoothness, as threestudio's): irons out surface ripples")
    seed: int = option(0, "seed of the field's initialisation and every random draw")
    mixed_precision: str = option("auto", "auto (bf16 on CUDA, none on CPU), no, fp16 or bf16")
    checkpoint_every: int = option(500, "save a resumable checkpoint every N steps (Ctrl-C also saves one)")
    val_every: int = option(250, "write validation renders every N steps (0: never)")
    max_minutes: Optional[float] = option(None, "wall-clock budget of the fit; it stops early, saves and exports")
    resume: Optional[str] = option(None, "a 3d run directory to continue from its last checkpoint (same as --resume)")
    chunk: int = option(16384, "rays rendered at a time outside training (validation, turntables)")

    def validate(self) -> None:
        for group in (PriorOptions, FieldConfig, CameraConfig, ShadingConfig, RenderConfig, GuidanceOptions, ExportOptions):
            group.validate(self)
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if self.resolution < 1:
            raise UserError(f"resolution must be a positive number of pixels, got {self.resolution}")
        if self.batch_size < 1 or self.checkpoint_every < 1 or self.chunk < 1:
            raise UserError("batch_size, checkpoint_every and chunk must be at least 1")
        if self.val_every < 0 or self.orient_ramp < 0 or self.warmup_steps < 0:
            raise UserError("val_every, orient_ramp and warmup_steps must be >= 0")
        weights = (self.orient_weight, self.opacity_weight, self.entropy_weight, self.normal_smooth_weight)
        if min(weights) < 0 or not self.lr > 0:
            raise UserError("loss weights must be >= 0 and lr > 0")
        if self.refine_steps < 0 or not self.refine_lr > 0:
            raise UserError(f"refine_steps must be >= 0 and refine_lr > 0, got {self.refine_steps}, {self.refine_lr}")
        if not self.t_min < self.refine_t_max <= 1:
            raise UserError(f"refine_t_max must be in (t_min, 1], got {self.refine_t_max}")
        if self.refine_canvas not in ("fit", "plain"):
            raise UserError(f"refine_canvas must be fit or plain, got '{self.refine_canvas}'")
        if self.refine_steps and not self.albedo_grid:
            raise UserError("refine_steps trains the albedo grid alone: give it one too, e.g. albedo_grid=32")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise UserError(f"mixed_precision must be auto, no, fp16 or bf16, got '{self.mixed_precision}'")


@dataclass
class ExportConfig(ExportOptions):
    """`python run.py export RUN_DIR`: the run's field, exported again with these settings."""

    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
