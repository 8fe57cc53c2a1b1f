"""The 4d job: `python run.py 4d "a red ball moving right"` -> a moving 3D asset (Make-A-Video3D, Singer et al. 2023).

1. Static: the 3D job's fit (`dreamfusion.fit.fit`, image SDS into a NeRF) runs as it is, into the run's
   `3d/` folder (or `static=RUN` names a finished 3d run to animate).
2. Dynamic: the static field is frozen, and a deformation field (`fourd.field`) learns how it moves. Each
   step renders one clip, F frames from one camera at times t_1 ... t_F, and scores it with video SDS through
   the prior's UNet inflated with temporal layers (ours, or an AnimateDiff adapter), passed to the prior as
   its denoiser. A smoothness penalty on the motion over frames and an L1 penalty on the local deformation
   hold off flicker and drift. MAV3D's third stage (image SDS on single frames, against blur) has nothing
   to do here: the appearance is the frozen static field's.

Cameras and motion words: the world is the 3D job's (+z up; the front camera at azimuth 0 sits on +x, and its
image right is +y). Motion words are camera-relative, so the clip cameras stay around the front
(`dynamic.azimuth_range`): "moving right" moves the asset towards +y, "up" towards +z.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from dreamfusion.cameras import Cameras, orbit_cameras, sample_cameras
from dreamfusion.config import ThreeDConfig
from dreamfusion.fit import Asset, asset_mesh, fit as fit_static, load_asset, render, render_views, turntable_cameras
from dreamfusion.guidance import SDS
from dreamfusion.renderer import BatchedRenderer, make_renderer
from dreamfusion.shading import eval_shading
from pipelines.config import changed, job_defaults
from pipelines.errors import UserError
from pipelines.loading import preset_folder
from pipelines.media import save_image, to_pil, write_mp4
from pipelines.progress import Bar, check_cancelled
from pipelines.prior import Prior
from pipelines.rundir import RunDir
from pipelines.runtime import Timer, atomic_path, pick_device, write_json
from pipelines.training import (Stage, accelerator, checkpoint_seconds, checkpoint_step, run_stage,
                                step_generator)
from video.pipeline import load_motion

from .config import FourDConfig, resume_free
from .field import GLOBAL, AnyFrame, FrameField, MotionField

logger = logging.getLogger(__name__)
STAGE = "4d"  # the dynamic stage's checkpoint folder
MOTION_NAME = "motion.safetensors"


class Posed:
    """A frame of the 4D asset as the renderer's helpers take an asset: a field and the background."""

    def __init__(self, field: FrameField, background: nn.Module):
        self.field, self.background = field, background


class Dynamic(nn.Module):
    """What the dynamic stage holds: the frozen static asset and the motion field it learns."""

    def __init__(self, asset: Asset, cfg: FourDConfig):
        super().__init__()
        self.asset = asset.requires_grad_(False)
        self.motion = MotionField(cfg.dynamic.hidden, cfg.field.bound)

    def frame(self, tau: float) -> Posed:
        return Posed(FrameField(self.asset.field, self.motion, tau), self.background)

    def background(self, dirs, train: bool, generator):
        """The static asset's background, the same in every frame of a clip: a `random` one is drawn per render
        call, which would flash from frame to frame, so clips get its evaluation grey."""
        random = self.asset.background.mode == "random"
        return self.asset.background(dirs, train and not random, generator)


def frame_times(frames: int) -> list[float]:
    """The clip's F times tau, evenly from -1 to 1: the middle, 0, is where the asset is the static one."""
    return torch.linspace(-1, 1, frames).tolist()


def clip_cameras(cfg: FourDConfig, generator: torch.Generator, device) -> Cameras:
    """One camera around the front, at the static stage's distances and fields of view."""
    dyn = cfg.dynamic
    return sample_cameras(1, dataclasses.replace(cfg.camera, azimuth_range=dyn.azimuth_range,
                                                 elevation_range=dyn.elevation_range), generator, device)


