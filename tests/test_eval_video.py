"""eval video: the motion metrics on ground-truth clips, and a smoke run of the whole report."""

import json

import torch

import run
from evals.motion import displacement_per_frame, motion_correct, slope, smoothness, tracks
from evals.video import seam_report
from toyworld.video import sample_clip_batch
from toyworld.vocab import MOTIONS


def gt_clips(n, fps=8.0, frames=8, seed=0):
    videos, _, labels = sample_clip_batch(n, torch.Generator().manual_seed(seed), frames=frames, size=48, fps=fps)
    return videos.permute(0, 2, 1, 3, 4), [MOTIONS[int(m)] for m in labels["motion"]]


def test_motion_metric_is_right_on_ground_truth():
    clips, motions = gt_clips(64)
    flags = motion_correct(clips, motions)
    scored = [f for f in flags if f is not None]
    assert len(scored) > 40 and sum(scored) / len(scored) >= 0.95
    assert all(f is None for f, m in zip(flags, motions) if m == "spinning")


def test_metric_rejects_the_wrong_direction():
    clips, motions = gt_clips(64, seed=1)
    swapped = {"moving left": "moving right", "moving right": "moving left", "growing": "shrinking",
               "shrinking": "growing", "moving up": "moving down", "moving down": "moving up"}
    flags = [f for f, m in zip(motion_correct(clips, [swapped.get(m, m) for m in motions]), motions) if m in swapped]
    assert flags and sum(flags) / len(flags) <= 0.05


def test_tracks_and_fps_effect_on_ground_truth():
    slow, _ = gt_clips(32, fps=12.0, seed=2)
    fast, _ = gt_clips(32, fps=4.0, seed=2)
    assert displacement_per_frame(fast) > 2 * displacement_per_frame(slow)
    assert smoothness(fast) > smoothness(slow) > 0
    assert slope(torch.tensor([[0.0, 1.0, 2.0, 3.0]])).item() == 1.0
    assert tracks(slow)["area"].min() > 0


def test_seam_report_finds_a_jump_at_a_window_edge():
    frames, window = 20, 8  # windows start at 0, 4, 8, 12: their edges are the transitions after frames 3, 7, 11, 15
    ramp = torch.linspace(0, 1, frames)[None, :, None, None, None].expand(2, frames, 3, 4, 4).clone()
    smooth = seam_report(ramp, window)
    assert smooth["edge_transitions"] == [3, 7, 11, 15] and abs(smooth["ratio"] - 1) < 1e-3
    jumped = ramp.clone()
    jumped[:, 8:] += 0.5  # a hard cut between frames 7 and 8, an edge
    assert seam_report(jumped, window)["ratio"] > 2


def test_eval_video_report(tiny_sd, tmp_path):
    assert run.main(["eval", "video", f"model={tiny_sd}", "steps=1", "frames=3", "samples_per_prompt=1",
                     "colors=[red]", "shapes=[cube]", "motions=[moving left, bouncing]", "seam_frames=20", "--out", str(tmp_path),
                     "--quiet"]) == 0
    [d] = list((tmp_path / "eval").iterdir())
    report = json.loads((d / "report.json").read_text())
    assert report["clips"] == 2 and set(report["per_motion"]) == {"moving left", "bouncing"}
    for key in ("frame_color_accuracy", "frame_shape_accuracy", "identity_stability", "smoothness", "fps_effect"):
        assert key in report
    assert report["seams"]["frames"] == 20 and report["seams"]["window"] == 16 and report["seams"]["ratio"] > 0
    assert 0.5 <= report["ground_truth"]["motion_accuracy"] <= 1  # 3 frames at 16 px: a coarse check
    assert (d / "report.md").is_file() and (d / "strip.png").is_file()
