"""The shared text-to-image latent-diffusion prior: the only door to the denoiser.

    text = prior.encode_prompt(["a red cube"], negative="")       # or prior.tokenize / prior.embed
    eps  = prior.predict_noise(x_t, t, text, 7.5, denoiser=None)  # CFG in one batched call; always epsilon
    x_t  = prior.add_noise(x0, noise, t); target = prior.training_target(x0, noise, t)  # eps, v or x0
    z    = prior.encode_images(images);   images = prior.decode_latents(z)              # chunked VAE

Only this module knows tokenizers, text encoders, VAEs, noise schedules, prediction types and
guidance. A video job passes its inflated UNet as `denoiser`; nothing swaps modules inside the prior.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .loading import check_folder, content_hash, load_components, resolve_model
from .runtime import cache_dir
from .schedulers import beta_schedule_config

logger = logging.getLogger(__name__)


def compile_cache_dir() -> Path:
    """Where torch.compile keeps generated kernels between runs (TORCHINDUCTOR_CACHE_DIR wins if set)."""
    return cache_dir() / "inductor"


def _torch_cache_dir() -> str | None:
    """Inductor's default cache folder (under /tmp), which it writes into the environment on first use."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: only an unset variable is ours to set
        return None
    return default_cache_dir()


@dataclass
class Conditioning:
    """Text embeddings for a batch: `cond` for the prompts, `uncond` for the negative prompts. (B, L, D).

    `cond_words`/`uncond_words`, when asked for, are the text encoder's first hidden states (token plus
    position embeddings, before any contextual layer): every word is still there, even one the encoder's
    later layers learned to ignore because the images it was trained on never depended on it (the
    ToyWorld encoder's "left" and "right"). Video UNets whose temporal layers read them get them."""

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_words: torch.Tensor | None = None
    uncond_words: torch.Tensor | None = None

    def repeat(self, n: int) -> "Conditioning":
        """Each prompt n times in a row (like diffusers' num_images_per_prompt)."""
        rep = lambda x: None if x is None else x.repeat_interleave(n, 0)  # noqa: E731
        return Conditioning(rep(self.cond), rep(self.uncond), rep(self.cond_words), rep(self.uncond_words))


def tokenize(tokenizer, texts: list[str]):
    """The tokenizer's encoding of `texts` as the text encoder was trained: padded to its length, truncated."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


class NoiseSchedule:
    """The training noise schedule of a diffusers scheduler config: alpha_bar(t), noising, targets."""

    def __init__(self, noise_config: dict, device: torch.device | str = "cpu"):
        from diffusers import DDPMScheduler

        self.noise_config, self.device = dict(noise_config), torch.device(device)
        self.prediction_type = self.noise_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"unsupported prediction_type '{self.prediction_type}' in the model's scheduler config")
        # alpha_bar(t) for integer t, interpolated for fractional t (Euler)
        self.alphas_cumprod = DDPMScheduler.from_config(self.noise_config).alphas_cumprod.to(device, torch.float32)
        self.num_train_timesteps = len(self.alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor | float | int, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), shaped to broadcast over an `ndim`-D batch."""
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        abar = self.alphas_cumprod[lo] * (1 - w) + self.alphas_cumprod[hi] * w
        abar = abar.reshape(abar.shape + (1,) * (ndim - abar.ndim)) if abar.ndim else abar
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Forward process q(x_t | x_0) (Ho et al. 2020, eq. 4)."""
        a, s = self.alpha_sigma(t, x0.ndim)
        return a * x0 + s * noise

    def to_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t.ndim)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t.ndim)
        return (x_t - a * x0) / s

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """v = a*eps - s*x0 (Salimans & Ho 2022), so eps = s*x_t + a*v."""
        a, s = self.alpha_sigma(t, x_t.ndim)
        return s * x_t + a * v

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the denoiser learns to output for x_t = add_noise(x0, noise, t): epsilon, v = a*eps - s*x0
        (Salimans & Ho 2022) or x0, as the model's scheduler config says."""
        if self.prediction_type == "v_prediction":
            a, s = self.alpha_sigma(t, x0.ndim)
            return a * noise - s * x0
        return x0 if self.prediction_type == "sample" else noise

    def eps_error_factor(self) -> torch.Tensor:
        """Per training timestep, what a squared error in the training target is worth in epsilon: 1 for epsilon,
        alpha_bar for v (eps = s x_t + a v), alpha_bar / (1 - alpha_bar) for x0 (eps = (x_t - a x0) / s)."""
        abar = self.alphas_cumprod
        return {"epsilon": torch.ones_like(abar), "v_prediction": abar, "sample": abar / (1 - abar)}[self.prediction_type]

    def to_eps(self, x_t: torch.Tensor, out: torch.Tensor, t) -> torch.Tensor:
        """The denoiser's output, whatever it predicts, as epsilon."""
        if self.prediction_type == "v_prediction":
            return self.eps_from_v(x_t, out, t)
        if self.prediction_type == "sample":
            return self.eps_from_x0(x_t, out, t)
        return out