class VideoSDSObjective(nn.Module):
    """One step's loss: render a clip (F frames, one camera), video SDS, plus the smoothness and local penalties."""

    def __init__(self, dynamic: Dynamic, renderer, sds: SDS, text, unet: nn.Module, cfg: FourDConfig):
        super().__init__()
        self.dynamic, self.renderer = dynamic, renderer
        self.sds, self.text, self.unet, self.cfg = sds, text, unet, cfg
        self.taus = frame_times(cfg.dynamic.frames)
        self.device = next(dynamic.motion.parameters()).device

    def forward(self, step: int, progress: float, generator: torch.Generator) -> torch.Tensor:
        cfg, dyn, res = self.cfg, self.cfg.dynamic, self.cfg.render.resolution
        frames = [self.dynamic.frame(tau) for tau in self.taus]
        self.renderer.update(step, AnyFrame([f.field for f in frames]))  # the grid holds the asset at every frame
        cams = clip_cameras(cfg, generator, self.device)
        shading = eval_shading(cams)  # lit as the video prior's clips were
        clip = torch.cat([rearrange(render(f, self.renderer, cams, res, shading, cfg, train=True, generator=generator)["rgb"],
                                    "(h w) c -> 1 c h w", h=res) for f in frames]).clamp(0, 1)  # (F, 3, H, W)
        loss, _ = self.sds.loss(clip, self.text, progress, generator, frames=dyn.frames, denoiser=self.unet, fps=dyn.fps)
        loss = loss / dyn.frames  # per frame, the 3D job's scale
        path = self.dynamic.motion.global_motion(torch.tensor(self.taus, device=self.device))  # (F, 5)
        loss = loss + dyn.smooth * (path[2:] - 2 * path[1:-1] + path[:-2]).square().sum(-1).mean()
        offsets = [o for f in frames for o in f.field.offsets]
        if dyn.local and offsets:
            loss = loss + dyn.local * torch.cat(offsets).abs().sum(-1).mean()
        return loss


# ------------------------------------------------------------------------------------------- runs
def resolve_run(cfg: FourDConfig, prompt: str | None) -> tuple[RunDir | None, FourDConfig, str]:
    """The config and prompt to fit: these, or for `resume` the run's saved ones. Checks before anything loads."""
    if cfg.resume is None:
        if prompt is None:
            raise UserError("4d needs a prompt, e.g. python run.py 4d \"a red ball moving right\" (or --resume RUN_DIR)")
        return None, cfg, prompt
    run = RunDir.existing(cfg.resume, "4d")
    if "dynamic" not in run.config():
        raise UserError(f"--resume {run.path}: not a 4d run (its config.yaml is another job's)")
    saved_prompt = run.config().get("prompt")
    if prompt is not None and prompt != saved_prompt:
        raise UserError(f"--resume {run.path}: the run's prompt is \"{saved_prompt}\", not \"{prompt}\"")
    return run, run.resumed(FourDConfig, changed(cfg, job_defaults(FourDConfig, "4d")), resume_free), saved_prompt


def static_config(cfg: FourDConfig) -> ThreeDConfig:
    """The static stage's options: the 4d run's own, less the 4d ones."""
    return ThreeDConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ThreeDConfig) if f.name != "resume"})


def main(cfg: FourDConfig, prompts: list[str] | None, out: str | Path = "outputs", progress: bool = True) -> list[Path]:
    if prompts and len(prompts) > 1 and cfg.resume:
        raise UserError("--resume continues one run; give no prompt or the run's own")
    return [fit(cfg, p, out, progress) for p in (prompts or [None])]


