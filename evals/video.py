"""`python run.py eval video`: does the video model draw the right object, keep it, and move it as told?

For each prompt "a {color} {shape} {motion}" of the grid, `samples_per_prompt` clips are generated
exactly as `python run.py video` makes them. The report (report.json, report.md, strip.png) covers:
- per-frame colour and shape accuracy (the ToyWorld judge on every frame);
- identity stability: frames whose judged colour and shape equal the clip's majority;
- motion correctness, from the object's silhouette (pixels away from the plain background):
  moving left/right/up/down -> the sign of the centroid's displacement; growing/shrinking -> the sign
  of the area trend; bouncing -> a reversal of vertical direction (spinning has no criterion);
- temporal smoothness: mean frame-to-frame pixel change, against ToyWorld ground-truth clips;
- fps effect: centroid displacement per frame at fps=4 against fps=12 ("moving right" prompts);
- window seams: on clips longer than the temporal-attention window (FreeNoise-style overlapping windows),
  the frame-to-frame change across window edges against the change inside windows (1.0 = no seam).
The same motion metrics run on ground-truth clips, so the report says how far the metric itself can be trusted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines.config import option, to_dict
from pipelines.errors import UserError
from pipelines.prior import Prior
from pipelines.runtime import (Timer, command_line, make_run_dir, save_image, versions,
                               write_json, write_text, write_yaml)

from video.pipeline import MAX_FRAMES, VideoConfig, default_motion, denoise, load_video_prior, temporal_window
from video.temporal import window_starts

from .judge import DEFAULT_PATH, load_judge
from .render import BACKGROUND
from .world import COLOR_NAMES, MOTIONS, SHAPES

logger = logging.getLogger(__name__)
SIGNED = {"moving left": ("x", -1), "moving right": ("x", 1), "moving up": ("y", -1), "moving down": ("y", 1),
          "growing": ("area", 1), "shrinking": ("area", -1)}


@dataclass
class EvalVideoConfig(VideoConfig):
    samples_per_prompt: int = option(4, "clips generated per prompt")
    colors: tuple[str, ...] = option(("red", "green", "blue"), "colours of the prompt grid; [] for all")
    shapes: tuple[str, ...] = option(("sphere", "cube"), "shapes of the prompt grid; [] for all")
    motions: tuple[str, ...] = option((), "motions of the prompt grid, e.g. ['moving left']; [] for all")
    judge: str = option(DEFAULT_PATH, "the judge folder (made by `python run.py train judge`)")
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
        for name, known in (("colors", COLOR_NAMES), ("shapes", SHAPES), ("motions", MOTIONS)):
            unknown = [x for x in getattr(self, name) if x not in known]
            if unknown:
                raise UserError(f"unknown {name[:-1]} '{unknown[0]}': choose from {', '.join(known)}")

    def grid(self) -> list[tuple[int, int, int]]:
        pick = lambda chosen, known: [i for i, x in enumerate(known) if not chosen or x in chosen]
        return [(c, s, m) for c in pick(self.colors, COLOR_NAMES) for s in pick(self.shapes, SHAPES)
                for m in pick(self.motions, MOTIONS)]


# ------------------------------------------------------------------------------------ motion metrics
def silhouettes(clips: torch.Tensor, threshold: float = 0.12) -> torch.Tensor:
    """(n, F, 3, H, W) in [0, 1] -> (n, F, H, W) masks of pixels away from the plain background."""
    return ((clips - BACKGROUND).abs().amax(dim=2) > threshold).float()


def tracks(clips: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per frame: silhouette centroid x, y (pixels; y grows downwards) and area fraction, each (n, F)."""
    mask = silhouettes(clips)
    h, w = mask.shape[-2:]
    area = mask.sum((-2, -1)).clamp(min=1.0)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    return {"x": (mask * xs).sum((-2, -1)) / area, "y": (mask * ys).sum((-2, -1)) / area, "area": area / (h * w)}


def slope(series: torch.Tensor) -> torch.Tensor:
    """Least-squares slope per row of (n, F) over frame index."""
    t = torch.arange(series.shape[-1], dtype=torch.float32)
    t = t - t.mean()
    return ((series - series.mean(-1, keepdim=True)) * t).sum(-1) / (t * t).sum()