class Prior(NoiseSchedule):
    def __init__(self, components: dict, device: torch.device, dtype: torch.dtype,
                 beta_schedule: str | None = None, model_id: str = "", path: Path | None = None):
        self.device, self.dtype = device, dtype
        self.model_id, self.path = model_id, path
        self.tokenizer = components["tokenizer"]
        self.text_encoder = components["text_encoder"].to(device, dtype).eval().requires_grad_(False)
        self.unet = components["unet"].to(device, dtype).eval().requires_grad_(False)
        self.vae = components["vae"].to(device, dtype).eval().requires_grad_(False)
        super().__init__(beta_schedule_config(components["scheduler"].config, beta_schedule), device)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet.config.in_channels
        self.scaling_factor = self.vae.config.scaling_factor
        self.shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        allow_pickle: bool = False, beta_schedule: str | None = None,
                        revision: str | None = None) -> "Prior":
        """Load any diffusers-format text-to-image folder, preset name or hub id."""
        model_id, path = resolve_model(model, revision)
        index = check_folder(path, allow_pickle)
        components = load_components(path, index, allow_pickle)
        return cls(components, torch.device(device), dtype, beta_schedule, model_id, path)

    @classmethod
    def from_options(cls, cfg, device: torch.device | None = None, speed_up: bool = True) -> "Prior":
        """The prior a job's `PriorOptions` name, on `device` (default: cfg.device) in cfg.dtype, with the
        fast path those options switch on (`speed_up`; a job that wraps the UNet first calls it itself)."""
        from .runtime import pick_device, pick_dtype

        device = pick_device(cfg.device) if device is None else device
        prior = cls.from_pretrained(cfg.model, device, pick_dtype(cfg.dtype, device), cfg.allow_pickle,
                                    cfg.beta_schedule, cfg.revision)
        return prior.speed_up(cfg.fuse_qkv, cfg.channels_last, cfg.compile, cfg.cuda_graphs) if speed_up else prior

    def speed_up(self, fuse_qkv: bool = True, channels_last: bool | None = None, compile: bool = False,
                 cuda_graphs: bool = False, denoiser: torch.nn.Module | None = None) -> "Prior":
        """The fast path, the same maths, on the VAE and `denoiser` (default: the prior's UNet; a video UNet
        shares the prior's spatial layers): one q/k/v matmul per diffusers attention, channels_last
        convolutions (default: on CUDA), and with `compile` the denoiser compiled in place for static
        shapes, its kernels cached on disk (`compile_cache_dir`); `cuda_graphs` replays them as CUDA graphs
        (torch.compile's reduce-overhead mode)."""
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

        denoiser = self.unet if denoiser is None else denoiser
        for module in (denoiser, self.vae):
            if fuse_qkv:
                for attn in module.modules():
                    if isinstance(attn, Attention) and type(attn.processor) is AttnProcessor2_0:
                        attn.fuse_projections()
                        attn.set_processor(FusedAttnProcessor2_0())
            if channels_last if channels_last is not None else self.device.type == "cuda":
                module.to(memory_format=torch.channels_last)
        if compile:
            if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _torch_cache_dir()):  # unset, or torch's own /tmp one
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
            mode = "reduce-overhead" if cuda_graphs and self.device.type == "cuda" else None
            denoiser.compile(dynamic=False, mode=mode)
        return self

    def content_hash(self) -> str:
        return content_hash(self.path) if self.path is not None else ""

    @property
    def default_size(self) -> int:
        """The resolution the model was trained at (UNet sample size times the VAE factor)."""
        size = self.unet.config.sample_size
        return (size[0] if isinstance(size, (list, tuple)) else size) * self.vae_scale_factor

    # ------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str, negative: list[str] | str | None = None,
                      words: bool = False) -> Conditioning:
        """Embed prompts and negative prompts (default: the empty prompt) as the model was trained;
        `words` also returns the word embeddings (for video UNets, see `Conditioning`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = negative or ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise UserError(f"got {len(negative)} negative prompts for {len(prompts)} prompts")
        (cond, cond_words), (uncond, uncond_words) = self._embed(prompts, True, words), self._embed(negative, False, words)
        return Conditioning(cond, uncond, cond_words, uncond_words)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (B, L), padded and truncated to the text encoder's length, on the CPU."""
        return tokenize(self.tokenizer, texts).input_ids

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
              words: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids -> the encoder's last hidden states (what the UNet cross-attends to) and, with
        `words`, its first hidden states (token + position embeddings; see `Conditioning`)."""
        out = self.text_encoder(ids.to(self.device), attention_mask=mask, output_hidden_states=words)
        return out[0], (out.hidden_states[0] if words else None)

    def _embed(self, texts: list[str], warn: bool, words: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = tokenize(self.tokenizer, texts)
        if warn:
            self._warn_truncated(texts, inputs.input_ids)
            self._warn_unknown_words(texts)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(self.device)
        states, word_states = self.embed(inputs.input_ids, mask, words)
        return states.to(self.dtype), (None if word_states is None else word_states.to(self.dtype))

    def _warn_truncated(self, texts: list[str], ids: torch.Tensor) -> None:
        full = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] <= ids.shape[-1]:
            return
        for row in full[:, self.tokenizer.model_max_length - 1 : -1]:
            cut = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            if cut:
                logger.warning("prompt longer than %d tokens was truncated; dropped: %r",
                               self.tokenizer.model_max_length, cut)

    def _warn_unknown_words(self, texts: list[str]) -> None:
        """Closed-vocabulary tokenizers (the embedded ToyWorld model) map unknown words to <unk>: say which."""
        unk = self.tokenizer.unk_token
        if unk is None or unk not in self.tokenizer.get_vocab():
            return
        words = {w for text in texts for w in text.replace(",", " ").split()}
        unknown = sorted(w for w in words if unk in self.tokenizer.tokenize(w))
        if not unknown:
            return
        vocab = sorted(w for w in self.tokenizer.get_vocab() if w.isalnum() and w not in self.tokenizer.all_special_tokens)
        known = f" It knows: {', '.join(vocab)}." if len(vocab) <= 300 else ""
        logger.warning("the model %s does not know the word(s) %s; they are ignored.%s For open-vocabulary prompts "
                       "use a real checkpoint: model=sd15, model=sd21-base or model=PATH to a diffusers folder.",
                       self.model_id or "", ", ".join(repr(w) for w in unknown), known)

    # ----------------------------------------------------------------------------------------- UNet
    def predict_noise(self, x_t: torch.Tensor, t, text: Conditioning, guidance: float,
                      denoiser: torch.nn.Module | None = None, **unet_kwargs) -> torch.Tensor:
        """Guided epsilon eps_u + guidance (eps_c - eps_u), both halves in one call of `denoiser` (default: the
        prior's UNet; a video UNet takes (b, c, f, h, w)). guidance 1 runs the conditional half alone.
        `t` is a scalar or one timestep per sample; returns float32."""
        denoiser = self.unet if denoiser is None else denoiser
        cfg = guidance != 1.0
        x_in = torch.cat([x_t, x_t]) if cfg else x_t
        emb = torch.cat([text.uncond, text.cond]) if cfg else text.cond
        t = torch.as_tensor(t, device=self.device)
        t_in = torch.cat([t, t]) if cfg and t.ndim == 1 else t
        if text.cond_words is not None:  # a video UNet whose temporal layers read the word embeddings
            unet_kwargs["words"] = torch.cat([text.uncond_words, text.cond_words]) if cfg else text.cond_words
        out = denoiser(x_in.to(self.dtype), t_in, encoder_hidden_states=emb, **unet_kwargs).sample.float()
        out = self.to_eps(x_in.float(), out, t_in)
        if not cfg:
            return out
        eps_uncond, eps_cond = out.chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    # ------------------------------------------------------------------------------------------ VAE
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      chunk: int = 8, sample: bool = True) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> scaled latents (B, C, H/f, W/f), `chunk` images at a time."""
        out = []
        for x in images.split(chunk):
            dist = self.vae.encode((x * 2 - 1).to(self.device, self.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            out.append((z.float() - self.shift_factor) * self.scaling_factor)
        return torch.cat(out)

    def decode_latents(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images in [0, 1], (B, 3, h*f, w*f), float32."""
        out = []
        for z in latents.split(chunk):
            z = z.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
            out.append((self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)
