"""`python run.py eval 4d`: does each moving asset keep its shape and colour, and move as its prompt says?

For each colour x shape x seed, one static asset is fitted (as `run.py 3d` fits "a red sphere"), and every
motion word animates it (`run.py 4d "a red sphere moving right" static=...`). Each 4d run is kept under the
eval's folder with its scores, so `--resume` never fits or scores an asset twice. Per asset:
- geometry: the 3D eval's volumetric IoU of every frame's mesh (frames/frame_XXX.ply) against the true primitive;
- motion: the frames' mesh centroids (moving left/right/up/down) or sizes, the cube root of the volume
  (growing/shrinking), from the first frame to the last. In the world frame of the 4d job, "right" is +y
  and "up" +z. A move is correct when it goes the named way by at least MIN_SHIFT world units (MIN_GROWTH in
  log size) and, for a move, at least as far as it strays across; ToyWorld's own clips move 0.875 units
  (and grow 1.84x) over the same 8 frames at 4 fps;
- smoothness: the largest frame-to-frame step's share of the whole path; a path is smooth when no step is
  more than twice an even share (2 / (F - 1)), a jump when one step carries most of it;
- colour: the judge's colour on the front video's frames (majority of frames), and the mesh's hue error.
The same motion and smoothness tests run on the true primitive moved along ToyWorld's own path ("ground truth").
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import trimesh
from einops import rearrange
from PIL import Image

from dreamfusion.fit import fit as fit_static
from fourd.config import FourDConfig
from fourd.fit import fit as fit_4d, static_config
from pipelines.errors import UserError
from pipelines.media import from_pil
from pipelines.rundir import RunDir
from pipelines.runtime import Timer, pick_device, write_json
from pipelines.training import checkpoint_step
from toyworld.render import SDFS
from toyworld.video import GROW_RATE, SPEED
from toyworld.vocab import COLOR_NAMES, SHAPES

from .config import Eval4DConfig
from .judge import load_judge
from .threed import hue_error, volumetric_iou

logger = logging.getLogger(__name__)
SCORE_FILE = "eval_score.json"
RECORD_FILES = ("config.yaml", "metadata.json", "motion.json", "frames.png", SCORE_FILE)  # what a record keeps
MIN_SHIFT, MIN_GROWTH = 0.1, math.log(1.1)
DIRECTIONS = {"moving left": (0, -1.0), "moving right": (0, 1.0), "moving up": (1, 1.0), "moving down": (1, -1.0)}
GROWTH = {"growing": 1.0, "shrinking": -1.0}
BARS = {"motion_correct": 0.8, "median_frame_iou": 0.5, "color_accuracy": 0.9}


def size(mesh: trimesh.Trimesh) -> float:
    """The cube root of the volume (of the bounding box where the mesh is not closed)."""
    volume = mesh.volume if mesh.is_watertight else float(np.prod(mesh.extents))
    return float(abs(volume)) ** (1 / 3)


def path_of(meshes: list[trimesh.Trimesh]) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the solid's centroid (F, 3) and log size (F,)."""
    centres = np.stack([m.center_mass if m.is_watertight else m.centroid for m in meshes])
    return centres, np.log([size(m) for m in meshes])


def motion_score(centres: np.ndarray, log_size: np.ndarray, motion: str) -> dict:
    """Whether the path moves as `motion` says (module docstring), and its largest step's share."""
    if motion in DIRECTIONS:
        axis, sign = DIRECTIONS[motion]
        axis_vec = np.zeros(3)
        axis_vec[1 + axis] = sign  # y for left/right, z for up/down
        shift = centres[-1] - centres[0]
        along = float(shift @ axis_vec)
        across = float(np.linalg.norm(shift - along * axis_vec))
        correct = along >= MIN_SHIFT and along >= across
        steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        amount = {"along": round(along, 4), "across": round(across, 4)}
    else:
        growth = float(log_size[-1] - log_size[0]) * GROWTH[motion]
        correct = growth >= MIN_GROWTH
        steps = np.abs(np.diff(log_size))
        amount = {"growth": round(growth, 4)}
    share = float(steps.max() / steps.sum()) if steps.sum() > 0 else 1.0
    return {"correct": bool(correct), "max_step_share": round(share, 4),
            "smooth": bool(share <= 2 / len(steps)), **amount}


def primitive_mesh(shape: str, resolution: int = 48) -> trimesh.Trimesh:
    """ToyWorld's primitive (unit scale, at the origin) as a closed mesh, from its SDF."""
    from skimage.measure import marching_cubes

    half = 1.2
    axis = torch.linspace(-half, half, resolution)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    sdf = SDFS[shape](pts).reshape((resolution,) * 3).numpy()
    verts, faces, _, _ = marching_cubes(np.pad(sdf, 1, constant_values=1.0), 0.0, spacing=(2 * half / (resolution - 1),) * 3)
    return trimesh.Trimesh(verts - half - 2 * half / (resolution - 1), faces)


