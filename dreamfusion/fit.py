"""The 3D job: `python run.py 3d "a red cube"` -> mesh.obj / mesh.glb / mesh.ply + turntable videos.

DreamFusion (Poole et al. 2022): a NeRF rendered from random cameras under random shading is pulled by
score distillation towards what the frozen prior draws for the prompt plus a view suffix. The parts stay
apart: the field (`field`), the renderer (`renderer`), the guidance (`guidance`: SDS through
`Prior.predict_noise`). This module wires them into one objective, trains it with the trainers' loop
(`pipelines.training.run_stage`: warm-up, cosine decay, checkpoints, resume, a time budget) and exports
the result (`export`). Step k's random draws come from a generator seeded by (seed, k), so `--resume`
continues exactly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from pipelines.config import changed, job_defaults
from pipelines.errors import UserError
from pipelines.loading import load_safetensors
from pipelines.media import save_image, to_pil, write_mp4
from pipelines.progress import Bar, check_cancelled
from pipelines.prior import Conditioning, Prior
from pipelines.rundir import RunDir
from pipelines.runtime import Timer, atomic_path, pick_device, write_json
from pipelines.training import (Stage, accelerator, checkpoint_folder, checkpoint_seconds, checkpoint_step, run_stage,
                                step_generator)

from .cameras import VIEWS, Cameras, camera_rays, orbit_cameras, sample_cameras, view_names, view_prompts
from .config import ThreeDConfig, resume_free
from .field import Background, NeRFField
from .guidance import SDS
from .renderer import make_renderer
from .shading import eval_shading, sample_shading, shade

logger = logging.getLogger(__name__)
STAGE = "3d"  # the fit's checkpoint folder
WEIGHTS_NAME = "asset.safetensors"


class Asset(nn.Module):
    """What the fit learns: the field and its background."""

    def __init__(self, cfg: ThreeDConfig):
        super().__init__()
        self.field = NeRFField(cfg.field)
        self.background = Background(cfg.field)


class ViewPrompts:
    """The prompt with each view suffix, embedded once; rows picked per camera (and Perp-Neg negatives)."""

    def __init__(self, prior: Prior, prompt: str, negative: str, cfg: ThreeDConfig):
        self.cfg = cfg
        texts = view_prompts(prompt, list(VIEWS))
        self.text = prior.encode_prompt(texts, [negative] * len(texts))  # (4, L, D): one row per view

    def rows(self, idx: torch.Tensor) -> Conditioning:
        return Conditioning(cond=self.text.cond[idx], uncond=self.text.uncond[idx])

    def for_cameras(self, cams: Cameras) -> tuple[Conditioning, list[Conditioning] | None]:
        """Per-camera prompts and, with Perp-Neg, two negatives per camera: the other horizontal views
        (an overhead camera gets its own prompt twice, whose perpendicular part is zero)."""
        names = view_names(cams.azimuth_deg, cams.elevation_deg, self.cfg.camera)
        idx = torch.tensor([VIEWS.index(n) for n in names])
        if not self.cfg.guidance.perp_neg:
            return self.rows(idx), None
        others = {0: (1, 2), 1: (0, 2), 2: (0, 1), 3: (3, 3)}
        negatives = [self.rows(torch.tensor([others[int(i)][j] for i in idx])) for j in range(2)]
        return self.rows(idx), negatives


class SDSObjective(nn.Module):
    """One step's loss: render B random cameras, score them with SDS, add the regularisers."""

    def __init__(self, asset: Asset, renderer, sds: SDS, prompts: ViewPrompts, cfg: ThreeDConfig):
        super().__init__()
        self.asset, self.renderer = asset, renderer
        self.sds, self.prompts, self.cfg = sds, prompts, cfg
        self.device = next(asset.parameters()).device

    def forward(self, step: int, progress: float, generator: torch.Generator) -> torch.Tensor:
        cfg, g, res, loss_cfg = self.cfg, generator, self.cfg.render.resolution, self.cfg.loss
        self.asset.field.anneal(progress)
        self.renderer.update(step, self.asset.field)  # before rendering, so a checkpoint holds the grid step k used
        cams = sample_cameras(cfg.batch_size, cfg.camera, g, self.device)
        shading = sample_shading(step, cfg.shading, cams, g)
        out = render(self.asset, self.renderer, cams, res, shading, cfg, train=True, generator=g)
        # clamped like every image the prior saw (a lit face can exceed 1: ambient + diffuse > 1)
        images = rearrange(out["rgb"], "(b h w) c -> b c h w", b=len(cams), h=res).clamp(0, 1)
        text, negatives = self.prompts.for_cameras(cams)
        loss, _ = self.sds.loss(images, text, progress, g, negatives)
        opacity = out["opacity"].clamp(1e-5, 1 - 1e-5)
        ramp = min(1.0, step / loss_cfg.orient_ramp) if loss_cfg.orient_ramp else 1.0
        if loss_cfg.orient:
            loss = loss + loss_cfg.orient * ramp * out["orientation"].sum() / opacity.gt(0.01).sum().clamp(min=1)
        if loss_cfg.entropy:
            entropy = -(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log())
            loss = loss + loss_cfg.entropy * entropy.mean()
        if loss_cfg.opacity:
            loss = loss + loss_cfg.opacity * opacity.mean()
        return loss


