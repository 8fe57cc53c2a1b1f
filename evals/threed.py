"""`python run.py eval 3d`: are the 3D assets the right shape, the right colour, and one object from every side?

For each prompt "a {color} {shape}" of the grid, `seeds` assets are fitted exactly as `python run.py 3d`
makes them (each run directory is kept under the eval's folder, with that asset's scores, so `--resume`
never fits or scores an asset twice). The report (report.json, report.md, rewritten after every asset so a
stopped eval keeps its numbers so far; turntables.png at the end) covers:
- geometry: volumetric IoU between the exported mesh and the ground-truth primitive (ToyWorld's SDF at
  unit scale), after moving both to their centroid, scaling both to unit volume, and taking the best of
  `rotations` turns about the vertical axis;
- appearance: the judge's colour and shape on renders of the mesh from `views` azimuths (plain-PyTorch
  rasterizer, ToyWorld's camera and light);
- multi-view consistency (a Janus check): the judge's view (front / side / back) on the NeRF's own
  turntable renders (`view_frames` azimuths) against the true camera view: an asset with a face on every
  side fails it, and so does one with no face at all (the report gives the score of always answering the
  commonest view).
The same judge also scores ToyWorld's own render of each prompt's object from the same cameras, so the
report says how far the judge can go on ground truth. For views that is not far: only the dark front
marker tells the views apart, so a back view of any round object looks like a side view.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import trimesh
from einops import rearrange
from PIL import Image

from dreamfusion.cameras import view_names
from dreamfusion.config import ThreeDConfig
from dreamfusion.export import render_mesh
from dreamfusion.fit import STAGE, fit, load_asset, render_views, resumed_config, turntable_cameras
from dreamfusion.renderer import make_renderer
from pipelines.config import load_yaml, option, to_dict
from pipelines.errors import UserError
from pipelines.image import from_pil, to_pil
from pipelines.runtime import Timer, command_line, make_run_dir, pick_device, save_image, versions, write_json, write_text, write_yaml
from pipelines.training import checkpoint_step

from .judge import DEFAULT_PATH, load_judge
from .render import SDFS, render
from .world import COLOR_NAMES, SHAPES, VIEWS, Scene

logger = logging.getLogger(__name__)
HIT_METRICS = {"color_accuracy": "color", "shape_accuracy": "shape", "view_agreement": "view"}  # metric -> judge head
SCORE_FILE, VIEWS_FILE = "eval_score.json", "eval_views.png"  # an asset's scores, kept in its run folder
RECORD_FILES = ("config.yaml", "metadata.json", SCORE_FILE, VIEWS_FILE)  # all a resume needs of a scored run
BARS = {"median_iou": 0.6, "min_shape_iou": 0.4, "color_accuracy": 0.9, "shape_accuracy": 0.8, "view_agreement": 0.7}


@dataclass
class Eval3DConfig(ThreeDConfig):
    seeds: int = option(2, "assets fitted per prompt (seeds seed, seed + 1, ...)")
    colors: tuple[str, ...] = option((), "colours of the prompt grid; [] for all")
    shapes: tuple[str, ...] = option((), "shapes of the prompt grid; [] for all")
    judge: str = option(DEFAULT_PATH, "the judge folder (made by `python run.py train judge`)")
    iou_resolution: int = option(64, "sample points per side of the IoU grid")
    rotations: int = option(36, "turns about the vertical axis tried for the best IoU")
    views: int = option(8, "azimuths of the mesh renders the judge scores for colour and shape")
    view_frames: int = option(36, "azimuths (0, 360/n, ...) of the NeRF renders the judge's view is checked on")
    judge_elevation: float = option(15.0, "camera elevation of the judged renders, degrees")
    resume: Optional[str] = option(None, "an eval 3d directory to continue: its scored assets are kept, the one "
                                         "it was fitting continues from its checkpoint, the rest are fitted (--resume)")

    def validate(self) -> None:
        super().validate()
        if self.seeds < 1 or self.iou_resolution < 8 or self.rotations < 1 or min(self.views, self.view_frames) < 1:
            raise UserError("seeds, rotations, views and view_frames must be at least 1, iou_resolution at least 8")
        for name, known in (("colors", COLOR_NAMES), ("shapes", SHAPES)):
            unknown = [x for x in getattr(self, name) if x not in known]
            if unknown:
                raise UserError(f"unknown {name[:-1]} '{unknown[0]}': choose from {', '.join(known)}")

    def grid(self) -> list[tuple[int, int]]:
        pick = lambda chosen, known: [i for i, x in enumerate(known) if not chosen or x in chosen]
        return [(c, s) for c in pick(self.colors, COLOR_NAMES) for s in pick(self.shapes, SHAPES)]


# ------------------------------------------------------------------------------------------ geometry
def _normalised(occupied: torch.Tensor, cell: float) -> tuple[torch.Tensor, float]:
    """Centroid (3,) of occupied cell centres (N, 3), and the scale that gives them unit volume."""
    return occupied.mean(0), float((len(occupied) * cell ** 3) ** (1 / 3))


def _grid(resolution: int, half: float) -> tuple[torch.Tensor, float]:
    axis = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution * 2 * half - half
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return pts, 2 * half / resolution


def _rotate_z(p: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1], p[:, 2]], -1)


def volumetric_iou(mesh: trimesh.Trimesh, shape: str, resolution: int = 64, rotations: int = 36) -> float:
    """IoU of the mesh's solid and the ground-truth primitive, both normalised (module docstring)."""
    sdf = SDFS[shape]
    # the ground truth's centroid and volume, from its SDF on a fine grid
    gt_pts, gt_cell = _grid(resolution, 1.5)
    gt_inside = sdf(gt_pts.float()) < 0
    gt_c, gt_s = _normalised(gt_pts[gt_inside], gt_cell)
    # the mesh's solid, voxelised (filled), and its centroid and volume
    pitch = float(mesh.extents.max()) / resolution
    solid = mesh.voxelized(pitch).fill()
    occupied = torch.from_numpy(np.asarray(solid.points, dtype=np.float64))
    if len(occupied) == 0:
        return 0.0
    m_c, m_s = _normalised(occupied, pitch)
    # compare on one grid in normalised space: y -> mesh at m_c + m_s y, ground truth at gt_c + gt_s R y
    y, _ = _grid(resolution, 1.0)
    in_mesh = torch.from_numpy(solid.is_filled((m_c + m_s * y).numpy()))
    best = 0.0
    for k in range(rotations):
        in_gt = sdf((gt_c + gt_s * _rotate_z(y, 2 * math.pi * k / rotations)).float()) < 0
        union = (in_mesh | in_gt).sum()
        best = max(best, float((in_mesh & in_gt).sum() / union) if union else 0.0)
    return best


