"""The 4d job: the deformation field, the animated GLB, video SDS, and the job end to end on tiny models."""

import json
import shutil

import numpy as np
import pytest
import torch
import trimesh

import run
from dreamfusion.config import FieldConfig
from dreamfusion.field import NeRFField
from fourd.field import AnyFrame, FrameField, MotionField
from fourd.gltf import read_frames, write_animated_glb
from tests.test_animatediff import save_adapter
from tests.test_dreamfusion_fit import TINY

TINY_4D = [*TINY, "dynamic.steps=3", "dynamic.frames=3", "dynamic.hidden=8"]


def _field() -> NeRFField:
    torch.manual_seed(0)
    return NeRFField(FieldConfig(encoding="frequency", frequencies=2, hidden=16, blob_radius=0.5))


def _moving(seed: int = 1) -> MotionField:
    torch.manual_seed(seed)
    motion = MotionField(hidden=16, bound=1.0)
    with torch.no_grad():
        for p in motion.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return motion


def test_a_fresh_motion_field_is_the_static_asset():
    static, motion = _field(), MotionField(hidden=16, bound=1.0)
    x = torch.rand(64, 3) * 2 - 1
    for tau in (-1.0, 0.3, 1.0):
        frame = FrameField(static, motion, tau)
        assert torch.equal(frame(x)[0], static(x)[0])
        assert torch.allclose(frame.normals(x), static.normals(x), atol=1e-6)


def test_the_middle_of_the_clip_is_the_static_asset_and_the_ends_move():
    static, motion = _field(), _moving()
    x = torch.rand(64, 3) * 2 - 1
    assert torch.allclose(FrameField(static, motion, 0.0)(x)[0], static(x)[0])
    assert not torch.allclose(FrameField(static, motion, 1.0)(x)[0], static(x)[0], atol=1e-3)
    assert motion.global_motion(torch.tensor([0.0])).abs().max() == 0


def test_to_world_inverts_to_canonical():
    motion = _moving()
    with torch.no_grad():  # a smaller local part, as the L1 penalty keeps it (the fixed point then converges)
        motion.local_net[-1].weight.mul_(0.1)
        motion.local_net[-1].bias.mul_(0.1)
    c = torch.rand(200, 3) - 0.5
    for tau in (-1.0, 0.5):
        back, _ = motion.to_canonical(motion.to_world(c, tau, iterations=12), tau)
        assert torch.allclose(back, c, atol=1e-4), (back - c).abs().max()


def test_the_grid_field_holds_every_frame():
    static, motion = _field(), _moving()
    frames = [FrameField(static, motion, t) for t in (-1.0, 0.0, 1.0)]
    x = torch.rand(100, 3) * 2 - 1
    union = AnyFrame(frames).query_density(x)
    for f in frames:
        assert (union >= f.query_density(x) - 1e-6).all()
    assert torch.equal(union, torch.stack([f.query_density(x) for f in frames]).amax(0))


def test_animated_glb_round_trip(tmp_path):
    base = trimesh.creation.icosphere(subdivisions=1)
    base.visual.vertex_colors = np.tile([200, 30, 30, 255], (len(base.vertices), 1)).astype(np.uint8)
    frames = []
    for k in range(4):
        m = base.copy()
        m.apply_translation([0.0, 0.2 * k, 0.0])
        m.apply_scale(1 + 0.1 * k)
        frames.append(m)
    path = write_animated_glb(tmp_path / "mesh.glb", base, frames, fps=4.0)
    got_base, got_frames, faces = read_frames(path)
    assert np.allclose(got_base, base.vertices, atol=1e-5)
    assert len(got_frames) == 4 and np.array_equal(faces, base.faces)
    for want, got in zip(frames, got_frames):
        assert np.allclose(got, want.vertices, atol=1e-5)
    import pygltflib

    gltf = pygltflib.GLTF2().load_binary(str(path))
    [anim] = gltf.animations
    assert anim.channels[0].target.path == "weights" and len(gltf.meshes[0].primitives[0].targets) == 4
    assert trimesh.load(path, force="mesh").vertices.shape == base.vertices.shape  # an ordinary reader takes it too


def test_video_sds_scores_whole_clips_in_one_denoiser_call():
    from dreamfusion.config import GuidanceConfig
    from dreamfusion.guidance import SDS
    from pipelines.prior import Conditioning

    class Prior:  # a stand-in: identity VAE, and a denoiser call that records what it saw
        num_train_timesteps, default_size = 1000, 8
        alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
        seen = []

        def encode_images(self, images, generator, chunk):
            return images

        def add_noise(self, x, noise, t):
            return x + noise

        def predict_noise(self, x_t, t, text, scale, **kw):
            self.seen.append((tuple(x_t.shape), tuple(t.shape), kw))
            return torch.zeros_like(x_t)

    prior = Prior()
    sds = SDS(prior, GuidanceConfig(scale=10.0, t_min=0.5, t_max=0.9, encode_size=8))
    clip = torch.rand(6, 3, 8, 8, requires_grad=True)  # 2 clips of 3 frames
    text = Conditioning(cond=torch.zeros(2, 4, 8), uncond=torch.zeros(2, 4, 8))
    loss, _ = sds.loss(clip, text, 0.0, torch.Generator().manual_seed(0), frames=3, denoiser="video unet", fps=4.0)
    [(shape, t_shape, kw)] = prior.seen
    assert shape == (2, 3, 3, 8, 8) and t_shape == (2,) and kw == {"denoiser": "video unet", "fps": 4.0}
    loss.backward()
    assert clip.grad.abs().sum() > 0