def render(asset: Asset, renderer, cams: Cameras, size: int, shading, cfg: ThreeDConfig, train: bool,
           generator: torch.Generator | None = None, chunk: int | None = None) -> dict:
    """Render every camera at size x size: the renderer's outputs for (B H W) rays."""
    origins, dirs = (rearrange(x, "b h w c -> (b h w) c") for x in camera_rays(cams, size))
    per_ray_light = shading.light.repeat_interleave(size * size, 0)  # (B H W, 3)
    ambient = cfg.shading.ambient if shading.ambient is None else shading.ambient
    diffuse = cfg.shading.diffuse if shading.diffuse is None else shading.diffuse

    def shading_fn(albedo, normals, points, ray_index):
        return shade(albedo, normals, points, per_ray_light[ray_index], shading.mode, ambient, diffuse)

    need_normals = shading.mode != "albedo" or (train and cfg.loss.orient > 0)
    return renderer.render_rays(origins, dirs, asset.field, asset.background, shading_fn, train=train,
                                generator=generator, need_normals=need_normals, chunk=chunk)


@torch.no_grad()
def render_views(asset: Asset, renderer, cams: Cameras, size: int, cfg: ThreeDConfig) -> torch.Tensor:
    """Evaluation renders (B, 3, size, size) in [0, 1], lit like ToyWorld's images (a light that follows the camera)."""
    out = render(asset, renderer, cams, size, eval_shading(cams), cfg, train=False, chunk=cfg.render.chunk)
    return rearrange(out["rgb"], "(b h w) c -> b c h w", b=len(cams), h=size).clamp(0, 1)


def turntable_cameras(n: int, cfg: ThreeDConfig, device, elevation: float | None = None) -> Cameras:
    """n cameras orbiting at the middle of the training distance and field of view."""
    elevation = cfg.export.turntable_elevation if elevation is None else elevation
    return orbit_cameras(n, elevation, sum(cfg.camera.distance_range) / 2, sum(cfg.camera.fov_range) / 2, device)


# ------------------------------------------------------------------------------------------- runs
def resolve_run(cfg: ThreeDConfig, prompt: str | None) -> tuple[RunDir | None, ThreeDConfig, str]:
    """The config and prompt to fit: these, or for `resume` the run's saved ones (overrides must not
    conflict with them). Checks everything before anything is loaded or written."""
    if cfg.resume is None:
        if prompt is None:
            raise UserError("3d needs a prompt, e.g. python run.py 3d \"a red cube\" (or --resume RUN_DIR)")
        return None, cfg, prompt
    run = RunDir.existing(cfg.resume, "3d")
    if fitted_steps(run.path) == 0:
        raise UserError(f"--resume {run.path}: the run holds no checkpoint to continue from")
    saved_prompt = run.config().get("prompt")
    if prompt is not None and prompt != saved_prompt:
        raise UserError(f"--resume {run.path}: the run's prompt is \"{saved_prompt}\", not \"{prompt}\"")
    return run, resumed_config(run, cfg), saved_prompt