def static_stage(cfg: FourDConfig, prompt: str, run: RunDir, prior: Prior, progress: bool) -> Path:
    """The finished 3d run the motion animates: `static=`, or the run's own 3d/ fit (continued if it stopped)."""
    if cfg.static is not None:
        return Path(cfg.static)
    started = sorted((run / "3d").glob("*/config.yaml"))
    resume = str(started[-1].parent) if started else None
    if resume and (Path(resume) / "metadata.json").is_file():
        return Path(resume)
    if resume and checkpoint_step(Path(resume), "3d") == 0:
        resume = None  # a fit that stopped before its first checkpoint starts again
    # the static fit gets half of a time budget, the motion stage the rest
    budget = None if cfg.max_minutes is None else cfg.max_minutes / 2
    static = dataclasses.replace(static_config(cfg), resume=resume, max_minutes=budget)
    return fit_static(static, None if resume else prompt, run.path, progress, prior=prior)


def fit(cfg: FourDConfig, prompt: str | None, out: str | Path = "outputs", progress: bool = True) -> Path:
    from dreamfusion.export import check_resolution

    timer, started = Timer(), time.monotonic()
    run, cfg, prompt = resolve_run(cfg, prompt)
    if cfg.static is not None:  # saved as an absolute path, so a resume from elsewhere finds it
        cfg = dataclasses.replace(cfg, static=str(Path(cfg.static).resolve()))
    check_resolution(cfg.export.mesh_resolution)
    device = pick_device(cfg.device)
    with timer("load"):
        prior = Prior.from_options(cfg, device, speed_up=False)  # an adapter is fitted to the UNet as it was made
        motion = cfg.motion or preset_folder(cfg.model, "motion")
        unet = load_motion(prior, motion)
        prior.speed_up(cfg.fuse_qkv, cfg.channels_last, cfg.compile, cfg.cuda_graphs, denoiser=unet)
    if run is None:
        with RunDir.create(out, "4d", prompt) as run:  # a failed write removes the folder
            run.write_config(cfg, prompt=prompt)
    run.keep = lambda: (checkpoint_step(run.path, STAGE) > 0  # something to resume from
                        or any(checkpoint_step(d, "3d") > 0 for d in (run / "3d").glob("*")))
    with run:
        with timer("static"):
            static_dir = static_stage(cfg, prompt, run, prior, progress)
        static_cfg = RunDir(static_dir).resumed(ThreeDConfig, {"device": cfg.device})
        accel = accelerator(str(device), cfg.mixed_precision)
        torch.manual_seed(cfg.seed)
        dynamic = Dynamic(load_asset(static_dir, static_cfg, device), static_cfg_for_render(cfg, static_cfg)).to(device)
        renderer = moving_renderer(cfg, static_cfg, device)
        guidance = dataclasses.replace(cfg.guidance, scale=cfg.dynamic.guidance, t_min=cfg.dynamic.t_range[0],
                                       t_max=cfg.dynamic.t_range[1], t_max_end=None, perp_neg=False)
        text = prior.encode_prompt([prompt], cfg.negative, words=True)
        objective = VideoSDSObjective(dynamic, renderer, SDS(prior, guidance), text, unet, static_cfg_for_render(cfg, static_cfg))

        def batch(step: int) -> dict:
            return {"step": step, "progress": step / cfg.dynamic.steps,
                    "generator": step_generator(cfg.seed, STAGE, step, 0)}

        log = []
        deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
        timer.stages["dynamic"] = checkpoint_seconds(run.path, STAGE)
        with timer("dynamic"):
            done = run_stage(accel, Stage(STAGE, cfg.dynamic.steps, cfg.dynamic.lr, deadline), objective,
                             list(dynamic.motion.parameters()), batch, cfg, run.path, checkpoint_step(run.path, STAGE),
                             progress=progress, log=log)
        write_json(run / "losses.json", log)
        check_cancelled()
        save_motion(dynamic.motion, run / MOTION_NAME)
        with timer("export"):
            files = export_4d(dynamic, renderer, objective.cfg, run.path, progress)
        run.write_metadata(prompt=prompt, steps=done, static=str(static_dir), model=prior.model_id,
                           model_hash=prior.content_hash(), motion=motion,
                           device=str(device), timings_s=timer.stages,
                           files={k: str(Path(v).relative_to(run.path)) for k, v in files.items()})
        logger.info("4d asset written to %s", run.path)
        return run.path


