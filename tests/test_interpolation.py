"""Masked-frame conditioning: train interpolation, interpolate=k, image=PATH, and their bad inputs."""

import json

import pytest
import torch
from PIL import Image

import run
from tests.tiny import probe
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
    video = probe(d / "video.mp4")
    assert video["frames"] == (4 - 1) * 3 + 1 and video["fps"] == pytest.approx(8 * 3)  # as long, 3x smoother
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["frames"] == 10 and meta["fps"] == 24 and meta["masked_motion"] == str(masked_model)


def test_image_to_video(tiny_sd, masked_model, tmp_path, caplog):
    """The image, resized with a note, is the clip's first frame: exactly its VAE round trip."""
    import numpy as np

    from pipelines.prior import Prior
    from video.pipeline import load_image

    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "first.png")
    assert run.main(["video", "a red cube", f"model={tiny_sd}", f"masked_motion={masked_model}", "frames=3",
                     f"image={tmp_path / 'first.png'}", "steps=1", "save_frames=true", "--out", str(tmp_path / "o"),
                     "--quiet"]) == 0
    assert "resized" in caplog.text
    [d] = list((tmp_path / "o" / "video").iterdir())
    prior = Prior.from_pretrained(str(tiny_sd))
    image = load_image(str(tmp_path / "first.png"), prior.default_size, prior.default_size)
    expected = prior.decode_latents(prior.encode_images(image, sample=False))[0].permute(1, 2, 0).numpy() * 255
    frame0 = np.asarray(Image.open(d / "frames" / "frame_0000.png"), dtype=np.float32)
    assert np.abs(frame0 - expected).max() <= 1.0  # uint8 rounding only


def test_in_between_frames_are_conditioned_at_k_times_fps(tiny_sd, masked_model, tmp_path, monkeypatch):
    """The clip samples at fps; the frames filled in between sit 1 / (k fps) apart, and are sampled so."""
    import video.pipeline as vp

    seen, original = [], vp.sample
    monkeypatch.setattr(vp, "sample", lambda *a, **kw: seen.append((a[2].shape[2], kw["fps"], kw["strength"])) or original(*a, **kw))
    assert run.main(["video", "a red ball moving right", f"model={tiny_sd}", f"masked_motion={masked_model}",
                     "frames=3", "fps=6", "interpolate=4", "interpolate_strength=0.5", "steps=2", "--out", str(tmp_path),
                     "--quiet"]) == 0
    assert seen == [(3, 6.0, 1.0), (9, 24.0, 0.5)]


def test_blend_known_starts_the_in_between_frames_from_their_neighbours():
    from video.pipeline import blend_known

    known = torch.zeros(1, 4, 9, 2, 2)
    known[:, :, 0], known[:, :, 4], known[:, :, 8] = 1.0, 3.0, -1.0
    assert blend_known(known, 4)[0, 0, :, 0, 0].tolist() == [1, 1.5, 2, 2.5, 3, 2, 1, 0, -1]


def test_cross_fade_blends_the_given_frames():
    from evals.masked import cross_fade

    ramp = torch.linspace(0, 1, 9)[None, :, None, None, None].expand(2, 9, 3, 4, 4)
    assert torch.allclose(cross_fade(ramp, 4), ramp)  # a linear ramp is its own cross-fade
    step = torch.zeros(1, 5, 3, 2, 2)
    step[:, 4:] = 1
    assert cross_fade(step, 4)[0, :, 0, 0, 0].tolist() == [0, 0.25, 0.5, 0.75, 1]


def test_eval_video_scores_the_masked_model(tiny_sd, masked_model, tmp_path):
    assert run.main(["eval", "video", f"model={tiny_sd}", f"masked_motion={masked_model}", "steps=1", "frames=3",
                     "samples_per_prompt=1", "colors=[red]", "shapes=[cube]", "motions=[moving left]", "seam_frames=0",
                     "masked_clips=2", "interpolate=2", "--out", str(tmp_path), "--quiet"]) == 0
    [d] = list((tmp_path / "eval").iterdir())
    masked = json.loads((d / "report.json").read_text())["masked"]
    it, iv = masked["interpolation"], masked["image_to_video"]
    assert it["k"] == 2 and it["frames"] == (5 - 1) * 2 + 1 and it["fps"] == 16 and iv["frames"] == 3
    for key in ("pixel_error", "pixel_error_cross_fade", "pixel_error_vae_round_trip"):
        assert 0 < it[key] < 1
    assert 0 <= iv["identity_stability"] <= 1 and iv["first_step_jump"] > 0
    assert "Masked-frame model" in (d / "report.md").read_text()


def test_each_pass_reschedules_noise_by_its_own_models_window(tiny_sd, monkeypatch):
    """A plain pass uses the video UNet's attention window, a masked pass the masked-frame model's (an AnimateDiff
    motion UNet has no window of ours, so a masked pass beside it still gets FreeNoise's rescheduling)."""
    import video.pipeline as vp
    from pipelines.prior import Prior
    from video.config import VideoConfig
    from video.temporal import TemporalConfig, inflate

    prior = Prior.from_pretrained(str(tiny_sd))
    masked = inflate(prior.unet, TemporalConfig(text_dim=prior.unet.config.cross_attention_dim, window=4))
    model = vp.VideoModel(prior, torch.nn.Identity(), None, masked)  # a motion UNet without our temporal layers
    windows = []
    monkeypatch.setattr(vp, "reschedule_noise", lambda z, window, g: windows.append(window) or z)
    monkeypatch.setattr(vp, "sample", lambda prior, text, latents, *a, **kw: latents)
    cfg, g, shape = VideoConfig(steps=1), torch.Generator().manual_seed(0), (1, 4, 9, 2, 2)
    text = prior.encode_prompt(["a red ball"], words=True)
    model.sample(text, shape, cfg, g, False)
    model.sample(text, shape, cfg, g, False, known=torch.ones(shape))
    assert windows == [10**9, 4]
