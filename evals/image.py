"""`python run.py eval image`: does the prior draw what it is asked for? The judge decides.

For every prompt "a {color} {shape}" of the colour x shape grid the prior generates `samples_per_prompt`
images as the image job would, and the judge names the colour and shape it sees (with `views=true`,
"..., {view} view" prompts are scored on the view too). OUT/eval/<time>-image/ holds report.json,
report.md, grid.png (one sample per prompt, framed green where the judge agrees), config.yaml and
metadata.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from pipelines.geometry import VIEWS
from pipelines.loading import content_hash
from pipelines.media import save_image, to_pil
from pipelines.prior import Conditioning, Prior
from pipelines.rundir import RunDir
from pipelines.runtime import Timer, pick_device
from pipelines.sampling import initial_noise, sample
from toyworld.vocab import COLOR_NAMES, SHAPES

from .config import EvalImageConfig
from .judge import HEADS, load_judge

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt and the labels a faithful image of it has (indices into HEADS)."""

    text: str
    color: int
    shape: int
    view: Optional[int] = None


def prompt_grid(cfg: EvalImageConfig) -> list[Prompt]:
    """The colour x shape prompts (shape-major), then, with views=true, each of them once per view."""
    pairs = [(s, c) for s in cfg.grid_shapes for c in cfg.grid_colors]
    prompts = [Prompt(f"a {c} {s}", COLOR_NAMES.index(c), SHAPES.index(s)) for s, c in pairs]
    if cfg.views:
        prompts += [Prompt(f"a {c} {s}, {v} view", COLOR_NAMES.index(c), SHAPES.index(s), VIEWS.index(v))
                    for s, c in pairs for v in VIEWS]
    return prompts


