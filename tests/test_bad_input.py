"""Every bad input, in one table: one line on stderr, exit status 2, no traceback, and nothing written.

Each row is (job words, the words of the case, a fragment of the one-line message). In the words, these names are
replaced by real things the `bad` fixture makes: TINY (a tiny SD folder), NAN (its UNet full of NaN), TRUNCATED,
MISSING (no vae/), MISSING_KEY (a UNet tensor left out), PICKLED (UNet as .bin), INDEX_LIST, INDEX_MODULE, NOT_MOTION, MOTION_BYTES, HUGE_PNG,
NOT_IMAGE, BIG_PNG, MASKED (a masked-frame model), LATIN1_PROMPTS, LATIN1_CONFIG,
BAD_YAML, LIST_YAML, VIDEOS_NONE, FINISHED (a finished 3d run), STOPPED
(a stopped one), ASSET_TRUNCATED, ASSET_NAN, ADAPTER_BYTES/ADAPTER_NAN/ADAPTER_PICKLED (a MotionAdapter
with random-byte, NaN or pickle-only weights), CKPT_TRUNCATED, CKPT_NAN, CKPT_PROGRESS(_LIST) (a garbled progress.json),
CKPT_PICKLED (a checkpoint in Accelerate's format),
NOWHERE (a path that does not exist).
"""

import errno
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

import run

T = ["steps=1", "--quiet"]  # image/video settings that keep a run that would start cheap
V = ["frames=2", "steps=1", "--quiet"]
TT = ["frames=3", "bank_size=6", "batch_size=2", "steps=1", "device=cpu", "--quiet"]

