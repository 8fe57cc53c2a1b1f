"""Options of `run.py 3d` and `run.py export`, one group per part (torch-free, for a fast --help).

`python run.py 3d "a red cube" steps=500 field.encoding=hashgrid guidance.scale=50 export.mesh_resolution=96`.
The defaults are the published SDS recipe (DreamFusion, threestudio's dreamfusion-sd, stable-dreamfusion)
that a real prior gets; ToyWorld's recipe is the `3d:` section of configs/models/toyworld.yaml.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from pipelines.config import check_choices, group, option
from pipelines.errors import UserError
from pipelines.options import PriorOptions, check_seed

ENCODINGS = ("frequency", "hashgrid")
DENSITY_ACTIVATIONS = ("softplus", "exp")
BACKGROUNDS = ("mlp", "fixed", "random")
NORMALS = ("autograd", "finite_difference")
RENDERERS = ("auto", "batched", "nerfacc")
WEIGHTINGS = ("sds", "uniform", "snr")
MESH_FORMATS = ("obj", "glb", "ply")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


def _range(name: str, lo_hi: tuple[float, ...]) -> None:
    if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
        raise UserError(f"{name} must be [low, high] with low <= high, got {list(lo_hi)}")


@dataclass
class FieldConfig:
    """The NeRF field (density and albedo at points) and its background."""

    bound: float = option(1.0, "the field lives in the cube [-bound, bound]^3 (density 0 outside)")
    encoding: str = option("hashgrid", choices=ENCODINGS, help="point encoding: frequency (NeRF positional) or hashgrid (Instant-NGP)")
    frequencies: int = option(6, "frequency encoding: number of octaves (sin/cos of 2^k pi x)")
    frequency_anneal: float = option(0.0, "frequency encoding: open the octaves coarse to fine over this fraction "
                                          "of the steps (BARF / threestudio's progressive band); 0 opens all at once")
    hash_levels: int = option(12, "hashgrid: number of resolution levels")
    hash_features: int = option(2, "hashgrid: features per level")
    hash_log2_size: int = option(15, "hashgrid: log2 of the hash table size per level")
    hash_base_resolution: int = option(8, "hashgrid: coarsest grid resolution")
    hash_max_resolution: int = option(256, "hashgrid: finest grid resolution")
    hidden: int = option(64, "width of the trunk MLP")
    layers: int = option(2, "hidden layers of the trunk MLP")
    albedo_network: str = option("separate", choices=("shared", "separate"), help="albedo from the density trunk (shared), or from an MLP of its own on "
                                             "the same encoding (separate: threestudio's density and feature networks)")
    blob_density: float = option(10.0, "Magic3D density blob: peak added to the raw density at the centre")
    blob_radius: float = option(0.5, "Magic3D density blob: radius where the added density crosses 0")
    density_activation: str = option("softplus", choices=DENSITY_ACTIVATIONS, help="softplus, or exp (truncated exp with clamped gradient)")
    normals: str = option("autograd", choices=NORMALS, help="normals from the density gradient: autograd (exact) or finite_difference")
    normal_eps: float = option(0.01, "finite_difference normals: stencil size in world units")
    background: str = option("mlp", choices=BACKGROUNDS, help="mlp (environment MLP over ray direction), fixed (grey) or random (per call)")
    background_color: float = option(0.92, "grey level of the fixed background (and of random at eval)")

    def validate(self) -> None:
        check_choices(self, "field.")
        if not self.bound > 0:
            raise UserError(f"field.bound must be positive, got {self.bound}")
        if not self.normal_eps > 0:
            raise UserError(f"field.normal_eps must be positive, got {self.normal_eps}")
        for name in ("hash_levels", "hash_features", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise UserError(f"field.{name} must be at least 1, got {getattr(self, name)}")
        if self.frequencies < 0:
            raise UserError(f"field.frequencies must be >= 0, got {self.frequencies}")
        if not 0 <= self.frequency_anneal <= 1:
            raise UserError(f"field.frequency_anneal must be a fraction of the steps in [0, 1], got {self.frequency_anneal}")
        if not 4 <= self.hash_log2_size <= 24:
            raise UserError(f"field.hash_log2_size must be between 4 and 24, got {self.hash_log2_size}")
        if not 2 <= self.hash_base_resolution <= self.hash_max_resolution:
            raise UserError("field hash resolutions must satisfy 2 <= hash_base_resolution <= hash_max_resolution, "
                            f"got {self.hash_base_resolution} and {self.hash_max_resolution}")
        if self.blob_density < 0 or not self.blob_radius > 0:
            raise UserError(f"field.blob_density must be >= 0 and blob_radius > 0, got {self.blob_density}, {self.blob_radius}")
        if not 0 <= self.background_color <= 1:
            raise UserError(f"field.background_color must be in [0, 1], got {self.background_color}")


@dataclass
class CameraConfig:
    """How training cameras are sampled (DreamFusion A.2, threestudio's jitters) and which view word each gets."""

    elevation_range: tuple[float, float] = option((-10.0, 80.0), "elevation range in degrees (uniform)")
    azimuth_range: tuple[float, float] = option((-180.0, 180.0), "azimuth range in degrees (uniform; 0 = front)")
    distance_range: tuple[float, float] = option((1.5, 2.0), "camera distance range to the origin (uniform)")
    fov_range: tuple[float, float] = option((40.0, 70.0), "full field of view range in degrees (uniform)")
    center_jitter: float = option(0.2, "std of the look-at point jitter (world units)")
    position_jitter: float = option(0.1, "std of the camera position jitter (world units)")
    up_jitter: float = option(0.02, "std of the up-vector jitter")
    front_threshold: float = option(45.0, "view prompts: 'front' within this many degrees of azimuth 0")
    back_threshold: float = option(45.0, "view prompts: 'back' within this many degrees of azimuth 180")
    overhead_threshold: float = option(60.0, "view prompts: 'overhead' above this elevation in degrees")

    def validate(self) -> None:
        for name in ("elevation_range", "azimuth_range", "distance_range", "fov_range"):
            _range(f"camera.{name}", getattr(self, name))
        if not (-90 < self.elevation_range[0] and self.elevation_range[1] < 90):
            raise UserError(f"camera.elevation_range must lie strictly inside (-90, 90), got {list(self.elevation_range)}")
        if not self.distance_range[0] > 0:
            raise UserError(f"camera.distance_range must be positive, got {list(self.distance_range)}")
        if not (0 < self.fov_range[0] and self.fov_range[1] < 180):
            raise UserError(f"camera.fov_range must lie strictly inside (0, 180), got {list(self.fov_range)}")
        for name in ("center_jitter", "position_jitter", "up_jitter"):
            if getattr(self, name) < 0:
                raise UserError(f"camera.{name} must be >= 0, got {getattr(self, name)}")
        if min(self.front_threshold, self.back_threshold) < 0 or self.front_threshold + self.back_threshold > 180:
            raise UserError("camera.front_threshold and back_threshold must be >= 0 and add up to at most 180, "
                            f"got {self.front_threshold} and {self.back_threshold}")
        if not -90 <= self.overhead_threshold <= 90:
            raise UserError(f"camera.overhead_threshold must be in [-90, 90], got {self.overhead_threshold}")


@dataclass
class ShadingConfig:
    """DreamFusion's random shading in training: albedo, Lambertian or textureless, under a light near the camera."""

    albedo_prob: float = option(0.2, "after warm-up, probability of an albedo-only render")
    textureless_prob: float = option(0.5, "probability of white albedo, given the render is not albedo-only")
    ambient: float = option(0.1, "ambient light intensity")
    diffuse: float = option(0.9, "diffuse (Lambertian) light intensity")
    ambient_only_steps: int = option(1000, "warm-up steps that render albedo only")
    light_distance_range: tuple[float, float] = option((0.8, 1.5), "light distance, in units of camera distance")
    light_jitter: float = option(0.3, "std of the light direction's jitter around the camera direction")
    light_offset: tuple[float, float] = option((0.0, 0.0), "light direction = camera direction + up * u + right * r, "
                                                           "for (u, r); ToyWorld's renders are lit from [0.6, -0.4]")

    def validate(self) -> None:
        for name in ("albedo_prob", "textureless_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"shading.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.ambient < 0 or self.diffuse < 0:
            raise UserError(f"shading.ambient and diffuse must be >= 0, got {self.ambient} and {self.diffuse}")
        if self.ambient_only_steps < 0:
            raise UserError(f"shading.ambient_only_steps must be >= 0, got {self.ambient_only_steps}")
        lo_hi = self.light_distance_range
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise UserError(f"shading.light_distance_range must be [low, high] with 0 < low <= high, got {list(lo_hi)}")
        if self.light_jitter < 0:
            raise UserError(f"shading.light_jitter must be >= 0, got {self.light_jitter}")
        if len(self.light_offset) != 2:
            raise UserError(f"shading.light_offset must be [up, right], got {list(self.light_offset)}")


@dataclass
class RenderConfig:
    """How rays are sampled and composited: nerfacc on CUDA, the batched renderer elsewhere; both skip the empty cells
    of an occupancy grid."""

    resolution: int = option(64, "training render size in pixels (renders are resized to guidance.encode_size)")
    samples_per_ray: int = option(64, "batched renderer: samples per ray inside the cube")
    stratified: bool = option(True, "jitter sample positions in training (never at evaluation)")
    grid_resolution: int = option(64, "occupancy grid cells per axis (both renderers: nerfacc's and the batched one's)")
    grid_update_every: int = option(16, "refresh the occupancy grid every this many training steps (both renderers)")
    occupancy_threshold: float = option(0.01, "a grid cell is occupied when density * step exceeds this (0: wherever "
                                              "the density is above 0; both renderers)")
    alpha_threshold: float = option(0.0, "skip samples whose alpha is below this (0 keeps all)")
    render_step_size: Optional[float] = option(None, "nerfacc: marching step (default 2 sqrt(3) bound / samples_per_ray)")
    renderer: str = option("auto", choices=RENDERERS, help="auto (nerfacc on CUDA, batched otherwise), batched or nerfacc")
    chunk: int = option(16384, "rays rendered at a time outside training (validation, turntables)")

    def validate(self) -> None:
        check_choices(self, "render.")
        for name in ("resolution", "samples_per_ray", "grid_resolution", "grid_update_every", "chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"render.{name} must be at least 1, got {getattr(self, name)}")
        if self.occupancy_threshold < 0:
            raise UserError(f"render.occupancy_threshold must be >= 0, got {self.occupancy_threshold}")
        if not 0 <= self.alpha_threshold < 1:
            raise UserError(f"render.alpha_threshold must be in [0, 1), got {self.alpha_threshold}")
        if self.render_step_size is not None and not self.render_step_size > 0:
            raise UserError(f"render.render_step_size must be positive, got {self.render_step_size}")

    def step_size(self, bound: float) -> float:
        """nerfacc's marching step: the cube's diagonal split into samples_per_ray steps by default."""
        return self.render_step_size or 2 * math.sqrt(3) * bound / self.samples_per_ray


@dataclass
class GuidanceConfig:
    """Score distillation from the prior (DreamFusion eq. 3), with optional Perp-Neg."""

    scale: float = option(100.0, "classifier-free guidance scale of SDS (DreamFusion uses 100)")
    t_min: float = option(0.02, "smallest diffusion time sampled, as a fraction of the training steps")
    t_max: float = option(0.98, "largest diffusion time sampled at the start")
    t_max_end: Optional[float] = option(0.5, "anneal the largest time linearly to this by the last step (null: no annealing)")
    weighting: str = option("sds", choices=WEIGHTINGS, help="w(t): sds (1 - alpha_bar, DreamFusion), uniform, or snr (sqrt(alpha_bar) * sigma)")
    encode_size: Optional[int] = option(512, "renders are resized to this before the VAE encode (null: the prior's "
                                             "native size)")
    perp_neg: bool = option(False, "Perp-Neg: the other views' prompts as perpendicular negatives (against Janus faces)")
    perp_neg_weight: float = option(1.0, "weight of each Perp-Neg negative direction")

    def validate(self) -> None:
        check_choices(self, "guidance.")
        if not self.scale >= 0 or self.scale == float("inf"):
            raise UserError(f"guidance.scale must be a finite number >= 0, got {self.scale}")
        t_end = self.t_max if self.t_max_end is None else self.t_max_end
        if not 0 <= self.t_min < min(self.t_max, t_end) <= 1 or max(self.t_max, t_end) > 1:
            raise UserError(f"need 0 <= guidance.t_min < t_max (and t_max_end) <= 1, got t_min={self.t_min}, "
                            f"t_max={self.t_max}, t_max_end={self.t_max_end}")
        if self.encode_size is not None and self.encode_size < 8:
            raise UserError(f"guidance.encode_size must be at least 8 pixels, got {self.encode_size}")


@dataclass
class LossConfig:
    """Regularisers added to the SDS loss."""

    orient: float = option(10.0, "orientation loss weight (DreamFusion: visible normals must not face away)")
    orient_ramp: int = option(5000, "steps over which the orientation weight ramps up from 0")
    opacity: float = option(0.0, "sparsity: weight of the mean rendered opacity")
    entropy: float = option(1e-3, "weight of the opacity's binary entropy (pushes pixels to empty or solid)")

    def validate(self) -> None:
        if min(self.orient, self.opacity, self.entropy) < 0 or self.orient_ramp < 0:
            raise UserError("loss weights and loss.orient_ramp must be >= 0")


@dataclass
class ExportOptions:
    """The mesh (marching cubes at an iso-level) and the turntable videos."""

    mesh_resolution: int = option(256, "marching-cubes grid resolution per side")
    iso_level: Optional[float] = option(None, "density iso-level of the mesh (null: automatic, from the rendered opacity)")
    keep_components: int = option(1, "keep this many largest connected mesh components (0 keeps them all)")
    formats: tuple[str, ...] = option(MESH_FORMATS, choices=MESH_FORMATS, help="mesh files to write: obj, glb, ply")
    turntable_frames: int = option(48, "frames of the 360-degree turntable videos")
    turntable_fps: float = option(12.0, "frames per second of the turntable videos")
    turntable_size: int = option(256, "turntable frame size in pixels")
    turntable_elevation: float = option(15.0, "camera elevation of the turntables, degrees")

    def validate(self) -> None:
        check_choices(self, "export.")
        if self.mesh_resolution < 8:
            raise UserError(f"export.mesh_resolution must be at least 8, got {self.mesh_resolution}")
        if self.keep_components < 0:
            raise UserError(f"export.keep_components must be >= 0 (0 keeps every component), got {self.keep_components}")
        if not self.formats:
            raise UserError(f"export.formats must list some of {', '.join(MESH_FORMATS)}, got {list(self.formats)}")
        if self.turntable_frames < 1 or self.turntable_size < 8 or not self.turntable_fps > 0:
            raise UserError("export.turntable_frames must be >= 1, turntable_size >= 8 and turntable_fps > 0")


@dataclass
class ThreeDConfig(PriorOptions):
    negative: str = option("", "negative prompt (what SDS steers away from)")
    seed: int = option(0, "seed of the field's initialisation and every random draw")
    steps: int = option(10000, "optimisation steps")
    batch_size: int = option(1, "cameras (renders) per step")
    lr: float = option(1e-2, "Adam learning rate of the field and background (cosine decay to 10%)")
    warmup_steps: int = option(50, "linear learning-rate warm-up steps")
    mixed_precision: str = option("auto", choices=MIXED_PRECISION, help="auto (bf16 on CUDA, none on CPU), no, fp16 or bf16")
    checkpoint_every: int = option(500, "save a resumable checkpoint every N steps (Ctrl-C also saves one)")
    val_every: int = option(250, "write validation renders every N steps (0: never)")
    max_minutes: Optional[float] = option(None, "wall-clock budget of the fit; it stops early, saves and exports")
    resume: Optional[str] = option(None, "a 3d run directory to continue from its last checkpoint (same as --resume)")
    field: FieldConfig = group(FieldConfig, "the NeRF field and its background")
    camera: CameraConfig = group(CameraConfig, "training cameras and view prompts")
    shading: ShadingConfig = group(ShadingConfig, "random shading in training")
    render: RenderConfig = group(RenderConfig, "volume rendering")
    guidance: GuidanceConfig = group(GuidanceConfig, "score distillation")
    loss: LossConfig = group(LossConfig, "regularisers")
    export: ExportOptions = group(ExportOptions, "mesh and turntables")

    def validate(self) -> None:
        super().validate()
        for part in (self.field, self.camera, self.shading, self.render, self.guidance, self.loss, self.export):
            part.validate()
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.val_every < 0 or self.warmup_steps < 0 or not self.lr > 0:
            raise UserError("val_every and warmup_steps must be >= 0 and lr > 0")
        check_seed(self.seed)


# Options that may differ when a run resumes: they change what is written or how fast, not the optimisation.
RESUME_FREE = ("val_every", "checkpoint_every", "max_minutes", "render.chunk", "resume", "device", "fuse_qkv",
               "channels_last", "compile", "cuda_graphs")


def resume_free(key: str) -> bool:
    return key in RESUME_FREE or key.startswith("export.")


def _the_runs(name: str):
    """An export option that keeps the run's own value unless given (ExportOptions' help, its own default None)."""
    meta = ExportOptions.__dataclass_fields__[name].metadata
    return option(None, meta["help"] + " (default: the run's)", choices=meta.get("choices"))


@dataclass
class ExportConfig:
    """`python run.py export RUN_DIR`: the run's field exported again; options not given keep the run's values."""

    mesh_resolution: Optional[int] = _the_runs("mesh_resolution")
    iso_level: Optional[float] = _the_runs("iso_level")
    keep_components: Optional[int] = _the_runs("keep_components")
    formats: Optional[tuple[str, ...]] = _the_runs("formats")
    turntable_frames: Optional[int] = _the_runs("turntable_frames")
    turntable_fps: Optional[float] = _the_runs("turntable_fps")
    turntable_size: Optional[int] = _the_runs("turntable_size")
    turntable_elevation: Optional[float] = _the_runs("turntable_elevation")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")

    def chosen(self) -> dict:
        """The export options given (dotted keys of ThreeDConfig)."""
        return {f"export.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "device" and getattr(self, f.name) is not None}
