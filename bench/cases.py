"""The benchmark cases: our pipelines against diffusers' on the same weights, seed, shapes and steps.

A `Case` holds two zero-argument callables, `ours` and `peer` (None when there is no peer), each
producing the case's output in [0, 1] from a freshly seeded CPU generator, so both sides draw the
same initial noise and the harness can check that they agree (`max_abs_diff`).

Sizes: `small` loads the shipped ToyWorld prior (or `model=`, which tests use for tiny random
weights) in fp32 at its native size; `full` builds SD-1.5-sized random-weight components (as
../shared/peers/animatediff_sds_nerfacc.py does) at 512x512 in fp16 on CUDA (fp32 on CPU).
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pipelines import config
from pipelines.image import generate as generate_image
from pipelines.options import ImageConfig, PriorOptions
from pipelines.prior import Prior
from video.config import VideoConfig
from video.pipeline import VideoModel, load_motion, run as run_video

REPO = Path(__file__).resolve().parent.parent
IMAGE_PROMPT = "a red cube"
VIDEO_PROMPT = "a red ball moving right"


@dataclass
class Setting:
    """What both sides of every case compute (the spec's shapes and step counts)."""

    steps: int = 25
    guidance: float = 7.5
    frames: int = 16
    seed: int = 0
    resolution: Optional[int] = None  # pixels; None: the model's native size
    compile: bool = False  # ours with torch.compile too (its compile time shows in the warm-up)
    cuda_graphs: bool = False  # with compile on CUDA: reduce-overhead mode (CUDA graphs)
    baseline: Optional[str] = None  # a git ref: the 3d-asset case's peer is this repository at that commit


SETTINGS = {"small": Setting(), "full": Setting(resolution=512)}


@dataclass
class Case:
    name: str
    ours: Callable[[], object]
    peer: Optional[Callable[[], object]]
    meta: dict = field(default_factory=dict)  # shapes, steps, dtype, model, peer pipeline, target
    warmup: bool = True  # False: every run is timed (a fresh process each run has nothing to warm)


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the process exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return Path(path)


# ------------------------------------------------------------------------------------------ the prior
@functools.lru_cache(maxsize=2)
def shared_prior(size: str, device: str, model: Optional[str] = None) -> Prior:
    """The prior the `image` and `video` cases share (loaded once per run)."""
    if size == "small":
        return Prior.from_pretrained(model or "toyworld", device, torch.float32)
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return Prior(sd15_random_components(device), torch.device(device), dtype, model_id="random SD-1.5-sized weights")


def sd15_random_components(device: str) -> dict:
    """SD-1.5-shaped UNet (860M), VAE and CLIP text encoder with random weights; nothing is downloaded.
    The tokenizer is tests/tiny.py's character-level CLIP tokenizer: prompts are padded to 77 tokens,
    so the text encoder does SD-1.5's work."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny import make_clip_tokenizer

    tokenizer = make_clip_tokenizer(scratch_dir("bench-tokenizer-"))
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: random init of 1B parameters on CPU is slow
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, max_position_embeddings=77, projection_dim=768,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # SD-1.5's
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def fast_path(prior: Prior, s: Setting, modules: tuple[str, ...] = ("unet", "vae"), denoiser=None) -> Prior:
    """A view of `prior` whose `modules` are copies with the jobs' fast path on (the defaults of
    PriorOptions: fused q/k/v, channels_last on CUDA; compile and cuda_graphs as the setting asks), so a peer sharing
    `prior`'s modules stays plain; `denoiser` (a video UNet of its own) gets the fast path in the UNet's place."""
    fast = copy.copy(prior)
    for name in modules:
        setattr(fast, name, copy.deepcopy(getattr(prior, name)))
    defaults = PriorOptions()
    return fast.speed_up(defaults.fuse_qkv, defaults.channels_last, s.compile, s.cuda_graphs, denoiser=denoiser)


def _meta(prior: Prior, s: Setting, height: int, width: int, **extra) -> dict:
    return {"model": prior.model_id, "dtype": str(prior.dtype).removeprefix("torch."), "height": height,
            "width": width, "steps": s.steps, "sampler": "ddim", "guidance": s.guidance, "seed": s.seed,
            "compile": s.compile, "cuda_graphs": s.cuda_graphs, **extra}


# --------------------------------------------------------------------------------------------- image
def image_case(size: str, device: str, model: Optional[str] = None, s: Optional[Setting] = None) -> Case:
    """pipelines.image.generate (what `run.py image` runs) vs diffusers' StableDiffusionPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    s = s or SETTINGS[size]
    prior = shared_prior(size, device, model)
    cfg = ImageConfig(sampler="ddim", steps=s.steps, guidance=s.guidance, height=s.resolution, width=s.resolution,
                      num_images=1)
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)
    pipe = StableDiffusionPipeline(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                                   unet=prior.unet, scheduler=DDIMScheduler.from_config(prior.noise_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    fast = fast_path(prior, s)

    def ours():
        return generate_image(fast, IMAGE_PROMPT, cfg, generator(s.seed), progress=False)  # (1, 3, H, W)

    def peer():
        return pipe(IMAGE_PROMPT, height=height, width=width, num_inference_steps=s.steps, guidance_scale=s.guidance,
                    generator=generator(s.seed), output_type="pt").images  # (1, 3, H, W)

    return Case("image", ours, peer, _meta(prior, s, height, width, images=1, peer="diffusers' StableDiffusionPipeline"))


# --------------------------------------------------------------------------------------------- video
def motion_adapter(unet_config, size: str):
    """`full`: AnimateDiff's default MotionAdapter (453M, fits SD-1.5). `small`: a random one sized to the
    prior's UNet, its zero-initialised outputs perturbed (as tests/test_animatediff.py) so it does something."""
    from diffusers import MotionAdapter

    torch.manual_seed(0)
    if size == "full":
        return MotionAdapter()
    channels = tuple(unet_config.block_out_channels)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=unet_config.layers_per_block,
                            motion_norm_num_groups=unet_config.norm_num_groups,
                            motion_num_attention_heads=max(1, min(8, channels[0] // 8)))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return adapter


def video_case(size: str, device: str, model: Optional[str] = None, s: Optional[Setting] = None,
               sampler: str = "ddim", steps: Optional[int] = None) -> Case:
    """VideoModel.generate with a MotionAdapter loaded by `motion=FOLDER` (load_motion) vs diffusers'
    AnimateDiffPipeline with the same UNet and the same adapter folder. The peer always runs the setting's
    DDIM steps; `sampler`/`steps` change ours only (the fewer-steps row, `video-dpm`)."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    s = s or SETTINGS[size]
    prior = shared_prior(size, device, model)
    cfg = VideoConfig(sampler=sampler, steps=steps or s.steps, guidance=s.guidance, frames=s.frames,
                      height=s.resolution, width=s.resolution)
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)
    adapter = motion_adapter(prior.unet.config, size)
    with tempfile.TemporaryDirectory(prefix="bench-motion-") as folder:  # both sides load the same files
        adapter.to(prior.dtype).save_pretrained(folder, safe_serialization=True)
        del adapter
        video_unet = load_motion(prior, folder)  # its own UNetMotionModel; the text encoder is shared
        model = VideoModel(fast_path(prior, s, ("vae",), denoiser=video_unet), video_unet, folder)
        pipe = AnimateDiffPipeline(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                                   unet=prior.unet, motion_adapter=MotionAdapter.from_pretrained(folder),
                                   scheduler=DDIMScheduler.from_config(prior.noise_config))
    pipe.to(device=prior.device, dtype=prior.dtype)  # the new UNetMotionModel; shared parts already are
    pipe.set_progress_bar_config(disable=True)

    def ours():
        return model.generate(VIDEO_PROMPT, cfg, generator(s.seed), progress=False)  # (F, 3, H, W)

    def peer():
        return pipe(VIDEO_PROMPT, num_frames=s.frames, height=height, width=width, num_inference_steps=s.steps,
                    guidance_scale=s.guidance, generator=generator(s.seed), output_type="pt").frames[0]  # (F, 3, H, W)

    params = sum(p.numel() for p in pipe.motion_adapter.parameters())
    meta = _meta(prior, s, height, width, frames=s.frames, peer="diffusers' AnimateDiffPipeline",
                 motion=f"MotionAdapter ({params / 1e6:.1f}M params, random)")
    if (sampler, cfg.steps) == ("ddim", s.steps):
        return Case("video", ours, peer, meta)
    meta.update(sampler=sampler, steps=cfg.steps, peer_sampler="ddim", peer_steps=s.steps)
    return Case(f"video-{sampler.replace('+', '')}", ours, peer, meta)


FEWER_STEPS = 12  # DPM-Solver++ (2M) steps of the fewer-steps row; the issue asks for 10-15


def video_dpm_case(size: str, device: str, model: Optional[str] = None, s: Optional[Setting] = None) -> Case:
    """The fewer-steps axis, never mixed into the equal-steps ratio: ours with DPM-Solver++ at FEWER_STEPS
    steps against the same AnimateDiffPipeline at the setting's 25 DDIM steps. The outputs differ by design,
    and pixel distance between solvers says little about quality (DPM-Solver++ ends at sigma 0, DDIM at
    alpha_bar[0]): `eval video sampler=dpm++ steps=12` scores that."""
    return video_case(size, device, model, s, sampler="dpm++", steps=FEWER_STEPS)


def toyworld_video_case(size: str, device: str, model: Optional[str] = None, s: Optional[Setting] = None) -> Case:
    """`python run.py video "a red ball moving right"` on ToyWorld after loading: the job's defaults, the
    preset's temporal layers, generation and the mp4/gif export.
    No peer. Same in both sizes; `model` and `s` are ignored (the job's own defaults are the point)."""
    cfg = config.load(VideoConfig, None, [f"device={device}"])
    model = VideoModel.load(cfg)
    prior, motion = model.prior, model.motion
    height, width = cfg.image_size(prior.default_size, prior.vae_scale_factor)
    out = scratch_dir("bench-video-")  # run directories of the timed runs

    def ours():
        return run_video(model, VIDEO_PROMPT, cfg, cfg.seed, out, model_hash="", setup_s={}, progress=False)

    setting = Setting(steps=cfg.steps, guidance=cfg.guidance, frames=cfg.frames, seed=cfg.seed)
    return Case("video-toyworld", ours, None, _meta(
        prior, setting, height, width, frames=cfg.frames, fps=cfg.fps, peer=None,
        motion=motion or "identity temporal layers (the preset names none)",
        includes="generation + mp4/gif export (model loading excluded)", target_s=30.0,
        target="≤ 30 s on 2 CPU cores"))


# ------------------------------------------------------------------------------------------------ 3d
def sds_case(size: str, device: str, model: Optional[str] = None, s: Optional[Setting] = None) -> Case:
    """One step of `run.py 3d`'s objective (render the cameras, VAE encode, guided UNet, backward into the
    field) vs the same step written naively, as threestudio and ../shared/peers write it, on the same field,
    cameras and renderer. `small`: the ToyWorld recipe (configs/models/toyworld.yaml); `full`: the published
    SD recipe (the dataclass defaults: 64 px renders encoded at 512) on SD-1.5-sized random weights."""
    import torch.nn.functional as F
    from einops import rearrange

    from dreamfusion.cameras import sample_cameras
    from dreamfusion.config import ThreeDConfig
    from dreamfusion.fit import Asset, SDSObjective, ViewPrompts, render
    from dreamfusion.guidance import SDS
    from dreamfusion.renderer import make_renderer
    from dreamfusion.shading import sample_shading

    s = s or SETTINGS[size]
    prior = shared_prior(size, device, model)
    cfg = config.load(ThreeDConfig, "3d", [f"device={device}"] + (["model=sd15"] if size == "full" else []))
    torch.manual_seed(0)
    asset = Asset(cfg).to(device)
    renderer = make_renderer(torch.device(device), cfg.render, cfg.field.bound)
    prompts = ViewPrompts(prior, IMAGE_PROMPT, "", cfg)
    objective = SDSObjective(asset, renderer, SDS(fast_path(prior, s), cfg.guidance), prompts, cfg)
    step = cfg.shading.ambient_only_steps + 1  # past the warm-up: shaded renders, normals
    res = cfg.render.resolution

    def ours():
        asset.zero_grad(set_to_none=True)
        objective(step, 0.5, generator(0)).backward()

    def peer():
        asset.zero_grad(set_to_none=True)
        g = generator(0)
        cams = sample_cameras(cfg.batch_size, cfg.camera, g, device)
        out = render(asset, renderer, cams, res, sample_shading(step, cfg.shading, cams, g), cfg, train=True, generator=g)
        images = rearrange(out["rgb"], "(b h w) c -> b c h w", b=cfg.batch_size, h=res)
        size_px = cfg.guidance.encode_size or prior.default_size
        images = F.interpolate(images, (size_px, size_px), mode="bilinear", align_corners=False)
        latents = prior.vae.encode((images * 2 - 1).to(prior.dtype)).latent_dist.sample() * prior.scaling_factor
        t = torch.randint(20, 980, (cfg.batch_size,), device=device)
        noise = torch.randn_like(latents)
        text, _ = prompts.for_cameras(cams)
        with torch.no_grad():
            x_t = prior.add_noise(latents.float(), noise.float(), t).to(prior.dtype)
            eps = prior.unet(torch.cat([x_t] * 2), torch.cat([t] * 2),
                             encoder_hidden_states=torch.cat([text.uncond, text.cond])).sample
        u, c = eps.float().chunk(2)
        w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
        (latents.float() * (w * (u + cfg.guidance.scale * (c - u) - noise.float())).detach()).sum().backward()

    setting = Setting(steps=1, guidance=cfg.guidance.scale, seed=0, compile=s.compile, cuda_graphs=s.cuda_graphs)
    return Case("sds", ours, peer, _meta(
        prior, setting, res, res, sampler="sds", batch=cfg.batch_size,
        encode_size=cfg.guidance.encode_size or prior.default_size,
        peer="a naive latent SDS step written as threestudio writes it (same field and renderer)",
        includes="field render + VAE encode + guided UNet + backward"))


ASSET_OPTIONS: list[str] = []  # extra `run.py 3d` options for the 3d-asset case (tests make it tiny)


def asset_case(size: str, device: str, model: Optional[str] = None, s: Optional[Setting] = None) -> Case:
    """`python run.py 3d "a red cube"` with the ToyWorld defaults, from start to the exported mesh and
    turntables, in a fresh process each run (imports and model loading are part of an asset's wall time).
    Each run's fit time per step comes from its metadata. With `--baseline REF` the peer is the same command
    in a git worktree of this repository at REF, interleaved with ours; without it there is no peer."""
    import subprocess

    from dreamfusion.config import ThreeDConfig

    if size != "small":
        raise SystemExit("the 3d-asset case runs at --size small (the ToyWorld default asset)")
    s = s or SETTINGS[size]
    options = [f"device={device}", *([f"model={model}"] if model else []), *ASSET_OPTIONS]
    cfg = config.load(ThreeDConfig, "3d", options)
    meta = {"model": model or "toyworld", "steps": cfg.steps, "height": cfg.render.resolution,
            "width": cfg.render.resolution, "peer": None, "sampler": "sds", "guidance": cfg.guidance.scale,
            "dtype": "float32", "includes": "process start + load + fit + marching cubes + OBJ/GLB/PLY + both turntables",
            "target_s": 150.0, "target": "≤ 150 s on 2 CPU cores"}

    def side(name: str, root: Path):
        out, per_step = scratch_dir(f"bench-3d-{name}-"), meta.setdefault(f"{name}_step_runs_s", [])

        def job():
            before = set(out.glob("3d/*"))
            with tempfile.TemporaryFile("w+") as err:
                proc = subprocess.Popen([sys.executable, "run.py", "3d", IMAGE_PROMPT, *options, "--out", str(out),
                                         "--quiet"], cwd=root, stdout=subprocess.DEVNULL, stderr=err, text=True)
                # wait4, not wait: the job's own peak RSS (this process's memory never sees the job's)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                err.seek(0)
                stderr = err.read()
            if proc.returncode != 0:
                raise RuntimeError(f"the 3d job ({name}) failed: {(stderr.strip().splitlines() or ['?'])[-1]}")
            kib = 1 if sys.platform != "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
            peak = meta.setdefault(f"{name}_peak_rss_mib", 0.0)
            meta[f"{name}_peak_rss_mib"] = max(peak, round(usage.ru_maxrss / kib / 1024, 1))
            [run_dir] = set(out.glob("3d/*")) - before
            metadata = json.loads((run_dir / "metadata.json").read_text())
            per_step.append(metadata["timings_s"]["fit"] / metadata["steps"])
            meta[f"{name}_step_s"] = statistics.median(per_step)
        return job

    peer = None
    if s.baseline is not None:
        tree, commit = baseline_tree(s.baseline)
        peer, meta["baseline"] = side("peer", tree), f"{s.baseline} ({commit[:10]})"
    return Case("3d-asset", side("ours", REPO), peer, meta, warmup=False)


def baseline_tree(ref: str) -> tuple[Path, str]:
    """A detached git worktree of this repository at `ref` (removed when the process exits), and its commit."""
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO, capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {ref}: not a commit of this repository")
    path = scratch_dir("bench-baseline-") / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), commit.stdout.strip()], cwd=REPO,
                   check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
    return path, commit.stdout.strip()


CASES = {"image": image_case, "video": video_case, "video-dpm": video_dpm_case, "video-toyworld": toyworld_video_case,
         "sds": sds_case, "3d-asset": asset_case}
