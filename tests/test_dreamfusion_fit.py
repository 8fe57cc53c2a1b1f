"""`run.py 3d` and `run.py export` on a tiny random SD-layout prior: files, exact resume, Ctrl-C, NaN, bad input."""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import trimesh
from safetensors.torch import load_file

import run
from tests.tiny import probe, toyworld_recipe

TINY = ["steps=4", "render.resolution=16", "batch_size=1", "render.samples_per_ray=16", "export.mesh_resolution=24",
        "export.turntable_frames=3", "export.turntable_size=16", "val_every=2", "checkpoint_every=2", "guidance.scale=10",
        "guidance.encode_size=16", "field.hash_levels=4", "field.hash_log2_size=12", "field.hash_max_resolution=32",
        "--quiet"]


def fit(tiny_sd, out, *extra, prompt="a red cube") -> int:
    return run.main(["3d", prompt, f"model={tiny_sd}", *TINY, *extra, "--out", str(out)])


@pytest.fixture(params=["published", "toyworld"])
def recipe(request, tmp_path) -> list[str]:
    """A model folder gets the published SD recipe (the dataclass defaults: hash grid, separate albedo MLP, MLP
    background, camera jitter); `--config` can give it ToyWorld's (its preset's `3d:` section) instead."""
    return [] if request.param == "published" else toyworld_recipe(tmp_path)


@contextmanager
def ctrl_c_at(stop: int):
    """Ctrl-C (KeyboardInterrupt) at the objective's step `stop`."""
    from dreamfusion.fit import SDSObjective

    forward = SDSObjective.forward

    def interrupted(self, step, progress, generator):
        if step == stop:
            raise KeyboardInterrupt
        return forward(self, step, progress, generator)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SDSObjective, "forward", interrupted)
        yield


def only_run(out: Path) -> Path:
    [d] = [p for p in (out / "3d").iterdir() if p.is_dir()]
    return d


def test_3d_writes_loadable_meshes_and_turntables(tiny_sd, tmp_path, recipe):
    assert fit(tiny_sd, tmp_path, *recipe) == 0
    d = only_run(tmp_path)
    for name in ("mesh.obj", "mesh.glb", "mesh.ply"):
        mesh = trimesh.load(d / name, force="mesh")
        assert len(mesh.faces) > 0 and len(mesh.vertices) > 0, name
    glb = trimesh.load(d / "mesh.glb", force="mesh")
    ply = trimesh.load(d / "mesh.ply", force="mesh")
    assert (len(glb.vertices), len(glb.faces)) == (len(ply.vertices), len(ply.faces))
    for name in ("turntable.mp4", "mesh_turntable.mp4"):
        info = probe(d / name)
        assert (info["codec"], info["pix_fmt"], info["frames"]) == ("h264", "yuv420p", 3)
    assert sorted(p.name for p in (d / "val").iterdir()) == ["step_000002.png", "step_000004.png"]
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["steps"] == 4 and meta["prompt"] == "a red cube" and "fit" in meta["timings_s"]
    assert json.loads((d / "mesh.json").read_text())["automatic"] is True


