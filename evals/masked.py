"""The masked-frame model in `eval video`, on ToyWorld clips whose every frame is known:
- interpolation (interpolate=k): every k-th frame of a clip at k * fps is given, the model fills the rest;
  pixel and centroid error against the truth, beside a cross-fade of the given frames and the VAE's round
  trip (the floor), and the judge's colour and shape on the filled frames;
- image-to-video (image=): the first frame and the caption are given; motion correctness (on the ground
  truth too), colour, shape, identity, and the jump after the given frame (1.0 = none).
"""

from __future__ import annotations

import torch
from einops import rearrange
from tqdm.auto import tqdm

from pipelines.prior import Prior
from toyworld.video import sample_clip_batch
from toyworld.vocab import MOTIONS
from video.config import VideoConfig
from video.pipeline import VideoModel, blend_known

from .motion import identity_stability, judge_frames, motion_correct, rate, tracks

KNOWN = 5  # given frames of an interpolation clip
CHUNK = 4  # clips denoised at once


def _decode(prior: Prior, z: torch.Tensor, chunk: int) -> torch.Tensor:
    """(n, c, F, h, w) latents -> (n, F, 3, H, W) frames in [0, 1] on the CPU."""
    frames = prior.decode_latents(rearrange(z, "n c f h w -> (n f) c h w"), chunk).cpu()
    return rearrange(frames, "(n f) c h w -> n f c h w", f=z.shape[2])


def _encode(prior: Prior, clips: torch.Tensor) -> torch.Tensor:
    """(n, F, 3, H, W) in [0, 1] -> (n, c, F, h, w) latents (the distribution's mode)."""
    z = prior.encode_images(rearrange(clips, "n f c h w -> (n f) c h w"), sample=False)
    return rearrange(z, "(n f) c h w -> n c f h w", n=clips.shape[0])


def _fill(model: VideoModel, captions: list[str], known: torch.Tensor, cfg: VideoConfig, fps: float,
          g: torch.Generator, desc: str, progress: bool, k: int | None = None) -> torch.Tensor:
    """Denoise with the known frames given (non-zero latents), CHUNK clips at a time, as the video job does
    (with `k`, an interpolation: from the given frames' blend at `interpolate_strength`); -> decoded frames."""
    out, prior = [], model.prior
    for i in tqdm(range(0, len(known), CHUNK), desc=desc, disable=not progress):
        text = prior.encode_prompt(captions[i:i + CHUNK], cfg.negative, words=True)
        part = known[i:i + CHUNK].to(prior.device)
        init = None if k is None else blend_known(part, k)
        z = model.sample(text, part.shape, cfg, g, False, part, fps, init, cfg.interpolate_strength)
        out.append(_decode(prior, z, cfg.decode_chunk))
    return torch.cat(out)


def cross_fade(clips: torch.Tensor, k: int) -> torch.Tensor:
    """(n, F, 3, H, W) clips: every frame between two given ones (every k-th) as their linear blend."""
    return blend_known(clips.transpose(1, 2), k).transpose(1, 2)


def _centroid_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ta, tb = tracks(a), tracks(b)
    return torch.sqrt((ta["x"] - tb["x"]) ** 2 + (ta["y"] - tb["y"]) ** 2)


@torch.no_grad()
def interpolation_report(model: VideoModel, judge, cfg: VideoConfig, n: int, k: int, seed: int,
                         progress: bool = True) -> dict:
    prior = model.prior
    frames, fps = (KNOWN - 1) * k + 1, cfg.fps * k
    videos, captions, labels = sample_clip_batch(n, torch.Generator().manual_seed(seed), frames=frames,
                                                 size=prior.default_size, fps=fps)
    truth = videos.permute(0, 2, 1, 3, 4)  # (n, F, 3, H, W)
    z_true = _encode(prior, truth)
    known = torch.zeros_like(z_true)
    known[:, :, ::k] = z_true[:, :, ::k]
    made = _fill(model, captions, known, cfg, fps, torch.Generator("cpu").manual_seed(seed),
                 f"interpolating {n} clips (x{k})", progress, k)
    round_trip = _decode(prior, z_true, cfg.decode_chunk)
    between = torch.arange(frames) % k != 0
    err = lambda x: float((x[:, between] - truth[:, between]).abs().mean())  # noqa: E731
    centroid = lambda x: float(_centroid_error(x[:, between], truth[:, between]).mean())  # noqa: E731
    fade = cross_fade(made, k)  # the given frames, as the model returns them, blended
    judged = judge_frames(judge, made[:, between])
    return {"clips": n, "k": k, "given_frames": KNOWN, "frames": frames, "fps": fps,
            "interpolate_strength": cfg.interpolate_strength,
            "pixel_error": round(err(made), 4), "pixel_error_cross_fade": round(err(fade), 4),
            "pixel_error_vae_round_trip": round(err(round_trip), 4),
            "centroid_error_px": round(centroid(made), 3), "centroid_error_px_cross_fade": round(centroid(fade), 3),
            "centroid_error_px_vae_round_trip": round(centroid(round_trip), 3),
            "frame_color_accuracy": round(float((judged["color"] == labels["color"][:, None]).float().mean()), 4),
            "frame_shape_accuracy": round(float((judged["shape"] == labels["shape"][:, None]).float().mean()), 4)}