# -------------------------------------------------------------------------------------------- eval
def ground_truth_views(shape: int, color: int, cams, size: int) -> torch.Tensor:
    """ToyWorld's own render of the object (unit scale, marker in front) from `cams`: (V, 3, size, size)."""
    n = len(cams.azimuth_deg)
    scene = Scene(shape=torch.full((n,), shape), color=torch.full((n,), color), azimuth_deg=cams.azimuth_deg.cpu(),
                  elevation_deg=cams.elevation_deg.cpu(), distance=cams.distance.cpu(), fov_deg=cams.fov_deg.cpu(),
                  scale=torch.ones(n), yaw_deg=torch.zeros(n), offset=torch.zeros(n, 3))
    return render(scene, size)


def judge_hits(judge, images: torch.Tensor, color: int, shape: int, views: torch.Tensor) -> dict[str, list[bool]]:
    """Per image: did the judge name the right colour, shape and view?"""
    predicted = judge.predict(images)
    return {"color": (predicted["color"] == color).tolist(), "shape": (predicted["shape"] == shape).tolist(),
            "view": (predicted["view"] == views).tolist()}


def score_asset(run_dir: Path, color: int, shape: int, cfg: Eval3DConfig, judge, device) -> dict:
    """IoU, the judge on mesh renders, and the judge's view on NeRF renders, for one fitted asset; and the
    judge on the ground-truth object from the same cameras."""
    mesh = trimesh.load(run_dir / "mesh.ply", force="mesh")
    cams = turntable_cameras(cfg.views, cfg, "cpu", elevation=cfg.judge_elevation)
    mesh_views = render_mesh(mesh, cams.azimuth_deg, cams.elevation_deg, cams.distance, cams.fov_deg, judge.image_size)
    asset = load_asset(run_dir, cfg, device)  # the eval fitted it with cfg's own options
    renderer = make_renderer(device, cfg, cfg.bound)
    nerf_views = render_views(asset, renderer, cams.to(device), judge.image_size, cfg).cpu()
    on_mesh = judge_hits(judge, mesh_views, color, shape, true_views(cams, cfg))
    # The view check orbits with view_frames cameras: at 36 (every 10 degrees) none sits on a front/side/back
    # threshold and a quarter face the front, so a judge that answers "side" to everything scores 50%, not
    # the 75% it would on 8 azimuths (0, 45, ...), six of which count as side.
    orbit = turntable_cameras(cfg.view_frames, cfg, "cpu", elevation=cfg.judge_elevation)
    orbit_views = true_views(orbit, cfg)
    nerf_orbit = render_views(asset, renderer, orbit.to(device), judge.image_size, cfg).cpu()
    truth = judge_hits(judge, ground_truth_views(shape, color, cams, judge.image_size), color, shape, true_views(cams, cfg))
    truth["view"] = judge_hits(judge, ground_truth_views(shape, color, orbit, judge.image_size), color, shape,
                               orbit_views)["view"]
    return {"iou": round(volumetric_iou(mesh, SHAPES[shape], cfg.iou_resolution, cfg.rotations), 4),
            "color_hits": on_mesh["color"], "shape_hits": on_mesh["shape"],
            "view_hits": judge_hits(judge, nerf_orbit, color, shape, orbit_views)["view"],
            "view_chance": round(orbit_views.bincount().max().item() / len(orbit_views), 4),
            "ground_truth_hits": truth, "views": torch.cat([nerf_views, mesh_views], -2)}  # NeRF above mesh


