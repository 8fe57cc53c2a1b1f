"""`python run.py eval video`: does the video model draw the right object, keep it, and move it as told?

For each prompt "a {color} {shape} {motion}" of the grid, clips made as `run.py video` makes them are scored:
the judge's colour and shape per frame, identity stability, motion correctness from the silhouette
(`evals.motion`), smoothness, the fps effect, and the seams of windowed long clips; the masked-frame model's
interpolation and image-to-video against ground-truth clips (`evals.masked`). The motion metrics also run
on ToyWorld's own clips, so the report says how far the metric itself can be trusted.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from tqdm.auto import tqdm

from pipelines.loading import preset_folder
from pipelines.media import save_image
from pipelines.rundir import RunDir
from pipelines.runtime import Timer
from toyworld.video import sample_clip_batch
from toyworld.vocab import COLOR_NAMES, MOTIONS, SHAPES
from video.pipeline import VideoModel
from video.temporal import window_starts

from .config import EvalVideoConfig
from .judge import load_judge
from .masked import image_to_video_report, interpolation_report
from .masked import markdown as masked_markdown
from .motion import displacement_per_frame, identity_stability, judge_frames, motion_correct, rate, smoothness

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- running
@torch.no_grad()
def generate_clips(model: VideoModel, prompts: list[str], cfg: EvalVideoConfig, seed: int, progress: bool) -> torch.Tensor:
    """`samples_per_prompt` clips per prompt, (n, F, 3, H, W) in [0, 1], sampled as the video job samples
    (`VideoModel.sample`, so long clips get the same noise rescheduling)."""
    prior = model.prior
    n_per, f = cfg.samples_per_prompt, prior.vae_scale_factor
    h, w = cfg.image_size(prior.default_size, f)
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (n_per, prior.latent_channels, cfg.frames, h // f, w // f)
    clips = []
    for prompt in tqdm(prompts, desc=f"generating {len(prompts) * n_per} clips", disable=not progress):
        text = prior.encode_prompt([prompt], cfg.negative, words=True).repeat(n_per)
        z = model.sample(text, shape, cfg, g, False)
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


def ground_truth(cfg: EvalVideoConfig, size: int) -> dict:
    """The motion metrics on ToyWorld's own clips: what a perfect model would score."""
    videos, _, labels = sample_clip_batch(96, torch.Generator().manual_seed(cfg.seed + 7), frames=cfg.frames,
                                          size=size, fps=cfg.fps)
    clips = videos.permute(0, 2, 1, 3, 4)  # (n, F, 3, H, W)
    names = [MOTIONS[int(m)] for m in labels["motion"]]
    return {"motion_accuracy": rate(motion_correct(clips, names)), "smoothness": smoothness(clips),
            "per_motion": {m: rate([ok for ok, name in zip(motion_correct(clips, names), names) if name == m])
                           for m in MOTIONS}}


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
        "motion_accuracy": rate(moved),
        "per_motion": {m: rate([ok for ok, name in zip(moved, motions) if name == m]) for m in dict.fromkeys(motions)},
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
        has_masked = bool(cfg.masked_motion or preset_folder(cfg.model, "interpolation"))
        model = VideoModel.load(cfg, masked=cfg.masked_clips > 0 and has_masked)
        judge = load_judge(cfg.judge, model.prior.device)
    prior = model.prior
    cfg.image_size(prior.default_size, prior.vae_scale_factor)
    cfg = replace(cfg, motion=model.motion)
    with RunDir.create(out, "eval", "video") as run:  # a run that fails removes its folder
        run.write_config(cfg)
        grid = cfg.grid()
        prompts = [f"a {COLOR_NAMES[c]} {SHAPES[s]} {MOTIONS[m]}" for c, s, m in grid]
        with timer("generate"):
            clips = generate_clips(model, prompts, cfg, cfg.seed, progress)
        with timer("fps_effect"):
            fast = [displacement_per_frame(generate_clips(model, ["a red ball moving right"], replace(cfg, fps=r),
                                                          cfg.seed, False)) for r in (4.0, 12.0)]
        fps_effect = {"prompt": "a red ball moving right", "fps4_px_per_frame": fast[0], "fps12_px_per_frame": fast[1],
                      "ratio": fast[0] / max(fast[1], 1e-6)}
        seams = None
        if cfg.seam_frames > model.window:  # a long clip that stays in frame: attention runs in overlapping windows
            with timer("seams"):
                prompt = "a red ball bouncing"
                long = generate_clips(model, [prompt], replace(cfg, frames=cfg.seam_frames, samples_per_prompt=2),
                                      cfg.seed, False)
                seams = {"prompt": prompt, **seam_report(long, model.window)}
        with timer("judge"):
            report = build_report(cfg, grid, clips, judge_frames(judge, clips), ground_truth(cfg, prior.default_size),
                                  fps_effect, seams)
        report["masked"] = None
        if model.masked is not None:
            with timer("masked"):
                k = cfg.interpolate if cfg.interpolate > 1 else 4
                report["masked"] = {
                    "masked_motion": model.masked_motion,
                    "interpolation": interpolation_report(model, judge, cfg, cfg.masked_clips, k, cfg.seed, progress),
                    "image_to_video": image_to_video_report(model, judge, cfg, cfg.masked_clips, cfg.seed, progress)}
        elif cfg.masked_clips > 0:
            logger.info("no masked-frame model (masked_motion= or the preset's interpolation:): interpolation and "
                        "image-to-video are not scored")
        run.write_json("report.json", report)
        run.write_text("report.md", markdown(report))
        save_image(run / "strip.png", strip(clips))
        run.write_metadata(job="eval video", model=prior.model_id, motion=model.motion, device=str(prior.device),
                           timings_s=timer.stages)
        logger.info("frame colour %.1f%%, shape %.1f%%, motion %s; report in %s", 100 * report["frame_color_accuracy"],
                    100 * report["frame_shape_accuracy"], report["motion_accuracy"], run.path)
        return run.path