@torch.no_grad()
def image_to_video_report(model: VideoModel, judge, cfg: VideoConfig, n: int, seed: int,
                          progress: bool = True) -> dict:
    prior = model.prior
    videos, captions, labels = sample_clip_batch(n, torch.Generator().manual_seed(seed + 1), frames=cfg.frames,
                                                 size=prior.default_size, fps=cfg.fps)
    truth = videos.permute(0, 2, 1, 3, 4)
    known = torch.zeros(n, prior.latent_channels, cfg.frames, *_encode(prior, truth[:1, :1]).shape[-2:])
    known[:, :, 0] = _encode(prior, truth[:, :1])[:, :, 0]
    made = _fill(model, captions, known, cfg, cfg.fps, torch.Generator("cpu").manual_seed(seed + 1),
                 f"animating {n} first frames", progress)
    names = [MOTIONS[int(m)] for m in labels["motion"]]
    judged = judge_frames(judge, made)
    change = (made[:, 1:] - made[:, :-1]).abs().mean(dim=(0, 2, 3, 4))
    moved = motion_correct(made, names)
    return {"clips": n, "frames": cfg.frames, "fps": cfg.fps,
            "motion_accuracy": rate(moved), "motion_accuracy_ground_truth": rate(motion_correct(truth, names)),
            "per_motion": {m: rate([ok for ok, name in zip(moved, names) if name == m]) for m in sorted(set(names))},
            "frame_color_accuracy": round(float((judged["color"] == labels["color"][:, None]).float().mean()), 4),
            "frame_shape_accuracy": round(float((judged["shape"] == labels["shape"][:, None]).float().mean()), 4),
            "identity_stability": identity_stability(judged),
            "first_step_jump": round(float(change[0] / change[1:].mean().clamp(min=1e-8)), 3)}


def markdown(r: dict) -> list[str]:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    it, iv = r["interpolation"], r["image_to_video"]
    return ["", f"## Masked-frame model: {r['masked_motion']}", "",
            f"Interpolation: {it['clips']} ground-truth clips of {it['frames']} frames at fps {it['fps']:g}, every "
            f"{it['k']}th given; scored on the frames filled in between (interpolate_strength "
            f"{it['interpolate_strength']:g}).", "",
            "| frames in between | pixel error | centroid error (px) |", "|---|---|---|",
            f"| interpolated | {it['pixel_error']:.4f} | {it['centroid_error_px']:.2f} |",
            f"| cross-fade of the given frames | {it['pixel_error_cross_fade']:.4f} | {it['centroid_error_px_cross_fade']:.2f} |",
            f"| VAE round trip of the true frames (floor) | {it['pixel_error_vae_round_trip']:.4f} | "
            f"{it['centroid_error_px_vae_round_trip']:.2f} |", "",
            f"Their colour accuracy {pct(it['frame_color_accuracy'])}, shape accuracy {pct(it['frame_shape_accuracy'])}.",
            "", f"Image-to-video: {iv['clips']} ground-truth first frames with their captions, {iv['frames']} frames at "
            f"fps {iv['fps']:g}.", "",
            "| metric | generated | ground truth |", "|---|---|---|",
            f"| motion correctness | {pct(iv['motion_accuracy'])} | {pct(iv['motion_accuracy_ground_truth'])} |",
            f"| per-frame colour accuracy | {pct(iv['frame_color_accuracy'])} | |",
            f"| per-frame shape accuracy | {pct(iv['frame_shape_accuracy'])} | |",
            f"| identity stability | {pct(iv['identity_stability'])} | |",
            f"| jump after the given frame (1.0 = none) | {iv['first_step_jump']:.2f} | |", "",
            "Per motion (image-to-video): " + ", ".join(f"{m} {pct(v)}" for m, v in iv["per_motion"].items()) + "."]
