"""`run.py 3d` and `run.py export` on a tiny random SD-layout prior: files, exact resume, Ctrl-C, NaN, bad input."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import trimesh
from einops import rearrange
from safetensors.torch import load_file

import run
from tests.tiny import toyworld_recipe
from video.export import probe

TINY = ["steps=4", "resolution=16", "batch_size=1", "samples_per_ray=16", "mesh_resolution=24", "turntable_frames=3",
        "turntable_size=16", "val_every=2", "checkpoint_every=2", "guidance=10", "encode_size=16", "hash_levels=4",
        "hash_log2_size=12", "hash_max_resolution=32", "--quiet"]


def fit(tiny_sd, out, *extra, prompt="a red cube") -> int:
    return run.main(["3d", prompt, f"model={tiny_sd}", *TINY, *extra, "--out", str(out)])


@pytest.fixture(params=["published", "toyworld"])
def recipe(request, tmp_path) -> list[str]:
    """A model folder gets the published SD recipe (configs/3d.yaml: hash grid, separate albedo MLP, MLP
    background, camera jitter); `--config` can give it ToyWorld's (its preset's `3d:` section) instead."""
    return [] if request.param == "published" else toyworld_recipe(tmp_path)


@contextmanager
def ctrl_c_at(stop: int):
    """Ctrl-C (KeyboardInterrupt) at the objective's step `stop`; the refine stage's steps count on from the fit's."""
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
    assert fit(tiny_sd, tmp_path / "straight", *recipe) == 0
    straight = load_file(str(only_run(tmp_path / "straight") / "asset.safetensors"))
    with ctrl_c_at(2):
        assert fit(tiny_sd, tmp_path / "stopped", *recipe) == 130  # Ctrl-C saves a checkpoint at step 2
    d = only_run(tmp_path / "stopped")
    stopped = json.loads((d / "checkpoints" / "3d" / "progress.json").read_text())
    assert stopped["step"] == 2 and stopped["seconds"] > 0
    assert run.main(["3d", "--resume", str(d), "--quiet"]) == 0
    # the metadata's fit time counts the stopped session as well as the resumed one
    fit_seconds = json.loads((d / "metadata.json").read_text())["timings_s"]["fit"]
    assert fit_seconds > stopped["seconds"]
    assert json.loads((d / "checkpoints" / "3d" / "progress.json").read_text())["seconds"] >= stopped["seconds"]
    resumed = load_file(str(d / "asset.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-5)


def test_refine_paints_the_albedo_grid_alone_and_resumes_exactly(tiny_sd, tmp_path, monkeypatch):
    refine = ["albedo_grid=8", "refine_steps=4"]
    assert fit(tiny_sd, tmp_path / "straight", *refine) == 0
    d = only_run(tmp_path / "straight")
    straight = load_file(str(d / "asset.safetensors"))
    geometry = {k[len("asset."):]: v for k, v in load_file(str(d / "checkpoints" / "3d" / "model.safetensors")).items()}
    assert geometry["field.albedo_grid"].abs().max() == 0  # the geometry stage leaves the grid alone...
    assert fit(tiny_sd, tmp_path / "plain") == 0
    plain = load_file(str(only_run(tmp_path / "plain") / "asset.safetensors"))
    assert plain.keys() == geometry.keys() - {"field.albedo_grid"}
    for k, v in plain.items():  # ...and is the plain fit (to the bit in this recipe; ToyWorld's rounds apart by ~1e-7)
        torch.testing.assert_close(geometry[k], v, atol=0, rtol=0)
    assert straight["field.albedo_grid"].abs().max() > 0  # the refine stage paints it...
    for k, v in geometry.items():  # ...and nothing else
        if k != "field.albedo_grid":
            torch.testing.assert_close(straight[k], v, atol=0, rtol=0)
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["steps"] == 4 and meta["refine_steps"] == 4 and "refine" in meta["timings_s"]
    assert {"refine_000002.png", "refine_000004.png"} <= {p.name for p in (d / "val").iterdir()}

    import dreamfusion.fit

    modes, sample_shading = {}, dreamfusion.fit.sample_shading

    def spy(step, cfg, cams, generator=None):
        shading = modes[step] = sample_shading(step, cfg, cams, generator)
        return shading

    monkeypatch.setattr(dreamfusion.fit, "sample_shading", spy)
    assert fit(tiny_sd, tmp_path / "shaded", *refine, "albedo_prob=0.5", "textureless_prob=0.5",
               "ambient_only_steps=0") == 0
    assert {modes[s].mode for s in range(4)} - {"lambertian"}  # the fit draws albedo-only or textureless steps
    assert {modes[s].mode for s in range(4, 8)} == {"lambertian"}  # every refine step is lit
    monkeypatch.setattr(dreamfusion.fit, "sample_shading", sample_shading)

    with ctrl_c_at(4 + 2):  # the refine stage's step 2
        assert fit(tiny_sd, tmp_path / "stopped", *refine) == 130
    d = only_run(tmp_path / "stopped")
    assert json.loads((d / "checkpoints" / "refine" / "progress.json").read_text())["step"] == 2
    from dreamfusion.config import ThreeDConfig
    from dreamfusion.fit import load_asset
    from pipelines.config import build, load_yaml

    saved = {k: v for k, v in load_yaml(d / "config.yaml").items() if k not in ("prompt", "command")}
    assert load_asset(d, build(ThreeDConfig, saved), "cpu").field.albedo_grid.abs().max() > 0  # the refine checkpoint's
    assert run.main(["export", str(d), "formats=[ply]", "turntable_frames=2", "--quiet"]) == 0
    assert run.main(["3d", "--resume", str(d), "--quiet"]) == 0
    resumed = load_file(str(d / "asset.safetensors"))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-5)


def test_refine_on_a_plain_canvas_coats_once_and_resumes_exactly(tiny_sd, tmp_path, monkeypatch):
    from dreamfusion.field import NeRFField

    coats, coat = [], NeRFField.coat_albedo

    def spy(self, rgb):
        coats.append(rgb.clone())
        return coat(self, rgb)

    monkeypatch.setattr(NeRFField, "coat_albedo", spy)
    plain = ["albedo_grid=8", "refine_steps=4", "refine_canvas=plain"]
    assert fit(tiny_sd, tmp_path / "straight", *plain) == 0 and len(coats) == 1
    straight = load_file(str(only_run(tmp_path / "straight") / "asset.safetensors"))
    assert fit(tiny_sd, tmp_path / "over", "albedo_grid=8", "refine_steps=4") == 0 and len(coats) == 1
    over = load_file(str(only_run(tmp_path / "over") / "asset.safetensors"))
    assert (straight["field.albedo_grid"] - over["field.albedo_grid"]).abs().max() > 0.1  # painted on the coat

    with ctrl_c_at(4 + 2):
        assert fit(tiny_sd, tmp_path / "stopped", *plain) == 130 and len(coats) == 2
    d = only_run(tmp_path / "stopped")
    assert run.main(["3d", "--resume", str(d), "--quiet"]) == 0
    assert len(coats) == 2  # the resumed refine stage has its coat in the checkpoint: it is not laid again
    torch.testing.assert_close(coats[1], coats[0], rtol=0, atol=0)
    resumed = load_file(str(d / "asset.safetensors"))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-5)