def moving_renderer(cfg: FourDConfig, static_cfg: ThreeDConfig, device):
    """The renderer of the moving asset: the static field's box grown by `dynamic.margin`, as densely sampled."""
    bound = static_cfg.field.bound
    grown = bound + cfg.dynamic.margin
    samples = round(cfg.render.samples_per_ray * grown / bound)
    return make_renderer(device, dataclasses.replace(cfg.render, samples_per_ray=samples), grown)


def static_cfg_for_render(cfg: FourDConfig, static_cfg: ThreeDConfig) -> FourDConfig:
    """The 4d options with the static run's field, so renders and meshes match the field it made."""
    return dataclasses.replace(cfg, field=static_cfg.field)


# ------------------------------------------------------------------------------------------- outputs
@torch.no_grad()
def export_4d(dynamic: Dynamic, renderer, cfg: FourDConfig, folder: Path,
              progress: bool = True) -> dict[str, Path]:
    """video.mp4 (front camera), orbit.mp4 (the camera circles while time runs), frames/frame_XXX.ply (world
    frame, vertex colours), mesh.glb (morph targets a glTF viewer plays) and motion.json (the global path)."""
    from .gltf import write_animated_glb

    out, dyn, device = cfg.export, cfg.dynamic, next(dynamic.motion.parameters()).device
    taus = frame_times(dyn.frames)
    if isinstance(renderer, BatchedRenderer):  # nerfacc's grid holds every frame from the training updates
        renderer.grid.refresh(AnyFrame([dynamic.frame(t).field for t in taus]))
    front = orbit_cameras(1, out.turntable_elevation, sum(cfg.camera.distance_range) / 2,
                          sum(cfg.camera.fov_range) / 2, device)
    clip = torch.cat([render_views(dynamic.frame(t), renderer, front, out.turntable_size, cfg)
                      for t in Bar(taus, desc="video", disable=not progress, leave=False)]).cpu()
    files = {"video": write_mp4(folder / "video.mp4", clip, dyn.fps)}
    cams = turntable_cameras(out.turntable_frames, cfg, device)
    orbit_taus = torch.linspace(-1, 1, len(cams)).tolist()
    orbit = torch.cat([render_views(dynamic.frame(t), renderer, cams[i:i + 1], out.turntable_size, cfg)
                       for i, t in enumerate(Bar(orbit_taus, desc="orbit", disable=not progress, leave=False))]).cpu()
    files["orbit"] = write_mp4(folder / "orbit.mp4", orbit, out.turntable_fps)
    save_image(folder / "frames.png", to_pil(rearrange(clip, "f c h w -> 1 c h (f w)"))[0])
    mesh, level = asset_mesh(dynamic.asset, renderer, cfg)
    meshes = []
    for k, tau in enumerate(taus):
        moved = mesh.copy()
        verts = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
        moved.vertices = dynamic.motion.to_world(verts, tau).cpu().double().numpy()
        meshes.append(moved)
        path = folder / "frames" / f"frame_{k:03d}.ply"
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as tmp:
            moved.export(tmp, file_type="ply")
        files[f"frame_{k:03d}"] = path
    files["glb"] = write_animated_glb(folder / "mesh.glb", mesh, meshes, dyn.fps)
    path = dynamic.motion.global_motion(torch.tensor(taus, device=device)).cpu()
    write_json(folder / "motion.json", {"fps": dyn.fps, "tau": taus, "iso_level": level, "watertight": bool(mesh.is_watertight),
                                        **{name: [round(float(v), 5) for v in path[:, i]] for i, name in enumerate(GLOBAL)}})
    return files


def save_motion(motion: MotionField, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in motion.state_dict().items()}, str(tmp))