def test_resume_continues_exactly(tiny_sd, tmp_path, recipe):
    recipe = [*recipe, "render.grid_update_every=3"]  # the occupancy grid is refreshed at steps 0 and 3
    assert fit(tiny_sd, tmp_path / "straight", *recipe) == 0
    straight = load_file(str(only_run(tmp_path / "straight") / "asset.safetensors"))
    with ctrl_c_at(2):
        assert fit(tiny_sd, tmp_path / "stopped", *recipe) == 130  # Ctrl-C saves a checkpoint at step 2
    d = only_run(tmp_path / "stopped")
    stopped = json.loads((d / "checkpoints" / "3d" / "progress.json").read_text())
    assert stopped["step"] == 2 and stopped["seconds"] > 0
    grid = load_file(str(d / "checkpoints" / "3d" / "model.safetensors"))  # the grid steps 0-2 marched through
    assert int(grid["renderer.grid.refreshed"]) == 0 and 0 < grid["renderer.grid.occupied"].float().mean() < 1
    assert run.main(["3d", "--resume", str(d), "--quiet"]) == 0
    # the metadata's fit time counts the stopped session as well as the resumed one
    fit_seconds = json.loads((d / "metadata.json").read_text())["timings_s"]["fit"]
    assert fit_seconds > stopped["seconds"]
    assert json.loads((d / "checkpoints" / "3d" / "progress.json").read_text())["seconds"] >= stopped["seconds"]
    resumed = load_file(str(d / "asset.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-5)
    # losses.json holds the whole history: step 0's entry (the loss is logged every 50 steps) was logged
    # before the stop, by the stopped session, and comes back from its checkpoint
    losses = [json.loads((p / "losses.json").read_text()) for p in (only_run(tmp_path / "straight"), d)]
    assert [r["step"] for r in losses[1]] == [r["step"] for r in losses[0]] == [0]
    assert [r["loss"] for r in losses[1]] == pytest.approx([r["loss"] for r in losses[0]], rel=1e-4)


def test_export_reexports_with_other_settings(tiny_3d_runs, tmp_path, capsys):
    d = Path(shutil.copytree(tiny_3d_runs[0], tmp_path / "run"))  # a finished fit with TINY's settings
    assert run.main(["export", str(d), "mesh_resolution=20", "formats=[ply]", "turntable_frames=2", "--quiet"]) == 0
    [e] = [p for p in d.iterdir() if p.name.startswith("export-")]
    assert sorted(p.name for p in e.iterdir()) == ["config.yaml", "index.html", "mesh.json", "mesh.ply",
                                                   "mesh_turntable.mp4", "turntable.mp4"]
    assert json.loads((e / "mesh.json").read_text())["mesh_resolution"] == 20
    assert probe(e / "turntable.mp4")["frames"] == 2 and probe(e / "mesh_turntable.mp4")["frames"] == 2
    # options not given keep the run's own (mesh_resolution=24, turntable_frames=3 from TINY)
    assert run.main(["export", str(d), "formats=[glb]", "--quiet"]) == 0
    [e2] = [p for p in d.iterdir() if p.name.startswith("export-") and p != e]
    assert json.loads((e2 / "mesh.json").read_text())["mesh_resolution"] == 24
    assert probe(e2 / "turntable.mp4")["frames"] == 3 and (e2 / "mesh.glb").is_file()
    # a value that equals the dataclass default (256) is still this command's choice, not the run's (16)
    assert run.main(["export", str(d), "turntable_size=256", "formats=[ply]", "turntable_frames=1", "--quiet"]) == 0
    [e3] = [p for p in d.iterdir() if p.name.startswith("export-") and p not in (e, e2)]
    assert probe(e3 / "turntable.mp4")["width"] == 256
    # an iso-level above every density: a clear error, and no half-written export folder
    assert run.main(["export", str(d), "iso_level=1e9", "--quiet"]) == 2
    assert "no surface at iso-level" in capsys.readouterr().err
    assert len([p for p in d.iterdir() if "export-" in p.name]) == 3


def test_nan_stops_and_keeps_the_last_good_checkpoint(tiny_sd, tmp_path, monkeypatch, capsys):
    from dreamfusion.fit import SDSObjective

    forward = SDSObjective.forward

    def diverging(self, step, progress, generator):
        loss = forward(self, step, progress, generator)
        return loss * float("nan") if step >= 2 else loss

    monkeypatch.setattr(SDSObjective, "forward", diverging)
    assert fit(tiny_sd, tmp_path, "steps=6") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nan" in err and "last good checkpoint (step 2)" in err, err
    d = only_run(tmp_path)
    state = load_file(str(d / "checkpoints" / "3d" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_resume_and_export_bad_directories(tiny_sd, tmp_path, capsys):
    def error(*argv) -> str:
        assert run.main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert "not a 3d run directory" in error("3d", "--resume", str(tmp_path / "missing"))
    assert "not a 3d run directory" in error("export", str(tmp_path / "missing"))
    empty = tmp_path / "3d" / "empty"
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text(f"model: {tiny_sd}\nprompt: a red cube\n")
    assert "holds no checkpoint" in error("3d", "--resume", str(empty))
    assert "holds no field" in error("export", str(empty))
    old = tmp_path / "3d" / "old"  # a run made before the 3D options were grouped
    old.mkdir()
    (old / "config.yaml").write_text(f"model: {tiny_sd}\nprompt: a red cube\nbound: 1.2\n")
    assert "does not fit this version's options" in error("export", str(old))
    assert fit(tiny_sd, tmp_path / "ok") == 0
    d = only_run(tmp_path / "ok")
    assert "was made with guidance.scale=10" in error("3d", "--resume", str(d), "guidance.scale=20")
    # weights of another field layout than the config says (a run made before an option's default changed)
    saved = d / "config.yaml"
    saved.write_text(saved.read_text().replace("albedo_network: separate", "albedo_network: shared"))
    assert "does not fit its config's field options" in error("export", str(d))