def test_surface_albedo_is_the_median_colour_of_the_covered_pixels():
    from dreamfusion.config import ThreeDConfig
    from dreamfusion.fit import Asset, surface_albedo
    from dreamfusion.renderer import make_renderer

    torch.manual_seed(0)
    cfg = ThreeDConfig(albedo_grid=16, hidden=16, encoding="frequency", background="fixed", samples_per_ray=32)
    asset = Asset(cfg)
    asset.field.coat_albedo(torch.tensor([0.8, 0.3, 0.1]))  # the blob is an opaque ball of this colour
    torch.testing.assert_close(surface_albedo(asset, make_renderer("cpu", cfg, cfg.bound), cfg, views=2, size=24),
                               torch.tensor([0.8, 0.3, 0.1]), atol=0.02, rtol=0)
    with torch.no_grad():
        asset.field.trunk[-1].bias[0] = -100.0  # nothing covered: mid-grey
        asset.field.blob_scale.zero_()
    torch.testing.assert_close(surface_albedo(asset, make_renderer("cpu", cfg, cfg.bound), cfg, views=2, size=24),
                               torch.full((3,), 0.5))


def test_normal_variation_costs_ripples_inside_the_silhouette_only():
    from dreamfusion.fit import normal_variation

    def maps(normal, opacity):  # (B, 3, H, W) and (B, 1, H, W) -> the renderer's (B H W, C) layout
        return {k: rearrange(v, "b c h w -> (b h w) c") for k, v in (("normal", normal), ("opacity", opacity))}

    up, full = torch.tensor([0.0, 0.0, 1.0]), torch.ones(1, 1, 4, 4)
    flat = up.view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert normal_variation(maps(flat, full), 1, 4) == 0
    striped = flat.clone()
    striped[..., 1::2] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # columns alternate between +z and +x
    # across: every one of the 3 column pairs differs by |1| + |1| in two of 3 channels; down: nothing
    torch.testing.assert_close(normal_variation(maps(striped, full), 1, 4), torch.tensor(2 / 3))
    half = full.clone()
    half[..., 1:] = 0.0  # only the first column is covered: no covered neighbours, so no cost
    assert normal_variation(maps(striped, half), 1, 4) == 0


