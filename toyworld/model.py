"""The ToyWorld prior's architecture: a small SD-layout latent-diffusion model.

Ordinary diffusers/transformers classes saved as a diffusers-format folder, so the shipped model is
loaded by exactly the code that loads Stable Diffusion (`pipelines.loading`).

- VAE: AutoencoderKL, 64x64x3 -> 16x16x4 (factor 4).
- Text: a word-level tokenizer over the world's vocabulary (`tokenizers` WordLevel model,
  unknown words -> `<unk>`) and a small CLIPTextModel.
- UNet: UNet2DConditionModel on 16x16x4 latents, cross-attending to the text.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Architecture
from .world import VOCAB

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def build_tokenizer(max_tokens: int = 16):
    """Word-level tokenizer over VOCAB: lowercases, reads "an" as "a" (the captions only say "a"), splits words
    and punctuation, `<unk>` for the rest."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(VOCAB))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\ban\b"), "a")])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_tokens, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_components(arch: Architecture) -> dict:
    """Freshly initialised unet, vae, text_encoder, tokenizer and scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(arch.max_tokens)
    levels = len(arch.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels, sample_size=arch.image_size,
        block_out_channels=arch.vae_channels, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_width, intermediate_size=4 * arch.text_width,
        num_hidden_layers=arch.text_layers, num_attention_heads=4, max_position_embeddings=arch.max_tokens,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=arch.image_size // 2 ** (levels - 1), in_channels=arch.latent_channels,
        out_channels=arch.latent_channels, block_out_channels=arch.unet_channels, layers_per_block=arch.unet_layers,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=arch.text_width, attention_head_dim=32, norm_num_groups=32,
    )
    # SD's training schedule; DDIM is the default sampler stored with the model.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_model(components: dict, path: Path, fp16: bool = True) -> Path:
    """Write a diffusers-format folder (safetensors weights, fp16 by default to keep the repo small)."""
    import diffusers
    import torch

    path.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "requires_safety_checker": False, "safety_checker": [None, None], "feature_extractor": [None, None]}
    for name, module in components.items():
        if name in ("unet", "vae", "text_encoder"):
            dtype = next(module.parameters()).dtype
            module.to(torch.float16 if fp16 else torch.float32)
            module.save_pretrained(path / name, safe_serialization=True)
            module.to(dtype)
        else:
            module.save_pretrained(path / name)
        library = "transformers" if name in ("tokenizer", "text_encoder") else "diffusers"
        # transformers 5 calls its fast-tokenizer class TokenizersBackend; the old name loads on 4.x and 5.x.
        index[name] = [library, "PreTrainedTokenizerFast" if name == "tokenizer" else type(module).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