def save_score(run_dir: Path, scored: dict) -> None:
    """Keep an asset's scores in its run (SCORE_FILE, VIEWS_FILE), so a resumed eval need not score it again."""
    save_image(run_dir / VIEWS_FILE, to_pil(rearrange(scored["views"], "v c h w -> 1 c h (v w)"))[0])
    write_json(run_dir / SCORE_FILE, {k: v for k, v in scored.items() if k != "views"})


def load_score(run_dir: Path) -> dict | None:
    """The scores save_score kept, or None if there are none or the run's mesh.ply was rewritten after them.
    A run pruned to RECORD_FILES (no mesh) keeps its scores."""
    path, views, mesh = run_dir / SCORE_FILE, run_dir / VIEWS_FILE, run_dir / "mesh.ply"
    if not (path.is_file() and views.is_file()) or (mesh.is_file() and path.stat().st_mtime < mesh.stat().st_mtime):
        return None
    scored = json.loads(path.read_text())
    with Image.open(views) as image:
        strip = from_pil(image)
    scored["views"] = rearrange(strip, "1 c h (v w) -> v c h w", v=len(scored["color_hits"]))
    return scored


def true_views(cams, cfg: ThreeDConfig) -> torch.Tensor:
    """The view index (VIEWS) of each camera, by DreamFusion's thresholds."""
    return torch.tensor([VIEWS.index(v) for v in view_names(cams.azimuth_deg, cams.elevation_deg, cfg)])


