"""`run.py export RUN_DIR` on a run folder made directly (a random asset saved as a fit saves it, no fit):
concurrent exports, damaged weights files, and no half-made export folders."""

import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file, save_file

import run
from dreamfusion import reexport
from dreamfusion.config import ThreeDConfig
from dreamfusion.fit import STAGE, WEIGHTS_NAME, Asset, save_asset
from pipelines import config
from pipelines.rundir import RunDir

# A field that is quick to query, a fixed iso-level (no silhouette sweep) and one tiny turntable frame.
TINY = ["render.resolution=16", "render.samples_per_ray=16", "export.mesh_resolution=16", "export.iso_level=5",
        "export.turntable_frames=1", "export.turntable_size=16", "field.encoding=frequency", "field.hidden=16",
        "model=unused"]  # export never loads the prior


def make_run(folder: Path, checkpoint: bool = False) -> Path:
    """A 3d run folder as a fit leaves it: config.yaml and asset.safetensors (or, unfinished, only a checkpoint).
    The albedo is made far from grey, different per channel and varying with position."""
    cfg = config.load(ThreeDConfig, "3d", TINY)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    asset = Asset(cfg)
    with torch.no_grad():
        head = asset.field.albedo[-1]  # the separate albedo MLP's output layer
        head.weight.mul_(20)
        head.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    if checkpoint:
        (folder / "checkpoints" / STAGE).mkdir(parents=True)
        save_file({f"asset.{k}": v.contiguous() for k, v in asset.state_dict().items()},
                  str(folder / "checkpoints" / STAGE / "model.safetensors"))
    else:
        save_asset(asset, folder / WEIGHTS_NAME)
    RunDir(folder).write_config(cfg, prompt="a red cube")
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))  # hidden entries too


def test_concurrent_exports_of_one_run_all_succeed_in_distinct_folders(tmp_path, monkeypatch):
    """Three exports of one run at once, started in the same second (the clock is frozen) and all mid-export
    before any has finished: each gets its own complete folder, and no temp folder is left."""
    d = make_run(tmp_path / "run")
    before = set(listing(d))

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    barrier, export_asset = threading.Barrier(3, timeout=60), reexport.export_asset

    def together(*args, **kwargs):
        barrier.wait()  # all three exports are under way before any claims its folder
        return export_asset(*args, **kwargs)

    monkeypatch.setattr(reexport, "datetime", Frozen)
    monkeypatch.setattr(reexport, "export_asset", together)
    codes = [None] * 3

    def export(i):
        codes[i] = run.main(["export", str(d), "--quiet"])

    threads = [threading.Thread(target=export, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0, 0]
    folders = sorted(p.name for p in d.iterdir() if p.name not in before and p.is_dir())
    assert folders == ["export-20260102-030405", "export-20260102-030405~2", "export-20260102-030405~3"]
    (tmp_path / "plain").mkdir()  # an export folder gets the mode of any folder made here (not mkdtemp's 0700)
    for name in folders:
        assert (d / name).stat().st_mode == (tmp_path / "plain").stat().st_mode, name
        assert sorted(p.name for p in (d / name).iterdir()) == ["config.yaml", "index.html", "mesh.glb", "mesh.json",
                                                                 "mesh.obj", "mesh.ply", "mesh_turntable.mp4",
                                                                 "turntable.mp4"]
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_exported_mesh_colours_are_the_fields_albedo_at_the_vertices(tmp_path):
    """The mesh's vertex colours are the field's albedo (not density, normals, or another channel order) at each
    vertex, as the exported PLY (world frame) stores them."""
    d = make_run(tmp_path / "run")
    folder = reexport.main(reexport.ExportConfig(formats=("ply",)), d, progress=False)
    mesh = trimesh.load(folder / "mesh.ply", force="mesh")
    cfg = config.load(ThreeDConfig, "3d", TINY)
    asset = Asset(cfg)
    asset.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
    with torch.no_grad():
        albedo = asset.field(torch.as_tensor(mesh.vertices, dtype=torch.float32))[1].numpy()  # (V, 3)
    colors = mesh.visual.vertex_colors[:, :3] / 255
    assert albedo.std(0).min() > 0.03 and np.abs(albedo.mean(0)[0] - albedo.mean(0)[2]) > 0.2  # a telling albedo
    assert np.abs(colors - albedo).max() <= 0.6 / 255 + 1e-4


def test_failed_exports_leave_nothing(tmp_path, monkeypatch, capsys):
    d = make_run(tmp_path / "run")
    before = listing(d)
    assert run.main(["export", str(d), "iso_level=1e9", "--quiet"]) == 2  # fails while building the mesh
    assert "no surface at iso-level" in capsys.readouterr().err
    assert listing(d) == before
    # fails after the export is built and its name claimed, at the final rename: neither folder stays
    replace = reexport.os.replace

    def failing(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(reexport.os, "replace", failing)
    with pytest.raises(OSError):
        reexport.main(reexport.ExportConfig(), d, progress=False)
    assert listing(d) == before


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def empty(path: Path) -> None:
    path.write_bytes(b"")


def all_ff_payload(path: Path) -> None:
    """Keep the header, set every weight byte to 0xFF (NaN in float32): the header and size still check out."""
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:header] + b"\xff" * (len(data) - header))


@pytest.mark.parametrize("checkpoint", [False, True], ids=["asset", "checkpoint"])
@pytest.mark.parametrize("damage", [truncate, garble, empty, all_ff_payload])
def test_export_of_a_damaged_weights_file_is_one_line_naming_it(tmp_path, capsys, damage, checkpoint):
    d = make_run(tmp_path / "run", checkpoint=checkpoint)
    weights = d / "checkpoints" / STAGE / "model.safetensors" if checkpoint else d / WEIGHTS_NAME
    load_file(str(weights))  # readable before the damage
    damage(weights)
    before = listing(d)
    assert run.main(["export", str(d), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(weights) in err and "corrupt" in err, err
    assert listing(d) == before  # nothing written
