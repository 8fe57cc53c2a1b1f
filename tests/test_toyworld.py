"""Tests for the toyworld renderer, captions and motion clips (CPU, a few seconds)."""

import math

import pytest
import torch

from pipelines.geometry import camera_frame, camera_rays
from toyworld.model import build_tokenizer
from toyworld.render import MARKER_RGB, SPHERE_RADIUS, render, render_with_aux
from toyworld.video import animate, sample_clip_batch
from toyworld.vocab import MOTIONS, SHAPES
from toyworld.world import VOCAB, Scene, caption, sample_scenes, view_name


def make_scene(shape="sphere", azimuth=0.0, elevation=0.0, distance=3.5, fov=40.0, scale=1.0, n=1):
    """A batch of n identical scenes with explicit parameters."""
    full = lambda v: torch.full((n,), float(v))
    return Scene(
        shape=torch.full((n,), SHAPES.index(shape)), color=torch.zeros(n, dtype=torch.long),
        azimuth_deg=full(azimuth), elevation_deg=full(elevation), distance=full(distance),
        fov_deg=full(fov), scale=full(scale), yaw_deg=full(0), offset=torch.zeros(n, 3),
    )


def centroids(alpha):
    """Alpha-weighted (x, y) pixel centroid of masks (..., H, W)."""
    h, w = alpha.shape[-2:]
    total = alpha.sum((-2, -1))
    x = (alpha.sum(-2) * torch.arange(w)).sum(-1) / total
    y = (alpha.sum(-1) * torch.arange(h)).sum(-1) / total
    return x, y


@pytest.mark.parametrize("distance,fov,scale", [(3.5, 40.0, 1.0), (3.2, 35.0, 0.7), (4.0, 45.0, 1.2)])
def test_sphere_silhouette_matches_projected_disc(distance, fov, scale):
    size = 128
    _, alpha, _ = render_with_aux(make_scene("sphere", 37.0, 20.0, distance, fov, scale), size)
    # The silhouette cone has half-angle asin(r/d); it meets the image plane in a disc.
    half_angle = math.asin(SPHERE_RADIUS * scale / distance)
    radius_px = math.tan(half_angle) / math.tan(math.radians(fov) / 2) * size / 2
    assert alpha.sum().item() == pytest.approx(math.pi * radius_px**2, rel=0.02)


def test_sphere_depth_at_centre_pixel():
    size = 64
    _, _, depth = render_with_aux(make_scene("sphere", distance=3.5), size, supersample=1)
    centre = depth[0, 0, size // 2 - 1: size // 2 + 1, size // 2 - 1: size // 2 + 1]
    assert torch.allclose(centre, torch.tensor(3.5 - SPHERE_RADIUS), atol=0.01)


def test_camera_rays_convention():
    origins, dirs = camera_rays(*camera_frame(torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]), 3.0), 40.0, 8)
    assert origins.shape == dirs.shape == (2, 8, 8, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(2, 8, 8))
    assert torch.allclose(origins[0, 0, 0], torch.tensor([3.0, 0.0, 0.0]), atol=1e-6)  # azimuth 0 = +x
    assert torch.allclose(origins[1, 0, 0], torch.tensor([0.0, 3.0, 0.0]), atol=1e-6)  # azimuth 90 = +y
    assert dirs[0, 0, :, 2].mean() > 0 > dirs[0, -1, :, 2].mean()  # top row looks up (+z)
    # Looking from +x towards the origin, image right = forward x up = (-x) x z = +y.
    assert dirs[0, :, -1, 1].mean() > 0 > dirs[0, :, 0, 1].mean()


@pytest.mark.parametrize("motion,axis,sign", [
    ("moving left", "x", -1), ("moving right", "x", 1), ("moving up", "y", -1), ("moving down", "y", 1),
])
def test_translation_moves_centroid_in_screen_direction(motion, axis, sign):
    frames = 6
    scene = make_scene("cube", azimuth=123.0, elevation=20.0, distance=4.0, scale=0.6)
    clip = animate(scene, torch.tensor([MOTIONS.index(motion)]), torch.tensor([6.0]), frames)
    _, alpha, _ = render_with_aux(clip, 48)
    x, y = centroids(alpha[:, 0])
    steps = (x if axis == "x" else y).diff() * sign
    assert (steps > 0.5).all()


def test_higher_fps_means_less_motion_per_frame():
    scene = make_scene("sphere", azimuth=10.0, elevation=10.0, distance=4.0, scale=0.6, n=2)
    clip = animate(scene, torch.tensor([1, 1]), torch.tensor([4.0, 12.0]), 4)
    _, alpha, _ = render_with_aux(clip, 48)
    x, _ = centroids(alpha[:, 0].reshape(2, 4, 48, 48))
    per_frame = x.diff(dim=1).mean(1)
    assert float(per_frame[0]) == pytest.approx(3 * float(per_frame[1]), rel=0.1)