def summarise(rows: list[dict]) -> dict:
    ious = [r["iou"] for r in rows]
    per_shape = {s: statistics.median(r["iou"] for r in rows if r["shape_name"] == s)
                 for s in dict.fromkeys(r["shape_name"] for r in rows)}
    rate = lambda hits: round(sum(hits) / len(hits), 4)  # noqa: E731
    out = {"assets": len(rows), "median_iou": round(statistics.median(ious), 4), "per_shape_iou": per_shape,
           "min_shape_iou": round(min(per_shape.values()), 4)}
    out.update({metric: rate([h for r in rows for h in r[f"{head}_hits"]]) for metric, head in HIT_METRICS.items()})
    out["ground_truth"] = {metric: rate([h for r in rows for h in r["ground_truth_hits"][head]])
                           for metric, head in HIT_METRICS.items()}
    out["view_chance"] = max(r["view_chance"] for r in rows)
    out["passes"] = {k: out[k] >= bar for k, bar in BARS.items()}
    return out


def markdown(report: dict) -> str:
    s, truth = report["summary"], report["summary"]["ground_truth"]
    lines = ["# eval 3d", "", f"{s['assets']} assets; bars from the 3D issue. 'ground truth': the same judge on ToyWorld's "
             "own render of each object from the same cameras (what the judge can reach).", ""]
    if s["assets"] < report.get("planned", s["assets"]):
        lines += [f"**Unfinished: {s['assets']} of {report['planned']} assets so far** (`--resume` this folder to go on).", ""]
    lines += ["| metric | value | bar | pass | ground truth |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {s[k]:.3f} | {bar} | {'yes' if s['passes'][k] else 'no'} | "
              f"{f'{truth[k]:.3f}' if k in truth else ''} |" for k, bar in BARS.items()]
    lines += ["", f"view_agreement is checked on {len(report['assets'][0]['view_hits'])} NeRF renders per asset, evenly "
              f"spaced in azimuth; answering the commonest true view every time would score {s['view_chance']:.3f}."]
    lines += ["", "| shape | median IoU |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in s["per_shape_iou"].items()]
    lines += ["", "| prompt | seed | IoU | colour | shape | view | view (ground truth) |", "|---|---|---|---|---|---|---|"]
    count = lambda hits: f"{sum(hits)}/{len(hits)}"  # noqa: E731
    for r in report["assets"]:
        lines.append(f"| {r['prompt']} | {r['seed']} | {r['iou']:.3f} | {count(r['color_hits'])} | {count(r['shape_hits'])} "
                     f"| {count(r['view_hits'])} | {count(r['ground_truth_hits']['view'])} |")
    return "\n".join(lines) + "\n"


def resolve_eval(cfg: Eval3DConfig) -> tuple[Path | None, Eval3DConfig]:
    """`--resume EVAL_DIR`: that eval's folder and saved config (overrides must not conflict with it)."""
    if cfg.resume is None:
        return None, cfg
    eval_dir = Path(cfg.resume)
    saved = load_yaml(eval_dir / "config.yaml") if (eval_dir / "config.yaml").is_file() else {}
    if "iou_resolution" not in saved:
        raise UserError(f"--resume {eval_dir}: not an eval 3d directory (no eval 3d config.yaml)")
    saved.pop("command", None)
    return eval_dir, resumed_config(cfg, saved, eval_dir)


def earlier_runs(eval_dir: Path) -> dict[tuple[str, int], Path]:
    """The asset runs already in an eval's folder, by (prompt, seed): a finished one (metadata.json),
    else the one furthest along (its last checkpoint); runs with neither are left alone."""
    found: dict[tuple[str, int], tuple[tuple[bool, int], Path]] = {}
    for run_dir in sorted((eval_dir / "3d").glob("*")) if (eval_dir / "3d").is_dir() else []:
        if not (run_dir / "config.yaml").is_file():
            continue
        saved = load_yaml(run_dir / "config.yaml")
        rank = ((run_dir / "metadata.json").is_file(), checkpoint_step(run_dir, STAGE))
        key = (saved.get("prompt"), saved.get("seed"))
        if rank > (False, 0) and (key not in found or rank > found[key][0]):
            found[key] = (rank, run_dir)
    return {key: run_dir for key, (_, run_dir) in found.items()}


def main(cfg: Eval3DConfig, out: str | Path = "outputs", progress: bool = True) -> Path:
    eval_dir, cfg = resolve_eval(cfg)
    device = pick_device(cfg.device)
    judge = load_judge(cfg.judge, device)  # before any fit: a missing judge fails in a second
    timer = Timer()
    if eval_dir is not None:  # time adds up over passes: a finished eval's metadata, else the report so far
        records = (json.loads((eval_dir / name).read_text()) for name in ("metadata.json", "report.json")
                   if (eval_dir / name).is_file())  # lazily: the report (large) only when no metadata has them
        timer.stages = dict(next((r["timings_s"] for r in records if "timings_s" in r), {}))
    earlier, planned = {}, len(cfg.grid()) * cfg.seeds
    if eval_dir is None:
        eval_dir = make_run_dir(out, "eval", "3d")
        write_yaml(eval_dir / "config.yaml", {**to_dict(cfg), "command": command_line()})
    else:
        earlier = earlier_runs(eval_dir)
        logger.info("resuming %s: %d of %d assets already started or done", eval_dir, len(earlier), planned)
    rows, strips = [], []
    fit_cfg = ThreeDConfig(**{k: v for k, v in to_dict(cfg).items() if k in ThreeDConfig.__dataclass_fields__})
    fit_cfg = replace(fit_cfg, resume=None)
    for c, s in cfg.grid():
        prompt = f"a {COLOR_NAMES[c]} {SHAPES[s]}"
        for k in range(cfg.seeds):
            run_dir = earlier.get((prompt, cfg.seed + k))
            if run_dir is None or not (run_dir / "metadata.json").is_file():  # fit it, or finish fitting it
                resume = None if run_dir is None else str(run_dir)
                with timer("fit"):
                    run_dir = fit(replace(fit_cfg, seed=cfg.seed + k, resume=resume), prompt, eval_dir, progress)
            scored = load_score(run_dir)  # scored by an earlier pass of this eval
            if scored is None:
                with timer("score"):
                    scored = score_asset(run_dir, c, s, cfg, judge, device)
                save_score(run_dir, scored)
            strips.append(scored.pop("views"))
            rows.append({"prompt": prompt, "seed": cfg.seed + k, "color_index": c, "shape_index": s,
                         "shape_name": SHAPES[s], "run": run_dir.name, **scored})
            logger.info("%s (seed %d): IoU %.3f", prompt, cfg.seed + k, scored["iou"])
            # after every asset: a stopped eval (hours on a CPU) still leaves the numbers so far
            report = {"summary": summarise(rows), "assets": rows, "planned": planned, "judge": cfg.judge,
                      "judge_metrics": judge.metrics, "timings_s": timer.stages}
            write_json(eval_dir / "report.json", report)
            write_text(eval_dir / "report.md", markdown(report))
    sheet = rearrange(torch.stack(strips), "a v c h w -> c (a h) (v w)")  # one row per asset: NeRF over mesh
    save_image(eval_dir / "turntables.png", to_pil(sheet[None])[0])
    write_json(eval_dir / "metadata.json", {"job": "eval 3d", "timings_s": timer.stages, "versions": versions(),
                                            "command": command_line()})
    logger.info("eval 3d: %s", {k: v for k, v in report["summary"].items() if k != "per_shape_iou"})
    return eval_dir
