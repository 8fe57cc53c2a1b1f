"""Options every job shares (`model=sd15 steps=20 seed=3`), and the image job's. Torch-free, for a fast --help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import check_choices, option
from .errors import UserError
from .schedulers import BETA_SCHEDULES, SAMPLERS

MAX_SEED = 2**63 - 1


def check_seed(seed: int, name: str = "seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{name} must be between 0 and 2**63 - 1, got {seed}")


DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}  # our names -> torch's


@dataclass
class PriorOptions:
    """Which prior to load, and where to run it."""

    model: str = option("toyworld", "model preset (configs/models/), local diffusers folder, or hub id")
    revision: Optional[str] = option(None, "hub revision (branch, tag or commit) when model is a hub id")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    dtype: str = option("auto", choices=("auto", *DTYPES), help="auto (bf16 on capable GPUs, fp32 on CPU), fp32, fp16 or bf16")
    allow_pickle: bool = option(False, "allow .bin/.ckpt/.pt pickle weights (loaded with weights_only)")
    beta_schedule: Optional[str] = option(None, choices=BETA_SCHEDULES, help="noise schedule override: linear, scaled_linear or cosine (default: the model's)")
    fuse_qkv: bool = option(True, "fuse each attention's q, k and v projections into one matmul (fast path; false: off)")
    channels_last: Optional[bool] = option(None, "UNet and VAE in channels_last memory format (fast path; default: on CUDA)")
    compile: bool = option(False, "torch.compile the UNet for static shapes (fast path on GPU; the first run compiles, "
                                  "later ones reuse ~/.cache/text2world/inductor)")
    cuda_graphs: bool = option(False, "with compile=true on CUDA, replay the compiled UNet as CUDA graphs (torch.compile's "
                                      "reduce-overhead mode: less launch overhead at fixed shapes, more memory held)")

    def validate(self) -> None:
        check_choices(self)
        if not self.model.strip():
            raise UserError("model is empty: name a preset, a local folder or a hub id")
        if self.cuda_graphs and not self.compile:
            raise UserError("cuda_graphs=true replays the compiled UNet, so it needs compile=true as well")


@dataclass
class SamplingOptions(PriorOptions):
    """How to sample from the prior: shared by the image and video jobs."""

    negative: str = option("", "negative prompt (what to steer away from)")
    sampler: str = option("ddim", choices=SAMPLERS, help=f"sampler: {', '.join(SAMPLERS)}")
    steps: int = option(25, "number of denoising steps")
    guidance: float = option(7.5, "classifier-free guidance scale (1 disables guidance)")
    seed: int = option(0, "random seed; the same seed and config give the same output")
    height: Optional[int] = option(None, "output height in pixels (default: the model's native size)")
    width: Optional[int] = option(None, "output width in pixels (default: the model's native size)")
    decode_chunk: int = option(8, "images the VAE decodes at a time (lower it to save memory)")

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        check_seed(self.seed)
        if not self.guidance >= 0 or self.guidance == float("inf"):
            raise UserError(f"guidance must be a finite number >= 0, got {self.guidance}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be a positive number of pixels, got {value}")
        if self.decode_chunk < 1:
            raise UserError(f"decode_chunk must be at least 1, got {self.decode_chunk}")

    def check_model(self, prior) -> tuple[int, int]:
        """What can only be checked against the loaded model, before anything is written: the size (returned)
        and the number of steps the sampler can lay out on the model's schedule."""
        from .schedulers import check_steps

        check_steps(self.sampler, prior.noise_config, self.steps)
        return self.image_size(prior.default_size, prior.vae_scale_factor)

    def image_size(self, native: int, factor: int) -> tuple[int, int]:
        """(height, width), defaulting to the model's native size; both must be multiples of the VAE factor."""
        height, width = self.height or native, self.width or native
        for name, value in (("height", height), ("width", width)):
            if value % factor:
                lower, upper = value // factor * factor, (value // factor + 1) * factor
                raise UserError(f"{name}={value} is not a multiple of the VAE factor {factor}; "
                                f"use {lower or upper} or {upper}")
        return height, width


@dataclass
class ImageConfig(SamplingOptions):
    num_images: int = option(1, "images per prompt, generated in one batch")

    def validate(self) -> None:
        super().validate()
        if self.num_images < 1:
            raise UserError(f"num_images must be at least 1, got {self.num_images}")


@dataclass
class TrainingOptions:
    """Options every trainer shares: precision, accumulation, checkpoints, budget, seed, device, outputs."""

    mixed_precision: str = option("auto", choices=("auto", "no", "fp16", "bf16"), help="auto (bf16 on CUDA, none on CPU), no, fp16 or bf16")
    grad_accum: int = option(1, "gradient accumulation steps")
    checkpoint_every: int = option(1000, "save a resumable checkpoint every N steps")
    max_minutes: Optional[float] = option(None, "wall-clock budget; training stops early and saves")
    seed: int = option(0, "seed for the data and every random draw")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda or cuda:N; `accelerate launch` sets the GPU per process")
    resume: Optional[str] = option(None, "a train run directory to continue from its last checkpoint")
    save_to: Optional[str] = option(None, "also install the trained folder here (e.g. models/toyworld)")

    def validate(self) -> None:
        check_choices(self)
        for name in ("grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_seed(self.seed)