# -------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_all(prior: Prior, prompts: list[Prompt], cfg: EvalImageConfig, progress: bool = True) -> torch.Tensor:
    """`samples_per_prompt` images per prompt, prompt-major, (P * N, 3, H, W) in [0, 1] on the CPU.

    All the initial noise is drawn up front from one seeded generator, so an image depends on the seed
    and its place in the grid, not on batch_size. Prompts of one batch are denoised together.
    """
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)
    text = prior.encode_prompt([p.text for p in prompts], cfg.negative).repeat(cfg.samples_per_prompt)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    f = prior.vae_scale_factor
    noise = initial_noise((len(text.cond), prior.latent_channels, height // f, width // f), generator, prior.device)
    out = []
    for i in tqdm(range(0, len(noise), cfg.batch_size), desc=f"generating {len(noise)} images", disable=not progress):
        part = Conditioning(text.cond[i:i + cfg.batch_size], text.uncond[i:i + cfg.batch_size])
        latents = sample(prior, part, noise[i:i + cfg.batch_size], cfg.sampler, cfg.steps, cfg.guidance,
                         generator, progress=False)
        out.append(prior.decode_latents(latents, cfg.decode_chunk).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------- scoring
def expected_labels(prompts: list[Prompt], n: int) -> dict[str, torch.Tensor]:
    """What each generated image should show, (P * N,) per head (view -1 where the prompt names none)."""
    rows = {name: [getattr(p, name) if getattr(p, name) is not None else -1 for p in prompts] for name in HEADS}
    return {name: torch.tensor(v).repeat_interleave(n) for name, v in rows.items()}


def rate(hits: torch.Tensor) -> float:
    return round(hits.float().mean().item(), 4)


def summarize(predicted: dict, expected: dict, heads: tuple[str, ...]) -> dict:
    """Accuracy per head, 'both' (colour and shape right) and, with a view head, 'all' (all three)."""
    hits = {name: predicted[name] == expected[name] for name in heads}
    out = {f"{name}_accuracy": rate(hits[name]) for name in heads}
    out["both_accuracy"] = rate(hits["color"] & hits["shape"])
    if "view" in heads:
        out["all_accuracy"] = rate(hits["color"] & hits["shape"] & hits["view"])
    return {**out, "images": len(expected["color"])}


def breakdown(predicted: dict, expected: dict, by: str, heads: tuple[str, ...]) -> dict:
    """summarize() per prompted class of head `by` (e.g. per colour), in the world's order."""
    out = {}
    for k, name in enumerate(HEADS[by]):
        mask = expected[by] == k
        if mask.any():
            out[name] = summarize({h: v[mask] for h, v in predicted.items()}, {h: v[mask] for h, v in expected.items()}, heads)
    return out


def confusion(predicted: torch.Tensor, expected: torch.Tensor, head: str) -> dict:
    """Counts of (prompted class, judged class); rows only for classes that were prompted."""
    classes = HEADS[head]
    rows = [k for k in range(len(classes)) if (expected == k).any()]
    counts = [[int(((expected == r) & (predicted == c)).sum()) for c in range(len(classes))] for r in rows]
    return {"prompted": [classes[r] for r in rows], "judged": list(classes), "counts": counts}


def top_confusions(matrices: dict[str, dict], limit: int = 10) -> list[dict]:
    """The most frequent wrong answers over every head, largest first."""
    found = []
    for head, m in matrices.items():
        for prompted, row in zip(m["prompted"], m["counts"]):
            for judged, count in zip(m["judged"], row):
                if judged != prompted and count:
                    found.append({"head": head, "prompted": prompted, "judged": judged, "count": count,
                                  "rate": round(count / sum(row), 4)})
    return sorted(found, key=lambda c: (-c["count"], c["head"], c["prompted"]))[:limit]


def score_section(prompts: list[Prompt], n: int, predicted: dict, heads: tuple[str, ...]) -> dict:
    """Every number of one prompt set: overall, per colour/shape(/view), per prompt, confusions."""
    expected = expected_labels(prompts, n)
    section = {**summarize(predicted, expected, heads), "prompts": len(prompts), "samples_per_prompt": n}
    for head in heads:
        section[f"per_{head}"] = breakdown(predicted, expected, head, heads)
    section["per_prompt"] = per_prompt(prompts, n, predicted, expected, heads)
    matrices = {head: confusion(predicted[head], expected[head], head) for head in heads}
    section["confusion"] = {**matrices, "top": top_confusions(matrices)}
    return section


def per_prompt(prompts: list[Prompt], n: int, predicted: dict, expected: dict, heads: tuple[str, ...]) -> list[dict]:
    """summarize() per prompt, with what the judge saw in each of its n images."""
    rows = []
    for i, p in enumerate(prompts):
        mine = slice(i * n, (i + 1) * n)
        rows.append({"prompt": p.text,
                     **summarize({h: v[mine] for h, v in predicted.items()}, {h: v[mine] for h, v in expected.items()}, heads),
                     "judged": [judged_text(predicted, j, heads) for j in range(mine.start, mine.stop)]})
    return rows


def judged_text(predicted: dict, i: int, heads: tuple[str, ...]) -> str:
    text = f"a {COLOR_NAMES[predicted['color'][i]]} {SHAPES[predicted['shape'][i]]}"
    return text + (f", {VIEWS[predicted['view'][i]]} view" if "view" in heads else "")


def build_report(prompts: list[Prompt], cfg: EvalImageConfig, predicted: dict, judge_metrics: dict) -> dict:
    """report.json: the plain grid, and the view-prompt grid when views=true."""
    n, plain = cfg.samples_per_prompt, [p for p in prompts if p.view is None]
    split = len(plain) * n  # prompt_grid puts the plain prompts first
    part = lambda lo, hi: {h: v[lo:hi] for h, v in predicted.items()}
    report = {"model": cfg.model, "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance,
              "seed": cfg.seed, "negative": cfg.negative, "judge": {"path": cfg.judge, "held_out": judge_metrics},
              "grid": score_section(plain, n, part(0, split), ("color", "shape"))}
    if cfg.views:
        report["views"] = score_section(prompts[len(plain):], n, part(split, None), ("color", "shape", "view"))
    return report


# ----------------------------------------------------------------------------------------- writing
def pct(x: float) -> str:
    return f"{x:.0%}"


def markdown(report: dict) -> str:
    """report.md: the headline numbers and every breakdown as tables."""
    grid, ref = report["grid"], report["judge"]["held_out"].get("accuracy", {})
    judge_note = ", ".join(f"{h} {pct(ref[h])}" for h in HEADS if h in ref) or "not recorded"
    lines = [f"# Image eval: {report['model']}", "",
             f"{grid['images']} images ({grid['prompts']} prompts x {grid['samples_per_prompt']} samples); "
             f"sampler {report['sampler']}, {report['steps']} steps, guidance {report['guidance']}, seed {report['seed']}.",
             f"Judge: `{report['judge']['path']}` (accuracy on held-out ground-truth renders: {judge_note}).", "",
             "| prompts | colour right | shape right | both right |", "|---|---|---|---|",
             f"| all | {pct(grid['color_accuracy'])} | {pct(grid['shape_accuracy'])} | {pct(grid['both_accuracy'])} |", ""]
    lines += prompt_table(grid) + [""]
    for head in ("color", "shape"):
        lines += breakdown_table(grid[f"per_{head}"], head, ("color", "shape")) + [""]
    lines += confusion_list(grid["confusion"]["top"])
    if "views" in report:
        lines += ["", *views_markdown(report["views"], report["judge"]["held_out"])]
    return "\n".join(lines) + "\n"


def prompt_table(section: dict) -> list[str]:
    """Both-right rate per prompt as a shapes x colours table."""
    both = {p["prompt"]: p["both_accuracy"] for p in section["per_prompt"]}
    colors, shapes = list(section["per_color"]), list(section["per_shape"])
    return ["## Both right, per prompt", "", "| | " + " | ".join(colors) + " |", "|---" * (len(colors) + 1) + "|",
            *(f"| {s} | " + " | ".join(pct(both[f"a {c} {s}"]) for c in colors) + " |" for s in shapes)]


def breakdown_table(rows: dict, by: str, heads: tuple[str, ...]) -> list[str]:
    title = {"color": "colour", "shape": "shape", "view": "view"}
    cols = [f"{title[h]} right" for h in heads] + ["colour+shape right"] + (["all right"] if "view" in heads else [])
    keys = [f"{h}_accuracy" for h in heads] + ["both_accuracy"] + (["all_accuracy"] if "view" in heads else [])
    return [f"## Per prompted {title[by]}", "", f"| {title[by]} | " + " | ".join(cols) + " | images |",
            "|---" * (len(cols) + 2) + "|",
            *(f"| {name} | " + " | ".join(pct(r[k]) for k in keys) + f" | {r['images']} |" for name, r in rows.items())]


def confusion_list(top: list[dict], title: str = "Most common mistakes") -> list[str]:
    lines = [f"## {title}", ""]
    lines += [f"- {c['head']}: asked for {c['prompted']}, judged {c['judged']}: {c['count']} "
              f"({c['rate']:.0%} of those images)" for c in top]
    return lines if top else lines + ["- none"]


def views_markdown(views: dict, held_out: dict) -> list[str]:
    per_view = held_out.get("view_accuracy_per_view", {})
    ceiling = (" On ground-truth renders the judge itself names the view right for "
               + ", ".join(f"{name} {pct(a)}" for name, a in per_view.items())
               + " (side and back often look alike), so a perfect prior would score about that.") if per_view else ""
    return ["## View prompts", "",
            f"{views['images']} images of 'a {{color}} {{shape}}, {{view}} view' prompts.{ceiling}", "",
            "| prompts | colour right | shape right | view right | all three |", "|---|---|---|---|---|",
            f"| all | {pct(views['color_accuracy'])} | {pct(views['shape_accuracy'])} | {pct(views['view_accuracy'])} "
            f"| {pct(views['all_accuracy'])} |", "",
            *breakdown_table(views["per_view"], "view", ("color", "shape", "view")), "",
            *confusion_list(top_confusions({"view": views["confusion"]["view"]}), "Most common view mistakes")]


def grid_image(images: torch.Tensor, section: dict, cfg: EvalImageConfig, pad: int = 3) -> Image.Image:
    """The first sample of each plain prompt: rows = shapes, columns = colours, labelled, framed green
    when the judge names both colour and shape right, red when it does not."""
    tiles = to_pil(images[::cfg.samples_per_prompt][:len(section["per_prompt"])])  # plain prompts come first
    right = [p["judged"][0] == p["prompt"] for p in section["per_prompt"]]
    h, w = images.shape[-2:]
    left, top = 56, 16  # room for the shape and colour names
    canvas = Image.new("RGB", (left + len(cfg.grid_colors) * (w + 2 * pad), top + len(cfg.grid_shapes) * (h + 2 * pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, color in enumerate(cfg.grid_colors):
        draw.text((left + j * (w + 2 * pad) + pad, 2), color, fill="black")
    for i, shape in enumerate(cfg.grid_shapes):
        draw.text((2, top + i * (h + 2 * pad) + h // 2), shape, fill="black")
        for j in range(len(cfg.grid_colors)):
            k = i * len(cfg.grid_colors) + j
            x0, y0 = left + j * (w + 2 * pad), top + i * (h + 2 * pad)
            draw.rectangle([x0, y0, x0 + w + 2 * pad - 1, y0 + h + 2 * pad - 1], fill=(0, 170, 0) if right[k] else (220, 0, 0))
            canvas.paste(tiles[k], (x0 + pad, y0 + pad))
    return canvas


# -------------------------------------------------------------------------------------------- driver
def main(cfg: EvalImageConfig, out: str | Path = "outputs", progress: bool = True) -> Path:
    """Load the judge and the prior, generate the grid, judge it, write the run directory."""
    device = pick_device(cfg.device)
    timer = Timer()
    judge = load_judge(cfg.judge, device)  # before the prior: a missing judge fails in a second, not a minute
    with timer("load"):
        prior = Prior.from_options(cfg, device)
    cfg.image_size(prior.default_size, prior.vae_scale_factor)  # fail on a bad size before writing anything
    with RunDir.create(out, "eval", "image") as run:  # a run that fails removes its folder
        run.write_config(cfg)
        prompts = prompt_grid(cfg)
        with timer("generate"):
            images = generate_all(prior, prompts, cfg, progress)
        with timer("judge"):
            predicted = judge.predict(images)
        report = build_report(prompts, cfg, predicted, judge.metrics)
        run.write_json("report.json", report)
        run.write_text("report.md", markdown(report))
        save_image(run / "grid.png", grid_image(images, report["grid"], cfg))
        run.write_metadata(job="eval image", model=prior.model_id, model_hash=prior.content_hash(), judge=cfg.judge,
                           judge_hash=content_hash(judge.folder), seed=cfg.seed, images=len(images), device=str(device),
                           dtype=str(prior.dtype).removeprefix("torch."), height=images.shape[-2], width=images.shape[-1],
                           timings_s=timer.stages)
        grid = report["grid"]
        logger.info("colour %.1f%%, shape %.1f%%, both %.1f%% right over %d images; report in %s",
                    100 * grid["color_accuracy"], 100 * grid["shape_accuracy"], 100 * grid["both_accuracy"],
                    grid["images"], run.path)
        return run.path