def test_scene_offsets_lie_in_the_screen_plane():
    centred = sample_scenes(200, torch.Generator().manual_seed(4))
    moved = sample_scenes(200, torch.Generator().manual_seed(4), max_offset=0.5, p_offset=0.5)
    assert (centred.offset == 0).all()
    for name in ("shape", "color", "azimuth_deg", "elevation_deg", "scale"):  # the same scenes, only moved
        assert torch.equal(getattr(centred, name), getattr(moved, name))
    off = moved.offset.norm(dim=1) > 0
    assert 0.3 < off.float().mean() < 0.7 and moved.offset.abs().max() <= 0.5 * 2 ** 0.5 + 1e-6
    _, _, _, forward = camera_frame(moved.azimuth_deg, moved.elevation_deg, moved.distance)
    assert (moved.offset * forward).sum(1).abs().max() < 1e-5  # no motion towards the camera


def test_clip_batch_outputs_and_determinism():
    make = lambda seed: sample_clip_batch(4, torch.Generator().manual_seed(seed), frames=5, size=24)
    videos, captions, labels = make(1)
    assert videos.shape == (4, 3, 5, 24, 24)
    assert {"shape", "color", "motion", "view", "fps"} <= set(labels)
    for text, motion in zip(captions, labels["motion"].tolist()):
        assert text.endswith(MOTIONS[motion])
    again = make(1)
    assert torch.equal(videos, again[0]) and captions == again[1]
    assert not torch.equal(videos, make(2)[0])
    fixed = sample_clip_batch(3, torch.Generator().manual_seed(1), frames=2, size=16, fps=12)[2]["fps"]
    assert (fixed == 12).all()


@pytest.mark.parametrize("azimuth,elevation,expected", [
    (0, 0, "front"), (30, 20, "front"), (-30, 0, "front"), (90, 10, "side"), (180, 0, "back"),
    (200, 45, "back"), (270, 0, "side"), (330, 60, "front"), (0, 70, "overhead"), (180, 61, "overhead"),
])
def test_view_name_rule(azimuth, elevation, expected):
    assert view_name(azimuth, elevation) == expected


def test_view_name_on_tensors():
    assert view_name(torch.tensor([0.0, 90.0, 180.0]), torch.tensor([0.0, 0.0, 80.0])) == ["front", "side", "overhead"]


@pytest.mark.parametrize("shape", SHAPES)
def test_front_marker_visible_only_from_front(shape):
    scene = make_scene(shape, n=2, elevation=10.0)
    scene.azimuth_deg = torch.tensor([0.0, 180.0])
    images = render(scene, 48, supersample=1)
    marker = (images - torch.tensor(MARKER_RGB)[:, None, None]).abs().amax(1) < 0.02  # (2, H, W)
    front, back = marker.sum((1, 2)).tolist()
    assert front >= 15 and back == 0
    assert not torch.equal(images[0], images[1])


def test_captions_use_only_vocab_words():
    # caption_words was deleted: the shipped word-level tokenizer (unknown words -> <unk>) is the check now.
    g = torch.Generator().manual_seed(3)
    scenes = sample_scenes(64, g)
    captions = [caption(scenes, i, view=i % 2 == 0, synonyms=i % 3 == 0, rng=g) for i in range(64)]
    _, clip_captions, _ = sample_clip_batch(16, torch.Generator().manual_seed(3), frames=1, size=8, p_synonym=0.5)
    tokenizer = build_tokenizer(max_tokens=32)
    for text in captions + clip_captions:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(text.replace(",", " ,").split()) + 2  # every word is one token (plus <s>, </s>)
    assert {w for text in clip_captions for w in text.split()} <= set(VOCAB)
    assert any("view" in text for text in captions) and any("view" not in text for text in captions)


def test_caption_format_and_words():
    scene = make_scene("cube", azimuth=90.0, elevation=10.0)
    assert caption(scene, 0) == "a red cube, side view"
    assert caption(scene, 0, view=False) == "a red cube"
    assert caption(scene, 0, view=False, synonyms=True) in ("a red box", "a red block")
    assert list(VOCAB) == sorted(VOCAB)


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError):
        render(make_scene(), size=0)
    with pytest.raises(ValueError):
        sample_clip_batch(1, torch.Generator(), fps=0)
    with pytest.raises(ValueError):
        sample_clip_batch(1, torch.Generator(), frames=0)
