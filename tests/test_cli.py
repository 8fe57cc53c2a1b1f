"""run.py end to end on tiny models: the run-directory contract, determinism, and every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import run
from pipelines.runtime import atomic_path, slugify

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*argv) -> int:
    return run.main([str(a) for a in argv])


def run_dirs(out: Path, job: str = "image") -> list[Path]:
    root = out / job
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_image_run_directory_contract(tiny_sd, tmp_path):
    assert run_cli("image", "a red cube", f"model={tiny_sd}", "steps=2", "num_images=3", "seed=5",
                   "--out", tmp_path, "--quiet") == 0
    [d] = run_dirs(tmp_path)
    assert d.name.endswith("-a-red-cube")
    pngs = sorted(d.glob("*.png"))
    assert [p.name for p in pngs] == ["image_00.png", "image_01.png", "image_02.png"]
    assert Image.open(pngs[0]).size == (16, 16)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["steps"] == 2 and cfg["num_images"] == 3 and cfg["prompt"] == "a red cube"
    meta = json.loads((d / "metadata.json").read_text())
    for key in ("prompt", "negative", "seed", "model", "model_hash", "versions", "device", "dtype", "timings_s"):
        assert key in meta, key
    assert meta["seed"] == 5 and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert len(meta["model_hash"]) == 64 and meta["versions"]["torch"]
    assert {"load", "hash", "encode_prompt", "denoise", "decode", "save"} <= set(meta["timings_s"])
    assert not list(d.glob(".*")), "temp files left behind"


def test_never_overwrites_and_is_deterministic(tiny_sd, tmp_path):
    for _ in range(2):
        assert run_cli("image", "a red cube", f"model={tiny_sd}", "steps=2", "--out", tmp_path, "--quiet") == 0
    assert run_cli("image", "a red cube", f"model={tiny_sd}", "steps=2", "seed=1", "--out", tmp_path, "--quiet") == 0
    a, b, c = [np.asarray(Image.open(d / "image_00.png")) for d in run_dirs(tmp_path)]
    assert len({d.name for d in run_dirs(tmp_path)}) == 3
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_prompts_file_one_run_per_prompt(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n# a comment\na blue ball\n")
    assert run_cli("image", "--prompts", prompts, f"model={tiny_sd}", "steps=1", "--out", tmp_path / "o", "--quiet") == 0
    dirs = run_dirs(tmp_path / "o")
    metas = sorted((json.loads((d / "metadata.json").read_text()) for d in dirs), key=lambda m: m["seed"])
    assert [(m["prompt"], m["seed"]) for m in metas] == [("a red cube", 0), ("a blue ball", 1)]


def make_pickled(tiny_sd, tmp_path):
    """The same model with the UNet saved as a pickle (.bin) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_sd, bad)
    f = bad / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(f), bad / "unet" / "diffusion_pytorch_model.bin")
    f.unlink()
    return bad


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permissions cannot be tested")
def test_unwritable_output_dir_nonroot(tiny_sd, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    assert run_cli("image", "a cube", f"model={tiny_sd}", "steps=1", "--out", out, "--quiet") == 2
    err = capsys.readouterr().err.strip()  # read once: a second read returns nothing
    assert ("not writable" in err or "cannot create" in err) and "\n" not in err, err
    assert list(out.iterdir()) == []


def test_unwritable_output_dir(tiny_sd, tmp_path, capsys):
    """An --out that is a file cannot hold run directories (works as root too)."""
    out = tmp_path / "a-file"
    out.write_text("")
    assert run_cli("image", "a cube", f"model={tiny_sd}", "steps=1", "--out", out, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot create output directory" in err and "\n" not in err
    assert out.read_text() == ""


def test_pickle_allowed_loads_with_weights_only(tiny_sd, tmp_path):
    model = make_pickled(tiny_sd, tmp_path)
    assert run_cli("image", "a cube", f"model={model}", "allow_pickle=true", "steps=1", "--out", tmp_path, "--quiet") == 0
    assert len(run_dirs(tmp_path)) == 1


def test_unreachable_hub_id_one_line(tmp_path, capsys):
    assert run_cli("image", "a cube", "model=nobody-here/no-such-model", "--out", tmp_path, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Hugging Face Hub" in err and "model=DIR" in err


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "image", "a cube", "steps=0", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: steps must be at least 1, got 0"
    assert "Traceback" not in proc.stderr


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "image", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    from pipelines.config import describe
    from pipelines.options import ImageConfig

    for key, _, meaning in describe(ImageConfig()):
        assert key in proc.stdout and meaning in proc.stdout


def test_help_defaults_read_back_as_themselves():
    """Each default as --help shows it, typed back as key=value, gives the same config (lists as [a, b])."""
    from dreamfusion.config import ThreeDConfig
    from pipelines.config import build, describe, flatten, job_defaults, parse_overrides, to_dict, unflatten

    defaults = job_defaults(ThreeDConfig, "3d")
    shown = [f"{key}={value}" for key, value, _ in describe(defaults) if value != "None"]
    assert any(w.startswith("camera.elevation_range=[") for w in shown) and "export.formats=[obj, glb, ply]" in shown
    keys = flatten(parse_overrides(shown))
    typed = flatten(to_dict(build(ThreeDConfig, unflatten(parse_overrides(shown)))))
    expected = flatten(to_dict(defaults))
    assert {k: typed[k] for k in keys} == {k: expected[k] for k in keys}


def test_3d_help_shows_toyworlds_recipe_by_group_and_says_whose_it_is():
    from run import JOBS, options_help

    text = options_help(JOBS["3d"][None])
    assert "defaults for model=toyworld" in text and "steps=600 " in text and "guidance.scale=30.0 " in text
    groups = [line.split()[0] for line in text.splitlines() if line.startswith(" ") and line.split()[0].endswith(".")]
    assert groups == ["field.", "camera.", "shading.", "render.", "guidance.", "loss.", "export."]


@pytest.mark.parametrize("argv", [["--help"], ["image", "--help"], ["3d", "--help"], ["eval", "--help"]])
def test_help_imports_no_job(argv):
    """`run.py --help` reads only the torch-free config modules: no job, no torch, no trimesh."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run\n"
            "try:\n    run.main(sys.argv[2:])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'diffusers', 'transformers', 'trimesh', 'dreamfusion.fit', "
            "'video.pipeline') if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), *argv], capture_output=True, text=True, timeout=120)
    assert "usage:" in proc.stdout and "heavy: []" in proc.stderr, proc.stderr[-500:]


def test_a_key_in_another_group_is_named(tmp_path, capsys):
    assert run_cli("3d", "a red cube", "mesh_resolution=96", "--out", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config key 'mesh_resolution': did you mean 'export.mesh_resolution'?"
    assert run_cli("3d", "a red cube", "field.encodng=hashgrid", "--out", tmp_path) == 2
    assert "did you mean 'field.encoding'?" in capsys.readouterr().err
    assert not (tmp_path / "3d").exists()


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "a/b\\c", "x" * 500, "....", "日本語"])
def test_slug_is_safe(prompt):
    slug = slugify(prompt)
    assert "/" not in slug and "\\" not in slug and ".." not in slug and 0 < len(slug) <= 48


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_accelerate_launch_splits_prompts_across_processes(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\n")
    # torchrun is what `accelerate launch` runs on several GPUs; on CPU it gives gloo processes.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "run.py"), "image", "--prompts", str(prompts),
           f"model={tiny_sd}", "steps=1", "--out", str(tmp_path / "o"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    metas = [json.loads((d / "metadata.json").read_text()) for d in run_dirs(tmp_path / "o")]
    assert sorted((m["prompt"], m["seed"]) for m in metas) == [("a blue ball", 1), ("a green cone", 2), ("a red cube", 0)]
    assert {m["process"] for m in metas} == {0, 1}


def test_resume_on_a_job_that_cannot_resume(tmp_path, capsys):
    assert run_cli("eval", "video", "--resume", tmp_path, "--out", tmp_path / "out", "--quiet") == 2
    assert capsys.readouterr().err.strip() == "error: eval video cannot be resumed: start it again"
    assert not (tmp_path / "out").exists()