def true_path(shape: str, motion: str, frames: int, fps: float) -> list[trimesh.Trimesh]:
    """The primitive moved as ToyWorld's clips move it (`toyworld.video.animate`, seen from the front camera)."""
    base = primitive_mesh(shape)
    t = (np.arange(frames) - (frames - 1) / 2) / fps  # seconds from the clip's middle
    out = []
    for time in t:
        moved = base.copy()
        if motion in DIRECTIONS:
            axis, sign = DIRECTIONS[motion]
            offset = np.zeros(3)
            offset[1 + axis] = sign * SPEED * time
            moved.apply_translation(offset)
        else:
            moved.apply_scale(math.exp(GROWTH[motion] * GROW_RATE * time))
        out.append(moved)
    return out


def score_asset(run_dir: Path, color: int, shape: int, motion: str, cfg: Eval4DConfig, judge) -> dict:
    meshes = [trimesh.load(p, force="mesh") for p in sorted((run_dir / "frames").glob("frame_*.ply"))]
    if not meshes:
        raise UserError(f"{run_dir} has no frames/frame_XXX.ply to score")
    ious = [round(volumetric_iou(m, SHAPES[shape], cfg.iou_resolution, cfg.rotations), 4) for m in meshes]
    with Image.open(run_dir / "frames.png") as image:
        strip = from_pil(image)
    clip = rearrange(strip, "1 c h (f w) -> f c h w", f=len(meshes))
    predicted = judge.predict(torch.nn.functional.interpolate(clip, (judge.image_size,) * 2, mode="area"))
    color_hits = (predicted["color"] == color).tolist()
    truth = motion_score(*path_of(true_path(SHAPES[shape], motion, len(meshes), cfg.dynamic.fps)), motion)
    return {"frame_ious": ious, "iou": round(statistics.median(ious), 4), **motion_score(*path_of(meshes), motion),
            "color_hits": color_hits, "color_correct": sum(color_hits) * 2 > len(color_hits),
            "hue_error": round(hue_error(meshes[0], color), 2), "watertight": bool(meshes[0].is_watertight),
            "ground_truth": truth}


