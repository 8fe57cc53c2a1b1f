"""Tiny random-weight SD-layout models for fast CPU tests (shapes as in diffusers' own fast tests), and `probe`.

Nothing is downloaded: the CLIP tokenizer is a character-level BPE vocabulary written here, and
every component is saved with `save_pretrained` so tests load it through `model=<path>`, the
same code path as real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (its 256 values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def make_clip_tokenizer(folder: Path, max_length: int = 77):
    """A CLIPTokenizer over single characters (no merges): valid, tiny and offline."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode())
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         pad_token="<|endoftext|>")


def make_components(tmp: Path, prediction_type: str = "epsilon", seed: int = 0, max_length: int = 77) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2,
    )
    tokenizer = make_clip_tokenizer(tmp / "tok", max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=max_length,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": scheduler}


def save_tiny_sd(path: Path, prediction_type: str = "epsilon", seed: int = 0, safe: bool = True) -> Path:
    """Save a tiny SD pipeline folder (model_index.json + 5 components) and return its path."""
    from diffusers import StableDiffusionPipeline

    comps = make_components(path.parent / f".{path.name}-build", prediction_type, seed)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=safe)
    return path


def toyworld_recipe(folder: Path) -> list[str]:
    """`--config FILE` that gives a tiny model folder ToyWorld's 3d recipe (the `3d:` section of its preset,
    configs/models/toyworld.yaml) instead of the published SD recipe (the dataclass defaults) a folder gets."""
    from pipelines import config
    from pipelines.runtime import write_yaml

    path = Path(folder) / "toyworld-3d.yaml"
    write_yaml(path, config.model_defaults("toyworld", "3d"))
    return ["--config", str(path)]


def probe(path) -> dict:
    """Decode a video with PyAV: codec, pixel format, size, frame count and fps."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "width": stream.codec_context.width, "height": stream.codec_context.height,
                "frames": count, "fps": float(stream.average_rate or stream.guessed_rate)}