def resumed_config(run: RunDir, cfg, section: str = "3d"):
    """The options to continue `run` with: its saved ones, plus those given now that may change on resume
    (export settings, budgets, the fast path); any other option given now that differs is an error."""
    return run.resumed(type(cfg), changed(cfg, job_defaults(type(cfg), section)), resume_free)


def fitted_steps(run_dir: Path) -> int:
    """The steps a 3d run's last checkpoint holds (0 without one)."""
    return checkpoint_step(Path(run_dir), STAGE)


def main(cfg: ThreeDConfig, prompts: list[str] | None, out: str | Path = "outputs", progress: bool = True) -> list[Path]:
    if prompts and len(prompts) > 1 and cfg.resume:
        raise UserError("--resume continues one run; give no prompt or the run's own")
    return [fit(cfg, p, out, progress) for p in (prompts or [None])]


def fit(cfg: ThreeDConfig, prompt: str | None, out: str | Path = "outputs", progress: bool = True,
        prior: Prior | None = None) -> Path:
    """Fit and export one asset into a new run folder under `out` (or continue `cfg.resume`); `prior`: one
    already loaded with `cfg`'s model options (the 4d job's static stage shares its own)."""
    from .export import check_resolution

    timer, started = Timer(), time.monotonic()
    run, cfg, prompt = resolve_run(cfg, prompt)
    check_resolution(cfg.export.mesh_resolution)  # before hours of fitting, not after
    device = pick_device(cfg.device)
    with timer("load"):
        prior = prior or Prior.from_options(cfg, device)
    if run is None:
        with RunDir.create(out, "3d", prompt) as run:  # a failed write removes the folder
            run.write_config(cfg, prompt=prompt)
    run.keep = lambda: fitted_steps(run.path) > 0  # a failed new run keeps its folder only to resume from
    with run:
        accel = accelerator(str(device), cfg.mixed_precision)

        torch.manual_seed(cfg.seed)
        asset = Asset(cfg).to(device)
        renderer = make_renderer(device, cfg.render, cfg.field.bound)
        objective = SDSObjective(asset, renderer, SDS(prior, cfg.guidance), ViewPrompts(prior, prompt, cfg.negative, cfg), cfg)
        val_cams = turntable_cameras(4, cfg, device, elevation=20.0)

        def batch(step: int) -> dict:
            return {"step": step, "progress": step / cfg.steps, "generator": step_generator(cfg.seed, STAGE, step, 0)}

        def after_step(step: int) -> None:
            if cfg.val_every and (step + 1) % cfg.val_every == 0:
                views = render_views(asset, renderer, val_cams, cfg.render.resolution, cfg)
                save_image(run / "val" / f"step_{step + 1:06d}.png", to_pil(rearrange(views, "b c h w -> 1 c h (b w)"))[0])

        log_file, log = run / "losses.json", []  # a resume gets the log from its checkpoint
        deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
        timer.stages["fit"] = checkpoint_seconds(run.path, STAGE)  # a resumed fit counts its earlier sessions too
        with timer("fit"):
            done = run_stage(accel, Stage(STAGE, cfg.steps, cfg.lr, deadline), objective, list(asset.parameters()),
                             batch, cfg, run.path, fitted_steps(run.path), progress=progress, log=log,
                             after_step=after_step, adam_eps=1e-15)
        write_json(log_file, log)
        check_cancelled()  # a Cancel during the last step stops here, before the export, as Ctrl-C would
        save_asset(asset, run / WEIGHTS_NAME)
        with timer("export"):
            files = export_asset(asset, renderer, cfg, run.path, progress=progress)
        run.write_metadata(prompt=prompt, steps=done, model=prior.model_id, model_hash=prior.content_hash(),
                           device=str(device), mixed_precision=accel.mixed_precision, timings_s=timer.stages,
                           files={k: str(Path(v).name) for k, v in files.items()})
        logger.info("3d asset written to %s", run.path)
        return run.path


