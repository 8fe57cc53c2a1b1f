"""Masked-frame conditioning: train interpolation, interpolate=k, image=PATH, and their bad inputs."""

import json

import pytest
import torch
from PIL import Image

import run
from video.export import probe
from video.train import known_frames_mask

TINY = ["frames=4", "bank_size=6", "batch_size=2", "steps=2", "checkpoint_every=1", "warmup_steps=1", "device=cpu",
        "--quiet"]


@pytest.fixture(scope="module")
def masked_model(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("interp")
    assert run.main(["train", "interpolation", f"model={tiny_sd}", *TINY, "--out", str(out)]) == 0
    [d] = list((out / "train").iterdir())
    assert d.name.endswith("-interpolation")
    return d / "motion"


def test_masks():
    g = torch.Generator().manual_seed(0)
    first = known_frames_mask("first", 3, 8, g)[:, 0, :, 0, 0]
    assert first.shape == (3, 8) and (first[:, 0] == 1).all() and (first[:, 1:] == 0).all()
    every = known_frames_mask("interpolation", 5, 8, g)[:, 0, :, 0, 0]
    assert (every[:, 0] == 1).all() and (every.sum(1) >= 2).all() and (every.sum(1) <= 4).all()
    assert known_frames_mask("none", 2, 8, g) is None


def test_interpolate_makes_fk_frames_and_keeps_the_clip(tiny_sd, masked_model, tmp_path):
    assert run.main(["video", "a red ball moving right", f"model={tiny_sd}", f"masked_motion={masked_model}",
                     "frames=4", "interpolate=3", "steps=1", "save_frames=true", "--out", str(tmp_path), "--quiet"]) == 0
    [d] = list((tmp_path / "video").iterdir())
    assert probe(d / "video.mp4")["frames"] == (4 - 1) * 3 + 1
    assert json.loads((d / "metadata.json").read_text())["frames"] == 10


def test_image_to_video(tiny_sd, masked_model, tmp_path, caplog):
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "first.png")
    assert run.main(["video", "a red cube", f"model={tiny_sd}", f"masked_motion={masked_model}", "frames=3",
                     f"image={tmp_path / 'first.png'}", "steps=1", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "resized" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["interpolate=0"], "interpolate must be at least 1"),
    (["interpolate=2"], "need a masked-frame model"),
    (["image=/no/such.png"], "does not exist"),
    (["image=NOTANIMAGE", "masked_motion=MASKED"], "cannot be read as an image"),
])
def test_masked_bad_input(tiny_sd, masked_model, tmp_path, capsys, args, message):
    (tmp_path / "bad.png").write_text("not an image")
    args = [a.replace("NOTANIMAGE", str(tmp_path / "bad.png")).replace("MASKED", str(masked_model)) for a in args]
    assert run.main(["video", "a cube", f"model={tiny_sd}", "steps=1", "frames=2", *args, "--out", str(tmp_path / "o"),
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o" / "video").exists() or not list((tmp_path / "o" / "video").iterdir())