def _outputs_ok(run_dir, frames: int):
    meta = json.loads((run_dir / "metadata.json").read_text())
    for name in ("video.mp4", "orbit.mp4", "mesh.glb", "motion.json", "index.html", "config.yaml", "motion.safetensors"):
        assert (run_dir / name).is_file(), name
    plys = sorted((run_dir / "frames").glob("frame_*.ply"))
    assert len(plys) == frames
    _, glb_frames, _ = read_frames(run_dir / "mesh.glb")
    for ply, moved in zip(plys, glb_frames):  # the GLB's frames are the PLYs (world frame, vertex colours)
        mesh = trimesh.load(ply, force="mesh")
        assert np.allclose(mesh.vertices, moved, atol=1e-4)
        assert mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)
    return meta


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("adapters-4d") / "tiny-motion-adapter")


def test_4d_job_with_sd_layout_and_motion_adapter(tiny_sd, tiny_adapter, tmp_path):
    assert run.main(["4d", "a red ball moving right", f"model={tiny_sd}", f"motion={tiny_adapter}", *TINY_4D,
                     "--out", str(tmp_path)]) == 0
    [run_dir] = (tmp_path / "4d").iterdir()
    meta = _outputs_ok(run_dir, 3)
    assert meta["steps"] == 3 and (run_dir / "3d").is_dir() and meta["motion"] == str(tiny_adapter)
    # the motion moved the asset: its frames differ
    first, last = (trimesh.load(run_dir / "frames" / f"frame_{k:03d}.ply", force="mesh") for k in (0, 2))
    assert np.abs(first.vertices - last.vertices).max() > 0


def test_4d_job_animates_a_finished_3d_run_and_resumes(tiny_sd, tiny_3d_runs, tmp_path):
    import pipelines.training

    finished, _ = tiny_3d_runs
    static = shutil.copytree(finished, tmp_path / "static")
    args = ["4d", "a red cube moving up", f"model={tiny_sd}", f"static={static}", *TINY_4D, "dynamic.steps=4",
            "checkpoint_every=1"]
    assert run.main([*args, "--out", str(tmp_path / "whole")]) == 0
    one_step = pipelines.training._one_step

    def interrupted(accel, stage, *rest):
        if rest[-3] == 2:
            raise KeyboardInterrupt
        return one_step(accel, stage, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines.training, "_one_step", interrupted)
        assert run.main([*args, "--out", str(tmp_path / "stopped")]) == 130
    [stopped] = (tmp_path / "stopped" / "4d").iterdir()
    assert not (stopped / "3d").exists()  # static= is animated where it is, not fitted again
    assert run.main(["4d", "--resume", str(stopped), "--quiet"]) == 0
    [whole] = (tmp_path / "whole" / "4d").iterdir()
    a, b = (json.loads((d / "motion.json").read_text()) for d in (whole, stopped))
    assert a["y"] == b["y"] and a["log_scale"] == b["log_scale"]  # resumed exactly


@pytest.mark.parametrize("bad, says", [
    (["static=/nonexistent"], "not a finished 3d run"),
    (["static=docs/eval3d-grid3/3d/20261202-161150-a-red-sphere"], "asset.safetensors"),  # a record: no field
    (["dynamic.frames=2"], "dynamic.frames"),
    (["dynamic.elevation_range=[0, 95]"], "elevation_range"),
    (["dynamic.margin=inf"], "dynamic.margin"),
    (["dynamic.guidance=inf"], "dynamic.guidance"),
    (["--resume", "docs/eval3d-grid3/3d/20261202-161150-a-red-sphere"], "not a 4d run"),
    (["dynamic.t_range=[0.9, 0.2]"], "t_range"),
    (["dynamic.azimuth_range=[10]"], "azimuth_range"),
])
def test_bad_4d_options_are_one_line(bad, says, tmp_path, capsys):
    assert run.main(["4d", "a red ball moving right", *bad, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "4d").exists()


def test_presets_hold_the_4d_recipes():
    """ToyWorld's 4d static stage is its 3D recipe (a YAML merge); SD 1.5's motion stage is AnimateDiff's clip."""
    from dreamfusion.config import ThreeDConfig
    from fourd.config import FourDConfig
    from pipelines import config

    toy4, toy3 = config.job_defaults(FourDConfig, "4d"), config.job_defaults(ThreeDConfig, "3d")
    assert all(getattr(toy4, f) == getattr(toy3, f) for f in ThreeDConfig.__dataclass_fields__)
    assert toy3.steps != ThreeDConfig().steps  # the merge carried ToyWorld's recipe, not the dataclass defaults
    sd = config.load(FourDConfig, "4d", ["model=sd15"])
    assert (sd.dynamic.frames, sd.dynamic.fps, sd.steps) == (16, 8.0, ThreeDConfig().steps)


def test_a_preset_motion_may_be_a_hub_id():
    from pipelines.loading import REPO_ROOT, preset_folder

    assert preset_folder("sd15", "motion") == "guoyww/animatediff-motion-adapter-v1-5-2"  # not a folder in the repo
    assert preset_folder("toyworld", "motion") == str(REPO_ROOT / "models/toyworld-motion")