@torch.no_grad()
def export_asset(asset: Asset, renderer, cfg: ThreeDConfig, folder: Path, progress: bool = True) -> dict[str, Path]:
    """Mesh files and both turntables of a trained asset into `folder` (nothing is written if the mesh fails)."""
    from .export import render_mesh, write_meshes

    out = cfg.export
    device = next(asset.parameters()).device
    mesh, level = asset_mesh(asset, renderer, cfg)
    files = write_meshes(mesh, folder, out.formats)
    cams = turntable_cameras(out.turntable_frames, cfg, device)
    chunks = range(0, len(cams), 8)
    nerf = torch.cat([render_views(asset, renderer, cams[i:i + 8], out.turntable_size, cfg)
                      for i in Bar(chunks, desc="turntable", disable=not progress, leave=False)]).cpu()
    files["turntable"] = write_mp4(folder / "turntable.mp4", nerf, out.turntable_fps)
    pose = [x.cpu() for x in (cams.azimuth_deg, cams.elevation_deg, cams.distance, cams.fov_deg)]
    meshes = torch.cat([render_mesh(mesh, *(x[i:i + 8] for x in pose), out.turntable_size)
                        for i in Bar(chunks, desc="mesh turntable", disable=not progress, leave=False)])
    files["mesh_turntable"] = write_mp4(folder / "mesh_turntable.mp4", meshes, out.turntable_fps)
    write_json(folder / "mesh.json", {"iso_level": level, "automatic": out.iso_level is None, "vertices": len(mesh.vertices),
                                      "faces": len(mesh.faces), "watertight": bool(mesh.is_watertight),
                                      "mesh_resolution": out.mesh_resolution})
    return files


@torch.no_grad()
def asset_mesh(asset: Asset, renderer, cfg: ThreeDConfig, level: float | None = None):
    """The asset's coloured mesh (trimesh, world frame) at `level`, else `export.iso_level`, else the level whose
    mesh silhouette best matches the NeRF's over 8 views; and the level used."""
    from .export import auto_iso_level, check_resolution, density_grid, extract_mesh, max_density_along_rays

    out = cfg.export
    check_resolution(out.mesh_resolution)
    device = next(asset.parameters()).device
    field, bound = asset.field, cfg.field.bound
    level = out.iso_level if level is None else level
    if level is None:
        cams = turntable_cameras(8, cfg, device)
        origins, dirs = (rearrange(x, "b h w c -> (b h w) c") for x in camera_rays(cams, cfg.render.resolution))
        albedo_only = lambda albedo, normals, points, ray_index: albedo  # noqa: E731  (opacity needs no shading)
        opacity = renderer.render_rays(origins, dirs, field, asset.background, albedo_only,
                                       chunk=cfg.render.chunk)["opacity"]
        level = auto_iso_level(max_density_along_rays(field, origins, dirs, bound), opacity)
        logger.info("automatic iso-level: %.3g", level)
    grid = density_grid(field, out.mesh_resolution, bound, device=device)
    mesh = extract_mesh(grid, bound, level, albedo_fn=lambda v: field(v)[1], keep_components=out.keep_components,
                        device=device)
    return mesh, level


def save_asset(asset: Asset, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in asset.state_dict().items()}, str(tmp))


def load_asset(run_dir: Path, cfg: ThreeDConfig, device) -> Asset:
    """The run's final asset, or its last checkpoint's (for `export` on an unfinished run)."""
    asset = Asset(cfg)
    final, ckpt = run_dir / WEIGHTS_NAME, checkpoint_folder(run_dir, STAGE) / "model.safetensors"
    source = final if final.is_file() else ckpt
    if not source.is_file():
        raise UserError(f"{run_dir} holds no field: neither {WEIGHTS_NAME} nor a checkpoint (run `python run.py 3d` first)")
    state = load_safetensors(source)  # truncated or corrupt: one line naming the file
    if source == ckpt:
        state = {k[len("asset."):]: v for k, v in state.items() if k.startswith("asset.")}
    try:
        result = asset.load_state_dict(state, strict=False)
        mismatch = result.missing_keys + result.unexpected_keys
    except RuntimeError as err:  # a tensor of another shape
        mismatch = [str(err).splitlines()[-1].strip()]
    if mismatch:
        raise UserError(f"{run_dir}'s field does not fit its config's field options ({mismatch[0]}): its "
                        "config.yaml no longer says how the field was made (edited, or made by another version)")
    return asset.to(device)
