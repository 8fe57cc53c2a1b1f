"""eval 4d's tests of a path: they pass ToyWorld's own motion, and fail a still, a wrong-way or a jumping one."""

import json

import numpy as np
import pytest

import run
from evals.config import MOTIONS_4D
from evals.fourd import motion_score, path_of, primitive_mesh, true_path


@pytest.mark.parametrize("motion", MOTIONS_4D)
def test_the_true_path_moves_as_its_word_says_and_smoothly(motion):
    got = motion_score(*path_of(true_path("cube", motion, 8, 4.0)), motion)
    assert got["correct"] and got["smooth"], got


@pytest.mark.parametrize("motion", MOTIONS_4D)
def test_a_still_asset_does_not_move_as_asked(motion):
    still = [primitive_mesh("sphere")] * 8
    assert not motion_score(*path_of(still), motion)["correct"]


def test_the_opposite_word_is_wrong():
    for motion, opposite in (("moving left", "moving right"), ("moving up", "moving down"), ("growing", "shrinking")):
        path = path_of(true_path("sphere", motion, 8, 4.0))
        assert motion_score(*path, motion)["correct"] and not motion_score(*path, opposite)["correct"]


def test_a_sideways_drift_is_not_a_move_up():
    meshes = true_path("cone", "moving right", 8, 4.0)
    for k, m in enumerate(meshes):  # up by less than it strays right
        m.apply_translation([0.0, 0.0, 0.05 * k])
    assert not motion_score(*path_of(meshes), "moving up")["correct"]


def test_a_jump_is_not_smooth():
    meshes = [primitive_mesh("cube").copy() for _ in range(8)]
    for m in meshes[4:]:
        m.apply_translation([0.0, 0.9, 0.0])
    got = motion_score(*path_of(meshes), "moving right")
    assert got["correct"] and not got["smooth"] and got["max_step_share"] > 0.99


def test_the_primitive_is_the_true_solid():
    import trimesh

    sphere = primitive_mesh("sphere")
    assert sphere.is_watertight
    assert np.allclose(sphere.centroid, 0, atol=0.02)
    assert isinstance(sphere, trimesh.Trimesh)


def test_eval_4d_end_to_end(tmp_path):
    """One shape, two motions, tiny fits: the static asset is fitted once, both motions animate it, and a resume
    of the finished eval scores nothing again."""
    args = ["eval", "4d", "shapes=[sphere]", "motions=[moving right, growing]", "steps=3", "dynamic.steps=2",
            "dynamic.frames=3", "render.resolution=16", "render.samples_per_ray=16", "export.mesh_resolution=24",
            "export.turntable_frames=2", "export.turntable_size=32", "iou_resolution=16", "rotations=2", "val_every=0",
            "--out", str(tmp_path), "--quiet"]
    assert run.main(args) == 0
    [eval_dir] = (tmp_path / "eval").iterdir()
    report = json.loads((eval_dir / "report.json").read_text())
    assert report["summary"]["assets"] == 2 == report["planned"]
    assert len(list((eval_dir / "3d").iterdir())) == 1  # one static fit serves both motions
    assert report["summary"]["ground_truth"]["motion_correct"] == 1.0
    row = report["assets"][0]
    assert len(row["frame_ious"]) == 3 and 0 <= row["iou"] <= 1 and len(row["color_hits"]) == 3
    before = (eval_dir / "report.md").read_text()
    assert run.main(["eval", "4d", "--resume", str(eval_dir), "--quiet"]) == 0
    assert (eval_dir / "report.md").read_text() == before