CASES = [
    # ---- run.py itself
    ("image", ["   ", "model=TINY"], "prompt is empty"),
    ("image", ["a", "red", "cube", "model=TINY"], "quote the prompt"),
    ("image", ["--prompts", "LATIN1_PROMPTS", "model=TINY"], "is not UTF-8 text"),
    ("image", ["--prompts", "NOWHERE"], "does not exist"),
    ("image", ["a cube", "--config", "LATIN1_CONFIG"], "is not UTF-8 text"),
    ("image", ["a cube", "--config", "BAD_YAML"], "is not valid YAML"),
    ("image", ["a cube", "--config", "LIST_YAML"], "must hold a mapping"),
    ("image", ["a cube", "--config", "NOWHERE"], "does not exist"),
    ("image", ["a cube", "--config", "TINY"], "is a folder, not a file"),
    ("image", ["a cube", "--config", "/dev/null"], "is not a regular file"),
    ("image", ["--prompts", "TINY"], "is a folder, not a file"),
    ("image", ["a cube", "--bogus"], "unrecognized arguments"),
    ("paint", ["a cube"], "invalid choice"),
    ("train", ["painting"], "choose one of prior, judge, temporal, interpolation"),
    ("eval", ["video", "--resume", "NOWHERE"], "cannot be resumed"),
    ("train", ["temporal", "stray"], "options are key=value"),
    ("image", ["a cube", "stesp=3"], "did you mean 'steps'"),
    ("image", ["a cube", "guidence=3"], "did you mean 'guidance'"),
    ("3d", ["a cube", "mesh_resolution=96"], "did you mean 'export.mesh_resolution'"),
    ("3d", ["a cube", "guidance=50"], "is a group of options"),
    ("3d", ["a cube", "field=3"], "is a group of options"),
    # ---- option types and ranges (image)
    ("image", ["a cube", "steps=2.5"], "must be an integer"),
    ("image", ["a cube", "steps=true"], "must be an integer"),
    ("image", ["a cube", "allow_pickle=maybe"], "must be true or false"),
    ("image", ["a cube", "guidance=.nan"], "'guidance' must be a finite number"),
    ("image", ["a cube", "guidance=.inf"], "'guidance' must be a finite number"),
    ("image", ["a cube", "guidance=-1"], "guidance must be"),
    ("image", ["a cube", "guidance=lots"], "must be a number"),
    ("image", ["a cube", "beta_schedule=quadratic"], "unknown beta_schedule"),
    ("image", ["a cube", "dtype=fp8"], "unknown dtype"),
    ("image", ["a cube", "device=tpu"], "unknown device"),
    ("image", ["a cube", "device=cuda"] if not torch.cuda.is_available() else ["a cube", "device=tpu"], "device"),
    ("image", ["a cube", "height=-64"], "height must be a positive"),
    ("image", ["a cube", "sampler=heun9"], "unknown sampler"),
    ("image", ["a cube", "steps=0"], "steps must be at least 1"),
    ("image", ["a cube", "num_images=0"], "num_images must be at least 1"),
    ("image", ["a cube", "decode_chunk=0"], "decode_chunk must be at least 1"),
    ("image", ["a cube", "seed=99999999999999999999999"], "seed must be between 0 and 2**63 - 1"),
    ("image", ["a cube", "seed=-1"], "seed must be between 0 and 2**63 - 1"),
    ("image", ["a cube", "model="], "model is empty"),
    ("image", ["a cube", "cuda_graphs=true"], "needs compile=true"),
    ("3d", ["a cube", "cuda_graphs=true"], "needs compile=true"),
    # ---- checked against the loaded model, before the folder exists
    ("image", ["a cube", "model=TINY", "steps=5000"], "more than the model's 1000 training timesteps"),
    ("image", ["a cube", "model=TINY", "sampler=pndm", "steps=2"], "sampler=pndm needs steps >= 4"),
    ("video", ["a ball", "model=TINY", *V, "sampler=pndm", "steps=3"], "sampler=pndm needs steps >= 4"),
    ("image", ["a cube", "model=TINY", "height=15"], "multiple of the VAE factor"),
    # ---- models
    ("image", ["a cube", "model=sd99"], "unknown model 'sd99'"),
    ("image", ["a cube", "model=NOWHERE/"], "no such path"),
    ("image", ["a cube", "model=MISSING"], "missing the 'vae' component"),
    ("image", ["a cube", "model=TRUNCATED"], "truncated or corrupt"),
    ("image", ["a cube", "model=NAN"], "non-finite weights"),
    ("image", ["a cube", "model=MISSING_KEY"], "has no weights for conv_out.weight"),
    ("image", ["a cube", "model=PICKLED"], "allow_pickle=true"),
    ("image", ["a cube", "model=INDEX_LIST"], "must map component names to [library, class]"),
    ("image", ["a cube", "model=INDEX_MODULE"], "only diffusers and transformers classes load"),
    ("image", ["a cube", "model=nobody-here/no-such-model"], "Hugging Face Hub"),
    # ---- video
    ("video", ["a ball", "model=TINY", *V, "frames=0"], "frames must be between 1 and"),
    ("video", ["a ball", "model=TINY", *V, "frames=257"], "frames must be between 1 and 256"),
    ("video", ["a ball", "model=TINY", *V, "fps=0"], "fps must be between 0.1 and 1000"),
    ("video", ["a ball", "model=TINY", *V, "fps=0.0001"], "fps must be between 0.1 and 1000"),
    ("video", ["a ball", "model=TINY", *V, "fps=-3"], "fps must be between"),
    ("video", ["a ball", "model=TINY", *V, "fps=.inf"], "'fps' must be a finite number"),
    ("video", ["a ball", "model=TINY", *V, "height=31"], "not a multiple of the VAE factor"),
    ("video", ["a ball", "model=TINY", *V, "steps=5000"], "more than the model's 1000 training timesteps"),
    ("video", ["a ball", "model=TINY", *V, "seed=99999999999999999999999"], "seed must be between"),
    ("video", ["a ball", "model=TINY", *V, "motion=NOT_MOTION"], "is not a motion module"),
    ("video", ["a ball", "model=TINY", *V, "motion=NOWHERE"], "no such folder"),
    ("video", ["a ball", "model=TINY", *V, "motion=MOTION_BYTES"], "truncated or corrupt"),
    ("video", ["a ball", "model=TINY", *V, "motion=ADAPTER_BYTES"], "truncated or corrupt"),
    ("video", ["a ball", "model=TINY", *V, "motion=ADAPTER_NAN"], "non-finite weights"),
    ("video", ["a ball", "model=TINY", *V, "motion=ADAPTER_PICKLED"], "only pickle weights"),
    ("video", ["a ball", "model=TINY", *V, "interpolate=0"], "interpolate must be at least 1"),
    ("video", ["a ball", "model=TINY", *V, "interpolate=2000"], "makes more than"),
    ("video", ["a ball", "model=TINY", *V, "fps=1000", "interpolate=500"], "keep fps * interpolate <= 1000"),
    ("video", ["a ball", "model=TINY", *V, "interpolate_strength=0"], "interpolate_strength must be in (0, 1]"),
    ("video", ["a ball", "model=TINY", *V, "interpolate=2"], "need a masked-frame model"),
    ("video", ["a ball", "model=TINY", *V, "image=NOWHERE"], "does not exist"),
    ("video", ["a ball", "model=TINY", *V, "image=TINY"], "is a folder, not a file"),
    ("video", ["a ball", "model=TINY", *V, "image=NOT_IMAGE", "masked_motion=NOT_MOTION"], "is not a motion module"),
    ("video", ["a ball", "model=TINY", *V, "image=NOT_IMAGE", "masked_motion=MASKED"], "cannot be read as an image"),
    ("video", ["a ball", "model=TINY", *V, "image=HUGE_PNG", "masked_motion=MASKED"], "cannot be read as an image"),
    ("video", ["a ball", "model=TINY", *V, "image=BIG_PNG", "masked_motion=MASKED"], "larger than 64 megapixels"),
    ("video", ["a ball", "model=TINY", *V, "image=HUGE_PNG", "masked_motion=MOTION_BYTES"], "truncated or corrupt"),
    # ---- 3d
    ("3d", ["a cube", "model=TINY", "steps=0"], "steps must be at least 1"),
    ("3d", ["a cube", "model=TINY", "seed=99999999999999999999999"], "seed must be between 0 and 2**63 - 1"),
    ("3d", ["a cube", "model=TINY", "batch_size=0"], "batch_size must be at least 1"),
    ("3d", ["a cube", "model=TINY", "lr=0"], "lr > 0"),
    ("3d", ["a cube", "model=TINY", "render.resolution=0"], "render.resolution must be at least 1"),
    ("3d", ["a cube", "model=TINY", "render.renderer=optix"], "unknown render.renderer"),
    ("3d", ["a cube", "model=TINY", "guidance.scale=-1"], "guidance.scale must be a finite number >= 0"),
    ("3d", ["a cube", "model=TINY", "field.blob_density=nan"], "'field.blob_density' must be a finite number"),
    ("3d", ["a cube", "model=TINY", "export.iso_level=.inf"], "'export.iso_level' must be a finite number"),
    ("3d", ["a cube", "model=TINY", "camera.azimuth_range=[.nan, 1]"], "'camera.azimuth_range' must be a finite"),
    ("3d", ["a cube", "model=TINY", "guidance.t_min=0.99"], "need 0 <= guidance.t_min < t_max"),
    ("3d", ["a cube", "model=TINY", "guidance.weighting=loud"], "unknown guidance.weighting"),
    ("3d", ["a cube", "model=TINY", "field.bound=0"], "field.bound must be positive"),
    ("3d", ["a cube", "model=TINY", "field.encoding=grid"], "unknown field.encoding 'grid'"),
    ("3d", ["a cube", "model=TINY", "camera.fov_range=[10, 190]"], "camera.fov_range must lie strictly inside"),
    ("3d", ["a cube", "model=TINY", "camera.elevation_range=[80, 10]"], "low <= high"),
    ("3d", ["a cube", "model=TINY", "shading.albedo_prob=2"], "shading.albedo_prob must be a probability"),
    ("3d", ["a cube", "model=TINY", "loss.entropy=-1"], "loss weights and loss.orient_ramp must be >= 0"),
    ("3d", ["a cube", "model=TINY", "export.mesh_resolution=100000"], "export.mesh_resolution="),
    ("3d", ["a cube", "model=TINY", "export.keep_components=-1"], "keep_components must be >= 0"),
    ("3d", ["a cube", "model=TINY", "export.formats=[stl]"], "unknown export.formats 'stl': choose one of obj, glb, ply"),
    ("3d", ["a cube", "model=TINY", "mixed_precision=fp4"], "unknown mixed_precision"),
    ("3d", ["--resume", "NOWHERE"], "not a 3d run directory"),
    ("3d", ["--resume", "FINISHED", "guidance.scale=20"], "was made with guidance.scale=10"),
    ("3d", ["a blue ball", "--resume", "STOPPED"], "the run's prompt is"),
    ("3d", ["--resume", "CKPT_TRUNCATED"], "cannot resume from"),
    ("3d", ["--resume", "CKPT_NAN"], "non-finite weights"),
    ("3d", ["--resume", "CKPT_PROGRESS"], "progress.json is corrupt"),
    ("3d", ["--resume", "CKPT_PROGRESS_LIST"], "progress.json is corrupt"),
    ("3d", ["--resume", "CKPT_PICKLED"], "is not a complete checkpoint of this version"),
    # ---- export
    ("export", ["NOWHERE"], "not a 3d run directory"),
    ("export", ["FINISHED", "FINISHED"], "takes one run directory"),
    ("export", ["FINISHED", "mesh_resolution=4"], "export.mesh_resolution must be at least 8"),
    ("export", ["FINISHED", "formats=[stl]"], "unknown export.formats 'stl': choose one of obj, glb, ply"),
    ("export", ["FINISHED", "iso_level=1e9"], "no surface at iso-level"),
    ("export", ["ASSET_TRUNCATED"], "truncated or corrupt"),
    ("export", ["ASSET_NAN"], "non-finite weights"),
    # ---- train
    ("train", ["temporal", "model=TINY", *TT, "mask_mode=sideways"], "unknown mask_mode 'sideways': choose one of"),
    ("train", ["temporal", "model=TINY", *TT, "loss_weighting=l1"], "unknown loss_weighting 'l1': choose one of eps, v"),
    ("train", ["temporal", "model=TINY", *TT, "noise_start=1.5"], "noise_start is a fraction"),
    ("train", ["temporal", "model=TINY", *TT, "noise_start_timesteps=[990,900]"], "noise_start_timesteps must be"),
    ("train", ["temporal", "model=TINY", *TT, "noise_start_timesteps=[5000,6000]"], "training timesteps"),
    ("train", ["temporal", "model=TINY", *TT, "fps_choices=[]"], "fps_choices must list positive"),
    ("train", ["temporal", "model=TINY", *TT, "data=NOWHERE"], "neither 'toyworld' nor a folder"),
    ("train", ["temporal", "model=TINY", *TT, "data=VIDEOS_NONE"], "holds no readable video"),
    ("train", ["temporal", "model=TINY", *TT, "init=NOWHERE"], "is not a folder of temporal layers"),
    ("train", ["interpolation", "model=TINY", *TT, "init=TINY"], "is not a folder of temporal layers"),
    ("train", ["temporal", "model=TINY", *TT, "layers.shift_rank=-1"], "layers.shift_rank >= 0"),
    ("train", ["temporal", "model=TINY", *TT, "seed=99999999999999999999999"], "seed must be between"),
    ("train", ["temporal", "model=TINY", *TT, "grad_accum=0"], "grad_accum must be at least 1"),
    ("train", ["temporal", "model=TINY", *TT, "device=tpu"], "unknown device"),
    ("train", ["temporal", "model=TINY", *TT, "device=cuda:64"], "CUDA GPU"),
    ("3d", ["a cube", "model=TINY", "device=cuda:64"], "CUDA GPU"),
    ("train", ["prior", "bank_size=4", "device=cuda:64"], "CUDA GPU"),
    ("train", ["temporal", "resume=NOWHERE"], "not a train run directory"),
    ("train", ["prior", "bank_size=0"], "bank_size must be at least 1"),
    ("train", ["prior", "arch.unet_channels=[32, 64]"], "arch.unet_channels must list 3"),
    ("train", ["prior", "mixed_precision=fp4"], "unknown mixed_precision 'fp4': choose one of auto, no, fp16, bf16"),
    ("train", ["judge", "steps=0"], "steps must be at least 1"),
    ("train", ["judge", "eval_seed=0"], "eval_seed must differ from seed"),
    ("train", ["judge", "lr=2"], "lr must be between 0 and 1"),
    ("train", ["judge", "save_to="], "save_to is empty"),
    # ---- eval
    ("eval", ["image", "model=TINY", "colors=[red, mauve]"], "unknown color 'mauve'"),
    ("eval", ["image", "model=TINY", "colors=[red, red]"], "lists a color twice"),
    ("eval", ["image", "model=TINY", "samples_per_prompt=0"], "samples_per_prompt must be at least 1"),
    ("eval", ["image", "model=TINY", "judge=NOWHERE"], "train judge"),
    ("eval", ["video", "model=TINY", "motions=[flying]"], "unknown motion 'flying'"),
    ("eval", ["video", "model=TINY", "frames=2"], "at least 3 frames"),
    ("eval", ["video", "model=TINY", "seam_frames=999"], "seam_frames must be between"),
    ("eval", ["3d", "model=TINY", "seeds=0"], "seeds, rotations, views and view_frames must be at least 1"),
    ("eval", ["3d", "model=TINY", "shapes=[blob]"], "unknown shape 'blob'"),
    ("eval", ["3d", "--resume", "FINISHED"], "not an eval 3d directory"),
]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixels are never reached: the size is refused first)."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 7)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad(tiny_sd, tiny_3d_runs, tmp_path_factory) -> dict[str, str]:
    """The things the table's names stand for."""
    root = tmp_path_factory.mktemp("bad")
    things = {"TINY": tiny_sd, "NOWHERE": root / "nowhere", "NOT_MOTION": tiny_sd}

    def model_copy(name, change):
        folder = Path(shutil.copytree(tiny_sd, root / name))
        change(folder)
        things[name] = folder

    unet = "unet/diffusion_pytorch_model.safetensors"
    model_copy("TRUNCATED", lambda f: (f / unet).write_bytes((f / unet).read_bytes()[: (f / unet).stat().st_size // 2]))
    model_copy("MISSING", lambda f: shutil.rmtree(f / "vae"))

    def missing_key(f):
        from safetensors.torch import load_file, save_file

        state = load_file(f / unet)
        del state["conv_out.weight"]
        save_file(state, f / unet)

    model_copy("MISSING_KEY", missing_key)

    def nan_payload(path: Path):  # the header stays right, every weight byte is 0xFF (NaN in float32)
        data = path.read_bytes()
        n = 8 + int.from_bytes(data[:8], "little")
        path.write_bytes(data[:n] + b"\xff" * (len(data) - n))

    model_copy("NAN", lambda f: nan_payload(f / unet))

    def pickled(f):
        from safetensors.torch import load_file

        torch.save(load_file(f / unet), f / "unet" / "diffusion_pytorch_model.bin")
        (f / unet).unlink()

    model_copy("PICKLED", pickled)
    model_copy("INDEX_LIST", lambda f: (f / "model_index.json").write_text(json.dumps([["diffusers", "UNet"]])))

    def index_module(f):  # names an installed module that is not a model library: it must not even be imported
        index = json.loads((f / "model_index.json").read_text())
        (f / "model_index.json").write_text(json.dumps({**index, "unet": ["this", "UNet2DConditionModel"]}))

    model_copy("INDEX_MODULE", index_module)
    motion = root / "motion-bytes"
    motion.mkdir()
    (motion / "temporal_layers.safetensors").write_bytes(bytes(range(256)) * 64)
    (motion / "temporal_config.json").write_text(json.dumps({"text_dim": 32}))
    things["MOTION_BYTES"] = motion
    from tests.test_animatediff import save_adapter

    adapter = save_adapter(root / "adapter")
    weights = "diffusion_pytorch_model.safetensors"

    def adapter_copy(name, change):
        folder = Path(shutil.copytree(adapter, root / name))
        change(folder)
        things[name] = folder

    adapter_copy("ADAPTER_BYTES", lambda f: (f / weights).write_bytes(bytes(range(256)) * 64))
    adapter_copy("ADAPTER_NAN", lambda f: nan_payload(f / weights))

    def adapter_pickled(f):
        from safetensors.torch import load_file

        torch.save(load_file(f / weights), f / "diffusion_pytorch_model.bin")
        (f / weights).unlink()

    adapter_copy("ADAPTER_PICKLED", adapter_pickled)
    (root / "huge.png").write_bytes(png_header(40000, 40000))  # PIL itself refuses this one as a bomb
    (root / "big.png").write_bytes(png_header(10000, 8000))  # and we refuse this one, from its header
    things["HUGE_PNG"], things["BIG_PNG"] = root / "huge.png", root / "big.png"
    (root / "not-an-image.png").write_text("not an image")
    things["NOT_IMAGE"] = root / "not-an-image.png"
    (root / "prompts.txt").write_bytes("a red cube\nun cube rouge \xe9\n".encode("latin-1"))
    things["LATIN1_PROMPTS"] = root / "prompts.txt"
    (root / "config.yaml").write_bytes("negative: \xe9\xe9\n".encode("latin-1"))
    things["LATIN1_CONFIG"] = root / "config.yaml"
    (root / "bad.yaml").write_text("steps: [1, 2\n")
    things["BAD_YAML"] = root / "bad.yaml"
    (root / "list.yaml").write_text("- steps\n- 3\n")
    things["LIST_YAML"] = root / "list.yaml"
    videos = root / "videos-none"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not really a video")
    things["VIDEOS_NONE"] = videos

    assert run.main(["train", "interpolation", f"model={tiny_sd}", "frames=3", "bank_size=4", "batch_size=2", "steps=1",
                     "device=cpu", "--quiet", "--out", str(root / "masked")]) == 0
    things["MASKED"] = next((root / "masked" / "train").iterdir()) / "motion"

    finished, stopped = tiny_3d_runs
    things["FINISHED"], things["STOPPED"] = finished, stopped

    def run_copy(name, source, change):
        folder = Path(shutil.copytree(source, root / "3d" / name))
        change(folder)
        things[name] = folder

    asset = "asset.safetensors"
    run_copy("ASSET_TRUNCATED", finished, lambda d: (d / asset).write_bytes((d / asset).read_bytes()[:100]))
    run_copy("ASSET_NAN", finished, lambda d: nan_payload(d / asset))
    ckpt = "checkpoints/3d/model.safetensors"
    run_copy("CKPT_TRUNCATED", stopped, lambda d: (d / ckpt).write_bytes((d / ckpt).read_bytes()[:1000]))
    run_copy("CKPT_NAN", stopped, lambda d: nan_payload(d / ckpt))
    progress = "checkpoints/3d/progress.json"
    run_copy("CKPT_PROGRESS", stopped, lambda d: (d / progress).write_text('{"stage": "3d", "ste'))
    run_copy("CKPT_PROGRESS_LIST", stopped, lambda d: (d / progress).write_text("[3]"))

    def accelerate_format(d):
        for name in ("optimizer.safetensors", "optimizer.json", "rng.safetensors"):
            (d / "checkpoints" / "3d" / name).unlink()
        (d / "checkpoints" / "3d" / "optimizer.bin").write_bytes(b"a pickle")

    run_copy("CKPT_PICKLED", stopped, accelerate_format)
    return {k: str(v) for k, v in things.items()}


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")} if root.exists() else {}


@pytest.mark.parametrize("job, words, message", CASES, ids=[f"{j} {' '.join(w)}" for j, w, _ in CASES])
def test_bad_input(job, words, message, bad, tmp_path, capsys):
    names = re.compile(r"(?<![A-Za-z_])(" + "|".join(sorted(bad, key=len, reverse=True)) + r")(?![A-Za-z_])")
    argv = [names.sub(lambda m: bad[m.group(1)], a) for a in [job, *words]]  # one pass: paths are not rescanned
    watched = [Path(bad[n]) for n in ("FINISHED", "STOPPED", "TINY")] + [Path(a) for a in argv if Path(a).is_dir()]
    before = {str(w): snapshot(w) for w in watched}
    out = tmp_path / "out"
    capsys.readouterr()
    assert run.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(out) == {} or not [p for p in out.rglob("*") if p.is_file()], "something was written"
    assert {str(w): snapshot(w) for w in watched} == before, "an existing folder changed"


def test_empty_out_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.main(["image", "a red cube", "--out", " "]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --out is empty: pass --out DIR, or leave it out for outputs/", err
    assert list(tmp_path.iterdir()) == []


def test_ui_out_that_is_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    assert run.main(["ui", "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot create output directory") and "\n" not in err, err
    assert taken.read_text() == "mine"


def test_an_installed_module_that_model_index_names_is_never_imported(bad, tmp_path, capsys):
    """The Zen of Python would print if `this` were imported."""
    import sys

    sys.modules.pop("this", None)
    assert run.main(["image", "a cube", f"model={bad['INDEX_MODULE']}", "--out", str(tmp_path), "--quiet"]) == 2
    assert "this" not in sys.modules and "Beautiful is better" not in capsys.readouterr().out


def test_a_full_disk_gives_one_line_and_leaves_nothing(tiny_sd, tmp_path, capsys, monkeypatch):
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    assert run.main(["image", "a cube", f"model={tiny_sd}", "steps=1", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write") and "No space left on device" in err and "\n" not in err
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_dir() and p.parent.name == "image"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 160 KiB filesystem (tmpfs), where the tiny 3d fit's first checkpoint does not fit."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and CAP_SYS_ADMIN")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_a_checkpoint_gives_one_line_and_leaves_nothing(tiny_sd, small_disk, capsys):
    """safetensors reports ENOSPC as its own SafetensorError ("... (os error 28)"), not as an OSError."""
    from tests.test_dreamfusion_fit import TINY

    assert run.main(["3d", "a red cube", f"model={tiny_sd}", *TINY, "--out", str(small_disk)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: cannot write the output: No space left on device; free some space or pass --out DIR", err
    assert not [p for p in small_disk.rglob("*") if p.is_file()]


def test_a_prompt_with_an_equals_sign_goes_after_a_double_dash(tiny_sd, tmp_path):
    assert run.main(["image", f"model={tiny_sd}", "steps=1", "--out", str(tmp_path), "--quiet", "--", "style=anime cat"]) == 0
    [d] = list((tmp_path / "image").iterdir())
    assert json.loads((d / "metadata.json").read_text())["prompt"] == "style=anime cat"


def test_a_failed_run_removes_the_folder_it_made(tiny_sd, tmp_path, monkeypatch, capsys):
    """An error (or Ctrl-C) after the run folder exists removes it; nothing half-made stays."""
    import pipelines.image

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.image, "generate", broken)
    assert run.main(["image", "a cube", f"model={tiny_sd}", "steps=1", "--out", str(tmp_path), "--quiet"]) == 130
    assert not list((tmp_path / "image").iterdir())
