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


def test_shipped_toyworld_motion_moves_the_ball_right():
    """The shipped ToyWorld prior and temporal layers (models/, nothing downloaded): "moving right" moves the
    ball's silhouette centroid right frame after frame. Independent frames (temporal layers bypassed) do not."""
    import torch

    from evals.motion import slope, tracks
    from video.config import VideoConfig
    from video.pipeline import VideoModel

    cfg = VideoConfig(model="toyworld", steps=4, frames=4, fps=8.0)  # 4 steps already show the motion
    model = VideoModel.load(cfg)
    clip = model.generate("a red ball moving right", cfg, torch.Generator("cpu").manual_seed(0), progress=False)
    x = tracks(clip[None])["x"][0]  # centroid x per frame, pixels of the 64-pixel frame
    # measured: steps of 2-3 px, as the training clips at fps 8; independent frames jump back and forth
    assert bool(((x.diff() > 0.5) & (x.diff() < 6)).all()) and float(slope(x[None])[0]) > 1.0, x.tolist()