def summarise(rows: list[dict]) -> dict:
    rate = lambda flags: round(sum(flags) / len(flags), 4) if flags else None  # noqa: E731
    motions = dict.fromkeys(r["motion"] for r in rows)
    out = {"assets": len(rows),
           "motion_correct": rate([r["correct"] for r in rows]),
           "per_motion_correct": {m: rate([r["correct"] for r in rows if r["motion"] == m]) for m in motions},
           "median_frame_iou": round(statistics.median(i for r in rows for i in r["frame_ious"]), 4),
           "per_shape_iou": {s: round(statistics.median(i for r in rows if r["shape_name"] == s for i in r["frame_ious"]), 4)
                             for s in dict.fromkeys(r["shape_name"] for r in rows)},
           "smooth_rate": rate([r["smooth"] for r in rows]),
           "median_max_step_share": round(statistics.median(r["max_step_share"] for r in rows), 4),
           "color_accuracy": rate([r["color_correct"] for r in rows]),
           "median_hue_error": round(statistics.median(r["hue_error"] for r in rows), 2),
           "watertight_rate": rate([r["watertight"] for r in rows]),
           "median_minutes": round(statistics.median(r["minutes"] for r in rows), 2),
           "ground_truth": {"motion_correct": rate([r["ground_truth"]["correct"] for r in rows]),
                            "smooth_rate": rate([r["ground_truth"]["smooth"] for r in rows])}}
    out["passes"] = {k: out[k] >= bar for k, bar in BARS.items()}
    return out


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = ["# eval 4d", "", f"{s['assets']} assets; bars from the 4D issue. Ground truth: the true primitive moved along "
             "ToyWorld's own path, scored by the same tests.", ""]
    if s["assets"] < report.get("planned", s["assets"]):
        lines += [f"**Unfinished: {s['assets']} of {report['planned']} assets so far** (`--resume` this folder to go on).", ""]
    lines += ["| metric | value | bar | pass |", "|---|---|---|---|"]
    lines += [f"| {k} | {s[k]:.3f} | {bar} | {'yes' if s['passes'][k] else 'no'} |" for k, bar in BARS.items()]
    lines += ["", f"Smooth paths: {s['smooth_rate']:.3f} (ground truth {s['ground_truth']['smooth_rate']:.3f}); median "
              f"largest step {s['median_max_step_share']:.3f} of the path. Motion correct on ground truth: "
              f"{s['ground_truth']['motion_correct']:.3f}. Median hue error {s['median_hue_error']:.1f} degrees; watertight "
              f"{s['watertight_rate']:.3f}. Median minutes per asset (its static share included): {s['median_minutes']:.1f}.",
              "", "| motion | correct |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in s["per_motion_correct"].items()]
    lines += ["", "| shape | median per-frame IoU |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in s["per_shape_iou"].items()]
    lines += ["", "'moved': first frame to last, the named way (world units along its axis, or log size; negative is the "
              "wrong way), and how far it strayed across.", "",
              "| prompt | seed | IoU | correct | moved | largest step | colour | minutes |", "|---|---|---|---|---|---|---|---|"]
    for r in report["assets"]:
        moved = f"{r['along']:+.3f} (across {r['across']:.3f})" if "along" in r else f"log size {r['growth']:+.3f}"
        lines.append(f"| {r['prompt']} | {r['seed']} | {r['iou']:.3f} | {'yes' if r['correct'] else 'no'} | {moved} | "
                     f"{r['max_step_share']:.2f} | {sum(r['color_hits'])}/{len(r['color_hits'])} | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def earlier_runs(folder: Path) -> dict[tuple[str, int], Path]:
    """Runs under `folder` (an eval's 3d/ or 4d/) by (prompt, seed): the finished one, else the last started."""
    found: dict[tuple[str, int], Path] = {}
    for run_dir in sorted(folder.glob("*")) if folder.is_dir() else []:
        if not (run_dir / "config.yaml").is_file():
            continue
        saved = RunDir(run_dir).config()
        key = (saved.get("prompt"), saved.get("seed"))
        if key not in found or not (found[key] / "metadata.json").is_file():
            found[key] = run_dir
    return found


def _minutes(run_dir: Path, static_dir: Path, shared: int) -> float:
    """The asset's wall time: its own stages, plus its share of the static fit it was animated from."""
    own = json.loads((run_dir / "metadata.json").read_text())["timings_s"]
    static = json.loads((static_dir / "metadata.json").read_text())["timings_s"] if (static_dir / "metadata.json").is_file() else {}
    return round((sum(own.values()) + sum(static.values()) / shared) / 60, 2)


def job_config(cfg: Eval4DConfig) -> FourDConfig:
    """The eval's options that `run.py 4d` takes."""
    return FourDConfig(**{f.name: getattr(cfg, f.name) for f in fields(FourDConfig)})


def main(cfg: Eval4DConfig, out: str | Path = "outputs", progress: bool = True) -> Path:
    run = None
    if cfg.resume is not None:
        run = RunDir.existing(cfg.resume, "eval 4d")
        if "motions" not in run.config():
            raise UserError(f"--resume {run.path}: not an eval 4d directory")
        cfg = run.resumed(Eval4DConfig, {"device": cfg.device})
    device = pick_device(cfg.device)
    judge = load_judge(cfg.judge, device)  # before anything is written: a missing judge fails in a second
    if run is None:
        with RunDir.create(out, "eval", "4d") as run:
            run.write_config(cfg)
    timer, rows = Timer(), []
    planned = len(cfg.grid()) * cfg.seeds * len(cfg.motions)
    run.keep = lambda: True  # an eval that started keeps its folder, to resume
    with run:
        for c, s in cfg.grid():
            for k in range(cfg.seeds):
                seed, name = cfg.seed + k, f"a {COLOR_NAMES[c]} {SHAPES[s]}"
                static_dir = earlier_runs(run / "3d").get((name, seed))
                if static_dir is None or not (static_dir / "metadata.json").is_file():
                    resume = None if static_dir is None or checkpoint_step(static_dir, "3d") == 0 else str(static_dir)
                    with timer("static"):
                        static_dir = fit_static(replace(static_config(cfg), seed=seed, resume=resume),
                                                None if resume else name, run.path, progress)
                for motion in cfg.motions:
                    prompt = f"{name} {motion}"
                    run_dir = earlier_runs(run / "4d").get((prompt, seed))
                    if run_dir is None or not (run_dir / "metadata.json").is_file():
                        resume = None if run_dir is None else str(run_dir)
                        given = replace(job_config(cfg), seed=seed, static=str(static_dir), resume=resume)
                        with timer("dynamic"):
                            run_dir = fit_4d(given, None if resume else prompt, run.path, progress)
                    score_path = run_dir / SCORE_FILE
                    if score_path.is_file():
                        scored = json.loads(score_path.read_text())
                    else:
                        with timer("score"):
                            scored = score_asset(run_dir, c, s, motion, cfg, judge)
                        scored["minutes"] = _minutes(run_dir, static_dir, len(cfg.motions))
                        write_json(score_path, scored)
                    rows.append({"prompt": prompt, "seed": seed, "color_index": c, "shape_name": SHAPES[s],
                                 "motion": motion, "run": run_dir.name, **scored})
                    logger.info("%s (seed %d): IoU %.3f, %s", prompt, seed, scored["iou"],
                                "moves as asked" if scored["correct"] else "does not move as asked")
                    report = {"summary": summarise(rows), "assets": rows, "planned": planned, "timings_s": timer.stages}
                    run.write_json("report.json", report)
                    run.write_text("report.md", markdown(report))
        run.write_metadata(job="eval 4d", timings_s=timer.stages)
        logger.info("eval 4d: %s", {k: v for k, v in report["summary"].items() if not isinstance(v, dict)})
        return run.path
