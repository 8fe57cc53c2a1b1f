"""Temporal layers that inflate the prior's 2D UNet into a video UNet (Make-A-Video, Singer et al. 2022).

After every ResnetBlock2D a pseudo-3D convolution over frames, after every Transformer2DModel a temporal
self-attention, attached by forward hooks to the unchanged spatial UNet; frames are folded into the
batch, `(b f) c h w`. Both start as the identity (a dirac 1D convolution, zero-initialised outputs and
branches), so a fresh video UNet on F frames is the image UNet on each frame. Each layer also reads the
prompt and the clip's frame rate, and the convolution has prompt-chosen branches that move content
(`shift_rank`, `drift`); docs/video.md explains why each is there. The layers are one module with their
own weights (temporal_layers.safetensors).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, LayerOptions


@dataclass(kw_only=True)
class TemporalConfig(LayerOptions):
    """Sizes of the temporal layers (saved next to their weights): a training run's `layers.` options and these."""

    text_dim: int  # width of the prior's text embeddings
    kernel_size: int = 3  # frames the pseudo-3D convolution sees
    heads: int = 4  # temporal attention heads (reduced for narrow blocks)
    max_frames: int = 64  # length of the fixed sinusoidal position table
    window: int = 16  # frames attended together; longer clips use overlapping windows (FreeNoise)
    text_queries: int = 4  # learned queries that attention-pool the prompt's token states
    time_range: float = 1.0  # seconds from the clip's centre beyond which tau is clamped (the training clips' half span)


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(...,) positions or rates -> (..., dim) sinusoidal features (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def window_starts(frames: int, window: int) -> list[int]:
    """First frame of each temporal-attention window: half-overlapping windows of `window` frames
    covering `frames` (the last one flush with the end)."""
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, max(1, window // 2)))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return starts


def fuse_windows(x: torch.Tensor, dim: int, window: int, fn) -> torch.Tensor:
    """`fn` (shape-preserving) on the half-overlapping windows of `window` frames along `dim` of `x`
    (`window_starts`), the overlaps fused with weights that fall to each window's ends (1..peak..1), as
    FreeNoise (Qiu et al. 2023, sec. 3.3) fuses them: no frame sees an unseen distance and no seam is hard."""
    frames = x.shape[dim]
    ramp = torch.minimum(torch.arange(1, window + 1), torch.arange(window, 0, -1)).to(x)  # 1..peak..1
    along = lambda v: v.view([-1 if d == dim % x.ndim else 1 for d in range(x.ndim)])  # noqa: E731
    out = torch.zeros_like(x)
    weight = torch.zeros(frames, device=x.device, dtype=x.dtype)
    for s in window_starts(frames, window):
        out.narrow(dim, s, window).add_(fn(x.narrow(dim, s, window)) * along(ramp))
        weight[s:s + window] += ramp
    return out / along(weight)


class TemporalConv(nn.Module):
    """Pseudo-3D convolution: a dirac-initialised 1D convolution over frames at every pixel, on an input scaled
    and shifted by the clip's conditioning (FiLM), plus a zero-initialised depthwise (frames x 3 x 3)
    convolution that moves content between neighbouring pixels, its kernel chosen per clip when
    `shift_rank` > 0, and with `drift` a first-order move by a prompt-chosen velocity (docs/video.md)."""

    def __init__(self, channels: int, kernel_size: int = 3, cond_dim: int | None = None, shift_rank: int = 0,
                 drift: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.shift = nn.Conv3d(channels, channels, (kernel_size, 3, 3), padding=(kernel_size // 2, 1, 1),
                               groups=channels, bias=False)
        nn.init.zeros_(self.shift.weight)
        self.film = self.shift_mix = self.shift_basis = self.velocity = None
        if cond_dim is not None:
            self.film = nn.Linear(cond_dim, 2 * channels)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
            if shift_rank > 0:
                self.shift_mix = nn.Linear(cond_dim, shift_rank)  # random: clips differ in their mix at once
                self.shift_basis = nn.Parameter(torch.zeros(shift_rank, *self.shift.weight.shape))
            if drift:  # (v_x, v_y) per channel, in pixels of this layer per second
                self.velocity = nn.Linear(cond_dim, 2 * channels)
                nn.init.zeros_(self.velocity.weight)
                nn.init.zeros_(self.velocity.bias)

    def forward(self, x: torch.Tensor, frames: int, cond: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> torch.Tensor:
        """(b f, c, h, w) features, the clip's conditioning (b, cond_dim) and each frame's time from the
        clip's centre (b, f) in seconds (read only with `drift`)."""
        b = x.shape[0] // frames
        h, w = x.shape[-2:]
        if cond is not None and self.film is not None:  # (b, cond_dim): one scale and shift per clip and channel
            scale, shift = rearrange(self.film(cond).to(x.dtype), "b (two c) -> two b c 1 1", two=2)
            x = rearrange(x, "(b f) c h w -> b f c h w", b=b) * (1 + scale[:, None]) + shift[:, None]
            x = rearrange(x, "b f c h w -> (b f) c h w")
        y = rearrange(self.conv(rearrange(x, "(b f) c h w -> (b h w) c f", f=frames)),
                      "(b h w) c f -> (b f) c h w", b=b, h=h, w=w)
        y = y + rearrange(self._move(rearrange(x, "(b f) c h w -> b c f h w", b=b), cond),
                          "b c f h w -> (b f) c h w")
        return y if self.velocity is None or cond is None else y + self._drift(x, frames, cond, time)

    def _move(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The depthwise (frames x 3 x 3) convolution of (b, c, f, h, w): shared, or one kernel per clip."""
        if cond is None or self.shift_basis is None:
            return self.shift(x)
        b, c = x.shape[:2]
        mix = self.shift_mix(cond).to(x.dtype)  # (b, r)
        kernels = self.shift.weight + torch.einsum("br,rcoktu->bcoktu", mix, self.shift_basis.to(x.dtype))
        moved = F.conv3d(rearrange(x, "b c f h w -> 1 (b c) f h w"), rearrange(kernels, "b c o k t u -> (b c) o k t u"),
                         padding=self.shift.padding, groups=b * c)
        return rearrange(moved, "1 (b c) f h w -> b c f h w", b=b)

    def _drift(self, x: torch.Tensor, frames: int, cond: torch.Tensor, time: torch.Tensor | None) -> torch.Tensor:
        """tau (v_x dx/dx + v_y dx/dy) for (b f, c, h, w) features: the first-order change of moving each
        frame by its time from the clip's centre times the clip's velocity (central differences)."""
        if time is None:
            raise ValueError("these temporal layers drift with the frame's time: pass time= (b, f) seconds")
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        d_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
        d_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
        v_x, v_y = rearrange(self.velocity(cond).to(x.dtype).repeat_interleave(frames, 0), "n (two c) -> two n c 1 1", two=2)
        tau = rearrange(time.to(x.dtype), "b f -> (b f) 1 1 1")
        return -tau * (v_x * d_x + v_y * d_y)  # content at p - tau v now sits at p: x(p - tau v) - x(p) ~ -tau v . grad x


class TemporalAttention(nn.Module):
    """Self-attention over frames at every pixel, with frame positions and the clip's conditioning
    (pooled text + fps) added to the tokens; zero-initialised output, so it starts as the identity."""

    def __init__(self, channels: int, cfg: TemporalConfig):
        super().__init__()
        heads = max(1, min(cfg.heads, channels // 8))
        while channels % heads:
            heads -= 1
        self.norm = nn.GroupNorm(min(32, channels), channels) if channels % min(32, channels) == 0 else nn.Identity()
        self.cond = nn.Linear(cfg.cond_dim, channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.window = cfg.window
        self.register_buffer("positions", sinusoidal(torch.arange(cfg.max_frames), channels), persistent=False)

    def forward(self, x: torch.Tensor, frames: int, cond: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> torch.Tensor:  # time: frame positions enter as indices
        b = x.shape[0] // frames
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "(b f) c h w -> (b h w) f c", f=frames)
        if cond is not None:  # (b, cond_dim) -> one vector per clip, shared by its pixels and frames
            tokens = tokens + self.cond(cond).repeat_interleave(h * w, dim=0)[:, None, :].to(tokens.dtype)
        attended = self._windowed(tokens) if frames > self.window else self._attend(tokens)
        delta = rearrange(self.out(attended), "(b h w) f c -> (b f) c h w", b=b, h=h, w=w)
        return x + delta

    def _attend(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.positions[: tokens.shape[1]].to(tokens.dtype)
        return self.attn(tokens, tokens, tokens, need_weights=False)[0]

    def _windowed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention in windows of the trained length, each with its own positions 0..window-1 (`fuse_windows`)."""
        return fuse_windows(tokens, 1, self.window, self._attend)


class TemporalLayers(nn.Module):
    """Every temporal layer of a video UNet, keyed by the spatial block it follows (its own weights)."""

    def __init__(self, unet: nn.Module, cfg: TemporalConfig):
        super().__init__()
        self.cfg = cfg
        layers = {}
        for name, module in unet.named_modules():
            kind = type(module).__name__
            if kind == "ResnetBlock2D":
                layers[name] = TemporalConv(module.out_channels, cfg.kernel_size, cfg.cond_dim, cfg.shift_rank,
                                             cfg.drift)
            elif kind == "Transformer2DModel":
                channels = module.out_channels or module.in_channels
                layers[name] = TemporalAttention(channels, cfg)
        self.layers = nn.ModuleDict({k.replace(".", "__"): v for k, v in layers.items()})
        self.fps_embed = nn.Sequential(nn.Linear(64, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
        # the prompt, attention-pooled: each learned query weighs the (normalised) token states
        width = cfg.text_dim * (2 if cfg.word_states else 1)  # last states | word embeddings, each normalised
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.word_norm = nn.LayerNorm(cfg.text_dim) if cfg.word_states else None
        self.text_scores = nn.Linear(width, cfg.text_queries)
        self.text_embed = nn.Sequential(nn.Linear(cfg.text_queries * width, cfg.cond_dim), nn.SiLU(),
                                        nn.Linear(cfg.cond_dim, cfg.cond_dim))
        # Masked-frame conditioning (Make-A-Video's interpolation and image-to-video): the known frames'
        # latents and a mask enter through extra input channels, zero-initialised so they start unused.
        conv_in = unet.conv_in
        self.known_in = nn.Conv2d(conv_in.in_channels + 1, conv_in.out_channels, conv_in.kernel_size,
                                  padding=conv_in.padding)
        nn.init.zeros_(self.known_in.weight)
        nn.init.zeros_(self.known_in.bias)

    def spatial_names(self) -> list[str]:
        return [k.replace("__", ".") for k in self.layers]

    def condition(self, text: torch.Tensor, fps: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """(b, L, D) prompt embeddings, (b,) frame rates and (b, L, D) word embeddings -> (b, cond_dim)."""
        dtype = self.text_norm.weight.dtype
        states = self.text_norm(text.to(dtype))
        if self.word_norm is not None:
            if words is None:
                raise ValueError("these temporal layers read the prompt's word embeddings: pass words= "
                                 "(prior.encode_prompt(..., words=True))")
            states = torch.cat([states, self.word_norm(words.to(dtype))], dim=-1)
        weights = self.text_scores(states).softmax(dim=1)  # (b, L, queries): a distribution over tokens per query
        pooled = rearrange(torch.einsum("blq,bld->bqd", weights, states), "b q d -> b (q d)")
        return self.text_embed(pooled) + self.fps_embed(sinusoidal(fps, 64, max_period=100.0).to(dtype))

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return folder / WEIGHTS_NAME


@dataclass
class VideoUNetOutput:
    sample: torch.Tensor  # (b, c, f, h, w)


class VideoUNet(nn.Module):
    """The prior's 2D UNet plus temporal layers: takes (b, c, f, h, w) videos, or (b, c, h, w) images
    (then the temporal layers are skipped and it is exactly the image UNet)."""

    def __init__(self, unet: nn.Module, temporal: TemporalLayers):
        super().__init__()
        self.unet, self.temporal = unet, temporal
        self._frames: int | None = None
        self._cond: torch.Tensor | None = None
        self._time: torch.Tensor | None = None  # (b, f) seconds from the clip's centre, clamped to time_range
        self._known: torch.Tensor | None = None  # ((b f), C + 1, h, w): known latents * mask, and the mask
        for name in temporal.spatial_names():
            unet.get_submodule(name).register_forward_hook(self._hook(temporal.layers[name.replace(".", "__")]))
        unet.conv_in.register_forward_hook(
            lambda module, args, out: out if self._known is None else out + self.temporal.known_in(self._known))

    @property
    def config(self):  # the prior reads sample_size / in_channels from here, as from any UNet
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _hook(self, layer: nn.Module):
        def after_spatial_block(module, args, output):
            if self._frames is None:  # image mode: the spatial block's output, untouched
                return output
            if isinstance(output, tuple):  # Transformer2DModel(return_dict=False) -> (sample,)
                return (layer(output[0], self._frames, self._cond, self._time),) + tuple(output[1:])
            return layer(output, self._frames, self._cond, self._time)
        return after_spatial_block

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                fps: torch.Tensor | float = 8.0, known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                words: torch.Tensor | None = None, **unet_kwargs) -> VideoUNetOutput:
        """`known` (b, c, f, h, w) clean latents of the frames given in advance and `mask` (b, 1, f, h, w),
        1 where a frame is known: the masked-frame conditioning (None: plain text-to-video). `words`
        (b, L, D): the prompt's word embeddings, for layers trained with `word_states`."""
        if sample.ndim == 4:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs)
        b, _, f = sample.shape[:3]
        x = rearrange(sample, "b c f h w -> (b f) c h w")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.repeat_interleave(f) if t.ndim == 1 else t
        fps = torch.as_tensor(fps, device=sample.device, dtype=torch.float32).expand(b)
        cond = self.temporal.condition(encoder_hidden_states, fps, words).to(sample.dtype)
        time_range = self.temporal.cfg.time_range
        time = (torch.arange(f, device=sample.device) - (f - 1) / 2)[None, :] / fps[:, None]
        self._frames, self._cond, self._time = f, cond, time.clamp(-time_range, time_range)
        if known is not None:  # classifier-free guidance doubles the batch; the known frames are the same
            known, mask = (y.repeat(b // y.shape[0], 1, 1, 1, 1) for y in (known, mask))
            mask = mask.expand(-1, -1, -1, *known.shape[-2:])  # a per-frame (b, 1, f, 1, 1) mask is fine too
            self._known = rearrange(torch.cat([known * mask, mask], 1), "b c f h w -> (b f) c h w").to(sample.dtype)
        try:
            out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states.repeat_interleave(f, 0),
                            **unet_kwargs).sample
        finally:
            self._frames = self._cond = self._time = self._known = None
        return VideoUNetOutput(rearrange(out, "(b f) c h w -> b c f h w", f=f))

    def freeze_spatial(self) -> "VideoUNet":
        """Only the temporal layers train, as in Make-A-Video."""
        self.unet.requires_grad_(False)
        self.temporal.requires_grad_(True)
        return self


def inflate(unet: nn.Module, cfg: TemporalConfig | None = None, weights: str | Path | None = None) -> VideoUNet:
    """The video UNet: `unet` (left as it is) plus identity-initialised temporal layers, or the layers
    saved in `weights` (a folder with temporal_layers.safetensors and temporal_config.json)."""
    if weights is not None:
        folder = Path(weights)
        cfg = TemporalConfig(**json.loads((folder / CONFIG_NAME).read_text()))
    cfg = cfg or TemporalConfig(text_dim=unet.config.cross_attention_dim)
    temporal = TemporalLayers(unet, cfg)
    if weights is not None:
        from pipelines.loading import load_safetensors

        temporal.load_state_dict(load_safetensors(Path(weights) / WEIGHTS_NAME))  # corrupt: one line naming it
    param = next(unet.parameters())
    return VideoUNet(unet, temporal.to(param.device, param.dtype))