def test_normal_smoothness_irons_out_a_rippled_field():
    from dreamfusion.config import ThreeDConfig
    from dreamfusion.fit import Asset, normal_variation, render, turntable_cameras
    from dreamfusion.renderer import make_renderer
    from dreamfusion.shading import Shading, fixed_light

    torch.manual_seed(0)
    cfg = ThreeDConfig(hidden=32, encoding="frequency", frequencies=4, background="fixed", samples_per_ray=24,
                       bound=1.2, blob_radius=0.6, blob_density=10.0)  # an opaque ball ...
    asset = Asset(cfg)
    top = [3 + block + 4 * c + 3 for block in (0, 12) for c in range(3)]  # sin and cos of octave 3 on x, y, z
    with torch.no_grad():  # ... rippled by large weights on the top octave's features
        asset.field.trunk[0].weight[:, top] *= 30.0
    renderer, cams = make_renderer("cpu", cfg, cfg.bound), turntable_cameras(2, cfg, "cpu", elevation=20.0)
    shading = Shading("lambertian", fixed_light(cams))

    def variation() -> torch.Tensor:  # the same samples every time
        out = render(asset, renderer, cams, 16, shading, cfg, train=True, generator=torch.Generator().manual_seed(0))
        return normal_variation(out, len(cams), 16)

    opt = torch.optim.SGD(asset.field.trunk.parameters(), lr=0.3)
    before = variation().item()
    for _ in range(10):
        opt.zero_grad()
        variation().backward()  # through the normals, i.e. the density's gradient
        opt.step()
    assert variation().item() < 0.6 * before, (before, variation().item())


def test_export_reexports_with_other_settings(tiny_sd, tmp_path, capsys):
    assert fit(tiny_sd, tmp_path) == 0
    d = only_run(tmp_path)
    assert run.main(["export", str(d), "mesh_resolution=20", "formats=[ply]", "turntable_frames=2", "--quiet"]) == 0
    [e] = [p for p in d.iterdir() if p.name.startswith("export-")]
    assert sorted(p.name for p in e.iterdir()) == ["config.yaml", "mesh.json", "mesh.ply", "mesh_turntable.mp4", "turntable.mp4"]
    assert json.loads((e / "mesh.json").read_text())["mesh_resolution"] == 20
    assert probe(e / "turntable.mp4")["frames"] == 2 and probe(e / "mesh_turntable.mp4")["frames"] == 2
    # options not given keep the run's own (mesh_resolution=24, turntable_frames=3 from TINY)
    assert run.main(["export", str(d), "formats=[glb]", "--quiet"]) == 0
    [e2] = [p for p in d.iterdir() if p.name.startswith("export-") and p != e]
    assert json.loads((e2 / "mesh.json").read_text())["mesh_resolution"] == 24
    assert probe(e2 / "turntable.mp4")["frames"] == 3 and (e2 / "mesh.glb").is_file()
    # a run made before the buffers in OPTIONAL_STATE existed still exports (they keep their defaults)
    from safetensors.torch import load_file, save_file

    from dreamfusion.fit import OPTIONAL_STATE

    state = load_file(str(d / "asset.safetensors"))
    save_file({k: v for k, v in state.items() if k not in OPTIONAL_STATE}, str(d / "asset.safetensors"))
    assert len(state) > len(load_file(str(d / "asset.safetensors")))
    assert run.main(["export", str(d), "formats=[ply]", "--quiet"]) == 0
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


@pytest.mark.parametrize("override, message", [
    ("steps=0", "steps must be at least 1"),
    ("resolution=0", "resolution must be a positive"),
    ("guidance=-1", "guidance must be a finite number >= 0"),
    ("mesh_resolution=100000", "mesh_resolution="),
    ("keep_components=-1", "keep_components must be >= 0"),
    ("refine_steps=2", "give it one too, e.g. albedo_grid=32"),
    ("refine_canvas=blank", "refine_canvas must be fit or plain"),
    ("normal_smooth_weight=-1", "loss weights must be >= 0"),
])
def test_3d_bad_input(tiny_sd, tmp_path, capsys, override, message):
    assert fit(tiny_sd, tmp_path, override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "3d").exists() or not list((tmp_path / "3d").iterdir())


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
    assert fit(tiny_sd, tmp_path / "ok") == 0
    d = only_run(tmp_path / "ok")
    assert "was made with guidance=10" in error("3d", "--resume", str(d), "guidance=20")
    # weights of another field layout than the config says (a run made before an option's default changed)
    saved = d / "config.yaml"
    saved.write_text(saved.read_text().replace("albedo_network: separate", "albedo_network: shared"))
    assert "does not fit its config's field options" in error("export", str(d))