def motion_correct(clips: torch.Tensor, motion: list[str], min_reversal_px: float = 0.5) -> list[bool | None]:
    """Did each clip move as its motion word says? None where there is no criterion (spinning)."""
    track = tracks(clips)
    out: list[bool | None] = []
    for i, m in enumerate(motion):
        if m in SIGNED:
            key, sign = SIGNED[m]
            out.append(bool(slope(track[key][i : i + 1])[0] * sign > 0))
        elif m == "bouncing":  # a bounce goes up, then comes down (or the reverse): dy changes sign
            dy = track["y"][i].diff()
            big = dy[dy.abs() > min_reversal_px / max(1, len(dy) // 4)]
            out.append(bool(len(big) > 1 and (big[:-1] * big[1:] < 0).any()))
        else:
            out.append(None)
    return out


def smoothness(clips: torch.Tensor) -> float:
    """Mean absolute frame-to-frame pixel change (0..1)."""
    return float((clips[:, 1:] - clips[:, :-1]).abs().mean())


def displacement_per_frame(clips: torch.Tensor) -> float:
    """Mean |centroid step| in pixels per frame."""
    track = tracks(clips)
    return float(torch.sqrt(track["x"].diff(dim=1) ** 2 + track["y"].diff(dim=1) ** 2).mean())


# ------------------------------------------------------------------------------------------- running
@torch.no_grad()
def generate_clips(prior: Prior, prompts: list[str], cfg: EvalVideoConfig, seed: int, progress: bool) -> torch.Tensor:
    """`samples_per_prompt` clips per prompt, (n, F, 3, H, W) in [0, 1], made by the video job's own
    denoising (`video.pipeline.denoise`, so long clips get the same noise rescheduling)."""
    from einops import rearrange

    n_per, f = cfg.samples_per_prompt, prior.vae_scale_factor
    h, w = cfg.image_size(prior.default_size, f)
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (n_per, prior.latent_channels, cfg.frames, h // f, w // f)
    clips = []
    for prompt in tqdm(prompts, desc=f"generating {len(prompts) * n_per} clips", disable=not progress):
        text = prior.encode_prompt([prompt], cfg.negative, words=True).repeat(n_per)
        z = denoise(prior, prior.unet, text, shape, cfg, g, False)
        frames = prior.decode_latents(rearrange(z, "b c f h w -> (b f) c h w"), cfg.decode_chunk)
        clips.append(rearrange(frames.cpu(), "(b f) c h w -> b f c h w", f=cfg.frames))
    return torch.cat(clips)


def seam_report(clips: torch.Tensor, window: int) -> dict:
    """Mean frame-to-frame change across the edges of the attention windows against inside them."""
    frames = clips.shape[1]
    change = (clips[:, 1:] - clips[:, :-1]).abs().mean(dim=(0, 2, 3, 4))  # (F - 1,): frame i -> i + 1
    edges = {i for s in window_starts(frames, window) for i in (s - 1, s + window - 1) if 0 <= i < frames - 1}
    inside = [i for i in range(frames - 1) if i not in edges]
    at_edges, within = float(change[sorted(edges)].mean()), float(change[inside].mean())
    return {"frames": frames, "window": window, "edge_transitions": sorted(edges),
            "change_at_edges": round(at_edges, 5), "change_inside": round(within, 5),
            "ratio": round(at_edges / max(within, 1e-8), 3)}


def judge_frames(judge, clips: torch.Tensor) -> dict[str, torch.Tensor]:
    """The judge on every frame: colour and shape indices, (n, F)."""
    n, f = clips.shape[:2]
    predicted = judge.predict(clips.reshape(n * f, *clips.shape[2:]))
    return {k: predicted[k].reshape(n, f) for k in ("color", "shape")}


def identity_stability(judged: dict[str, torch.Tensor]) -> float:
    """Fraction of frames whose judged colour and shape are both their clip's majority."""
    majority = lambda x: x.mode(dim=1).values[:, None]  # noqa: E731
    stable = (judged["color"] == majority(judged["color"])) & (judged["shape"] == majority(judged["shape"]))
    return round(float(stable.float().mean()), 4)


def ground_truth(cfg: EvalVideoConfig, size: int) -> dict:
    """The motion metrics on ToyWorld's own clips: what a perfect model would score."""
    from .video import sample_clip_batch

    videos, _, labels = sample_clip_batch(96, torch.Generator().manual_seed(cfg.seed + 7), frames=cfg.frames,
                                          size=size, fps=cfg.fps)
    clips = videos.permute(0, 2, 1, 3, 4)  # (n, F, 3, H, W)
    names = [MOTIONS[int(m)] for m in labels["motion"]]
    return {"motion_accuracy": _rate(motion_correct(clips, names)), "smoothness": smoothness(clips),
            "per_motion": {m: _rate([ok for ok, name in zip(motion_correct(clips, names), names) if name == m])
                           for m in MOTIONS}}


def _rate(flags: list) -> float | None:
    scored = [x for x in flags if x is not None]
    return round(sum(scored) / len(scored), 4) if scored else None


def build_report(cfg: EvalVideoConfig, grid, clips: torch.Tensor, judged: dict, truth: dict, fps_effect: dict,
                 seams: dict | None = None) -> dict:
    n_per = cfg.samples_per_prompt
    colour = torch.tensor([c for c, _, _ in grid]).repeat_interleave(n_per)[:, None]
    shape = torch.tensor([s for _, s, _ in grid]).repeat_interleave(n_per)[:, None]
    motions = [MOTIONS[m] for _, _, m in grid for _ in range(n_per)]
    moved = motion_correct(clips, motions)
    return {
        "model": cfg.model, "motion": cfg.motion, "clips": len(clips), "frames": cfg.frames, "fps": cfg.fps,
        "prompts": len(grid), "samples_per_prompt": n_per, "steps": cfg.steps, "guidance": cfg.guidance,
        "frame_color_accuracy": round(float((judged["color"] == colour).float().mean()), 4),
        "frame_shape_accuracy": round(float((judged["shape"] == shape).float().mean()), 4),
        "identity_stability": identity_stability(judged),
        "motion_accuracy": _rate(moved),
        "per_motion": {m: _rate([ok for ok, name in zip(moved, motions) if name == m]) for m in dict.fromkeys(motions)},
        "smoothness": round(smoothness(clips), 4),
        "ground_truth": truth, "fps_effect": fps_effect, "seams": seams,
    }


def markdown(r: dict) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    lines = [f"# Video eval: {r['model']} (motion: {r['motion']})", "",
             f"{r['clips']} clips ({r['prompts']} prompts x {r['samples_per_prompt']}), {r['frames']} frames at "
             f"fps {r['fps']}, {r['steps']} steps, guidance {r['guidance']}.", "",
             "| metric | generated | ToyWorld ground truth |", "|---|---|---|",
             f"| per-frame colour accuracy | {pct(r['frame_color_accuracy'])} | |",
             f"| per-frame shape accuracy | {pct(r['frame_shape_accuracy'])} | |",
             f"| identity stability | {pct(r['identity_stability'])} | |",
             f"| motion correctness | {pct(r['motion_accuracy'])} | {pct(r['ground_truth']['motion_accuracy'])} |",
             f"| mean frame-to-frame change | {r['smoothness']:.4f} | {r['ground_truth']['smoothness']:.4f} |", "",
             "| motion | generated | ground truth |", "|---|---|---|"]
    lines += [f"| {m} | {pct(v)} | {pct(r['ground_truth']['per_motion'].get(m))} |" for m, v in r["per_motion"].items()]
    fe = r["fps_effect"]
    lines += ["", f"fps effect ('{fe['prompt']}'): {fe['fps4_px_per_frame']:.2f} px/frame at fps 4, "
              f"{fe['fps12_px_per_frame']:.2f} px/frame at fps 12 (ratio {fe['ratio']:.2f}; ground truth 3.0)."]
    if r.get("seams"):
        se = r["seams"]
        lines += ["", f"window seams ({se['prompt']}, {se['frames']} frames, attention window {se['window']}): "
                  f"frame-to-frame change {se['change_at_edges']:.4f} across window edges, {se['change_inside']:.4f} "
                  f"inside windows (ratio {se['ratio']:.2f}; 1.0 = no seam)."]
    if r.get("masked"):
        from .evaluate_masked import markdown as masked_markdown

        lines += masked_markdown(r["masked"])
    return "\n".join(lines) + "\n"


def strip(clips: torch.Tensor, rows: int = 12) -> Image.Image:
    """The first clip of up to `rows` prompts, frames left to right."""
    pick = clips[:: max(1, len(clips) // rows)][:rows]
    n, f, _, h, w = pick.shape
    grid = (pick.permute(0, 3, 1, 4, 2).reshape(n * h, f * w, 3).clamp(0, 1) * 255).round().byte().numpy()
    return Image.fromarray(grid)


def main(cfg: EvalVideoConfig, out: str | Path = "outputs", progress: bool = True) -> Path:
    timer = Timer()
    with timer("load"):
        wants_masked = cfg.masked_clips > 0 and bool(cfg.masked_motion or default_motion(cfg.model, "interpolation"))
        prior, cfg.motion, masked = load_video_prior(cfg, masked=wants_masked)
        judge = load_judge(cfg.judge, prior.device)
    cfg.image_size(prior.default_size, prior.vae_scale_factor)
    run_dir = make_run_dir(out, "eval", "video")
    write_yaml(run_dir / "config.yaml", {**to_dict(cfg), "command": command_line()})
    grid = cfg.grid()
    prompts = [f"a {COLOR_NAMES[c]} {SHAPES[s]} {MOTIONS[m]}" for c, s, m in grid]
    with timer("generate"):
        clips = generate_clips(prior, prompts, cfg, cfg.seed, progress)
    with timer("fps_effect"):
        fast = [displacement_per_frame(generate_clips(prior, ["a red ball moving right"], replace(cfg, fps=rate),
                                                      cfg.seed, False)) for rate in (4.0, 12.0)]
    fps_effect = {"prompt": "a red ball moving right", "fps4_px_per_frame": fast[0], "fps12_px_per_frame": fast[1],
                  "ratio": fast[0] / max(fast[1], 1e-6)}
    seams, window = None, temporal_window(prior.unet)
    if cfg.seam_frames > window:  # a long clip that stays in frame: attention runs in overlapping windows
        with timer("seams"):
            prompt = "a red ball bouncing"
            long = generate_clips(prior, [prompt], replace(cfg, frames=cfg.seam_frames, samples_per_prompt=2),
                                  cfg.seed, False)
            seams = {"prompt": prompt, **seam_report(long, window)}
    with timer("judge"):
        report = build_report(cfg, grid, clips, judge_frames(judge, clips), ground_truth(cfg, prior.default_size),
                              fps_effect, seams)
    report["masked"] = None
    if masked is not None:
        from .evaluate_masked import image_to_video_report, interpolation_report

        with timer("masked"):
            k = cfg.interpolate if cfg.interpolate > 1 else 4
            report["masked"] = {
                "masked_motion": cfg.masked_motion or default_motion(cfg.model, "interpolation"),
                "interpolation": interpolation_report(prior, masked, judge, cfg, cfg.masked_clips, k, cfg.seed, progress),
                "image_to_video": image_to_video_report(prior, masked, judge, cfg, cfg.masked_clips, cfg.seed, progress)}
    elif cfg.masked_clips > 0:
        logger.info("no masked-frame model (masked_motion= or the preset's interpolation:): interpolation and "
                    "image-to-video are not scored")
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", markdown(report))
    save_image(run_dir / "strip.png", strip(clips))
    write_json(run_dir / "metadata.json", {"job": "eval video", "model": prior.model_id, "motion": cfg.motion,
                                           "device": str(prior.device), "timings_s": timer.stages, "versions": versions(),
                                           "command": command_line()})
    logger.info("frame colour %.1f%%, shape %.1f%%, motion %s; report in %s", 100 * report["frame_color_accuracy"],
                100 * report["frame_shape_accuracy"], report["motion_accuracy"], run_dir)
    return run_dir
