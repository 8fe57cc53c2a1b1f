"""Options of `run.py train prior` (torch-free, for a fast --help). The defaults are the full-scale recipe
(one GPU, about an hour); configs/cpu/train_prior.yaml is the 2-CPU-core one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipelines.config import group, option
from pipelines.errors import UserError
from pipelines.options import TrainingOptions


@dataclass
class Architecture:
    """Sizes of the three networks (the shipped prior's; configs/cpu/train_prior.yaml has smaller ones)."""

    image_size: int = option(64, "training image size in pixels")
    vae_channels: tuple[int, ...] = option((32, 64, 128), "VAE block widths; len-1 downsamplings (3 -> factor 4)")
    latent_channels: int = option(4, "VAE latent channels")
    unet_channels: tuple[int, ...] = option((64, 128, 192), "UNet block widths (3 blocks)")
    unet_layers: int = option(1, "UNet resnet layers per block")
    text_width: int = option(128, "text encoder width (= UNet cross-attention width)")
    text_layers: int = option(4, "text encoder transformer layers")
    max_tokens: int = option(16, "tokenizer/text-encoder context length")



@dataclass
class TrainPriorConfig(TrainingOptions):
    arch: Architecture = group(Architecture, "the three networks' sizes (fixed once a run starts)")
    bank_size: int = option(100000, "number of rendered training images (the data bank)")
    vae_steps: int = option(5000, "VAE optimisation steps")
    unet_steps: int = option(40000, "UNet + text-encoder optimisation steps")
    batch_size: int = option(256, "batch size per process")
    vae_lr: float = option(3e-4, "VAE learning rate (AdamW)")
    lr: float = option(3e-4, "UNet and text-encoder learning rate (AdamW)")
    warmup_steps: int = option(500, "linear learning-rate warm-up steps (then cosine decay to 10%)")
    kl_weight: float = option(1e-6, "weight of the VAE's KL term")
    caption_dropout: float = option(0.1, "fraction of captions replaced by '' (for classifier-free guidance)")
    p_drop_view: float = option(0.3, "fraction of captions without the view suffix")
    p_synonym: float = option(0.2, "fraction of captions using a shape synonym (ball, box, ...)")
    max_offset: float = option(0.5, "objects move off-centre by up to this many world units (so videos can move them)")
    p_offset: float = option(0.5, "fraction of the bank's objects moved off-centre (the rest stay centred)")
    init: Optional[str] = option(None, "fine-tune this trained prior (folder or preset): its VAE and tokenizer are "
                                       "kept, only the UNet and text encoder train")
    ema_decay: float = option(0.999, "EMA decay of the UNet and text-encoder weights (0 disables EMA)")
    checkpoint_every: int = option(2000, "save a resumable checkpoint every N steps")
    max_minutes: Optional[float] = option(None, "wall-clock budget; the VAE stage gets 20%, stages stop early")
    fp16_weights: bool = option(True, "save the final weights in fp16 (half the size)")

    def validate(self) -> None:
        super().validate()
        for name in ("bank_size", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("vae_steps", "unet_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.arch.unet_channels) != 3:
            raise UserError("arch.unet_channels must list 3 block widths")
