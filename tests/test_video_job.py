"""`run.py video` on tiny models: the run directory, a playable MP4, and its bad inputs."""

import json

import pytest

import run
from tests.tiny import probe


def test_video_run_directory(tiny_sd, tmp_path):
    assert run.main(["video", "a red ball moving right", f"model={tiny_sd}", "steps=2", "frames=5", "fps=12",
                     "save_frames=true", "--out", str(tmp_path), "--quiet"]) == 0
    [d] = list((tmp_path / "video").iterdir())
    info = probe(d / "video.mp4")
    assert (info["codec"], info["pix_fmt"], info["frames"], info["fps"]) == ("h264", "yuv420p", 5, 12.0)
    assert (d / "preview.gif").is_file() and len(list((d / "frames").glob("*.png"))) == 5
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["frames"] == 5 and meta["fps"] == 12.0 and "denoise" in meta["timings_s"]


def test_video_with_saved_motion_module(tiny_sd, tmp_path):
    from pipelines.prior import Prior
    from video.temporal import inflate

    inflate(Prior.from_pretrained(str(tiny_sd)).unet).temporal.save(tmp_path / "motion")
    assert run.main(["video", "a cube", f"model={tiny_sd}", f"motion={tmp_path / 'motion'}", "steps=1", "frames=3",
                     "--out", str(tmp_path / "o"), "--quiet"]) == 0
    # longer than the 16-frame window: windowed attention and rescheduled noise
    assert run.main(["video", "a cube", f"model={tiny_sd}", f"motion={tmp_path / 'motion'}", "steps=1", "frames=40",
                     "--out", str(tmp_path / "long"), "--quiet"]) == 0
    [d] = list((tmp_path / "long" / "video").iterdir())
    assert probe(d / "video.mp4")["frames"] == 40


@pytest.mark.parametrize("override, message", [
    ("frames=0", "frames must be between 1 and"),
    ("frames=257", "frames must be between 1 and 256"),
    ("fps=0", "fps must be a positive number"),
    ("fps=-3", "fps must be a positive number"),
    ("height=31", "not a multiple of the VAE factor"),
    ("motion=MODEL", "is not a motion module"),
])
def test_video_bad_input(tiny_sd, tmp_path, capsys, override, message):
    override = override.replace("MODEL", str(tiny_sd))  # a real folder that is not a motion module
    out = tmp_path / "out"
    assert run.main(["video", "a red ball", f"model={tiny_sd}", "steps=1", "frames=2", override,
                     "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (out / "video").exists() or not list((out / "video").iterdir())

