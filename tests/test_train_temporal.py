"""`run.py train temporal` on a tiny prior: ToyWorld clips, a folder of videos, caption-free mode."""

import json
from types import SimpleNamespace

import torch

import run
from pipelines.media import write_mp4

TINY = ["frames=3", "bank_size=6", "batch_size=2", "steps=2", "checkpoint_every=1", "warmup_steps=1", "device=cpu",
        "--quiet"]


def only_run(out):
    [d] = list((out / "train").iterdir())
    return d


SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def stand_in_prior():
    """The part of a Prior that TemporalObjective uses: SD's epsilon-prediction noise schedule (the real
    `NoiseSchedule`) and an `embed` that gives zero text states (no text encoder)."""
    from diffusers import DDPMScheduler

    from pipelines.prior import NoiseSchedule

    class StandIn(NoiseSchedule):
        def embed(self, ids, mask=None, words=False):
            return torch.zeros(len(ids), 3, 8), None

    return StandIn(dict(DDPMScheduler(**SD_SCHEDULE).config), "cpu")


def test_train_temporal_toyworld_then_video(tiny_sd, tmp_path):
    assert run.main(["train", "temporal", f"model={tiny_sd}", *TINY, "--out", str(tmp_path / "t")]) == 0
    d = only_run(tmp_path / "t")
    assert (d / "loss_curve.png").is_file() and json.loads((d / "metadata.json").read_text())["steps"] == 2
    motion = d / "motion"
    assert run.main(["video", "a red ball moving left", f"model={tiny_sd}", f"motion={motion}", "steps=1", "frames=3",
                     "--out", str(tmp_path / "v"), "--quiet"]) == 0
    # resume trains on from the checkpoint to more steps
    assert run.main(["train", "temporal", f"resume={d}", "steps=3", "--quiet"]) == 0
    assert json.loads((d / "metadata.json").read_text())["steps"] == 3


def test_train_temporal_on_a_video_folder_caption_free(tiny_sd, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_mp4(videos / f"clip{i}.mp4", torch.rand(12, 3, 20, 20), fps=12)
    (videos / "notes.txt").write_text("not a video")
    assert run.main(["train", "temporal", f"model={tiny_sd}", f"data={videos}", "captions=false", *TINY,
                     "--out", str(tmp_path / "t")]) == 0
    meta = json.loads((only_run(tmp_path / "t") / "metadata.json").read_text())
    assert meta["captions"] is False and meta["clips"] == 6


def test_resume_trains_on_the_runs_own_clips(tiny_sd, tmp_path, monkeypatch):
    """The clip source is picked from the resumed run's data=, not from this command's default (toyworld)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "clip.mp4", torch.rand(12, 3, 20, 20), fps=12)
    asked, source = [], run.clip_source
    monkeypatch.setattr(run, "clip_source", lambda data: asked.append(data) or source(data))
    assert run.main(["train", "temporal", f"model={tiny_sd}", f"data={videos}", *TINY, "--out", str(tmp_path / "t")]) == 0
    assert run.main(["train", "temporal", f"resume={only_run(tmp_path / 't')}", "steps=3", "--quiet"]) == 0
    assert asked == [str(videos), str(videos)]


def test_train_temporal_empty_video_folder_is_a_clear_error(tiny_sd, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.mp4").write_bytes(b"not really a video")
    assert run.main(["train", "temporal", f"model={tiny_sd}", f"data={empty}", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no readable video" in err and "\n" not in err
    assert not any((tmp_path / "train").iterdir())  # nothing half-written


def test_v_loss_weighting_favours_noisy_steps():
    """loss_weighting=v: the epsilon error weighted by 1/alpha_bar(t), clipped, mean 1 over t."""
    from diffusers import DDPMScheduler

    from video.train import TemporalObjective

    abar = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    prior = stand_in_prior()
    torch.testing.assert_close(prior.alphas_cumprod, abar)
    eps = TemporalObjective(None, prior, "eps").weight
    v = TemporalObjective(None, prior, "v", max_weight=20.0).weight
    assert torch.equal(eps, torch.ones_like(eps))
    expected = (1 / abar).clamp(max=20.0)
    torch.testing.assert_close(v, expected / expected.mean())
    assert abs(float(v.mean()) - 1) < 1e-5 and float(v.max() / v.min()) <= 20.0 + 1e-3
    assert (v[1:] >= v[:-1]).all() and v[-1] > v[0]  # never less weight on a noisier step


def test_train_temporal_v_weighting_runs(tiny_sd, tmp_path):
    assert run.main(["train", "temporal", f"model={tiny_sd}", *TINY, "loss_weighting=v", "--out", str(tmp_path)]) == 0
    d = only_run(tmp_path)
    log = json.loads((d / "losses.json").read_text())
    assert log and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert json.loads((d / "metadata.json").read_text())["config"]["loss_weighting"] == "v"


def test_noise_start_clips_see_pure_noise_and_target_the_clip():
    """noise_start: a `pure` clip's input is the noise alone (what the sampler's first step sees), and its
    target is the noise that makes that input from the clip at t, so predicting it means predicting z0."""
    from diffusers import DDPMScheduler

    from video.train import TemporalObjective

    seen = {}

    class Recorder(torch.nn.Module):  # a video UNet that predicts a fixed guess and records its input
        temporal = SimpleNamespace(cfg=SimpleNamespace(word_states=False))

        def forward(self, x_t, t, emb, **kwargs):
            seen["x_t"] = x_t
            return SimpleNamespace(sample=torch.zeros_like(x_t))

    abar = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    objective = TemporalObjective(Recorder(), stand_in_prior())
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    loss = objective(torch.zeros(2, 5, dtype=torch.long), z0, noise, torch.tensor([950, 950]), torch.tensor([8.0, 8.0]),
                     pure=torch.tensor([True, False]))
    a = abar[950]
    torch.testing.assert_close(seen["x_t"][0], noise[0])  # nothing of the clip in the pure input
    torch.testing.assert_close(seen["x_t"][1], a.sqrt() * z0[1] + (1 - a).sqrt() * noise[1])
    target = torch.stack([(noise[0] - a.sqrt() * z0[0]) / (1 - a).sqrt(), noise[1]])
    torch.testing.assert_close(loss, target.pow(2).mean(dim=(1, 2, 3, 4)).mean())  # zero prediction: mean square


def test_train_temporal_noise_start_runs_and_is_checked(tiny_sd, tmp_path, capsys):
    assert run.main(["train", "temporal", f"model={tiny_sd}", *TINY, "noise_start=0.5", "--out", str(tmp_path / "ok")]) == 0
    d = only_run(tmp_path / "ok")
    assert json.loads((d / "metadata.json").read_text())["config"]["noise_start"] == 0.5
    assert [p.name for p in (d / "checkpoints").iterdir()] == ["temporal"]  # the stage keeps its name
    for bad in ("noise_start=1.5", "noise_start_timesteps=[990,900]"):
        assert run.main(["train", "temporal", f"model={tiny_sd}", bad, *TINY, "--out", str(tmp_path / "bad")]) == 2
        assert "noise_start" in capsys.readouterr().err


def test_v_prediction_prior_trains_the_temporal_layers_on_v(tiny_sd_v):
    """On a v-prediction prior (SD-2.x at 768), the video UNet learns v = a*eps - s*z0, not epsilon: the loss of
    a fixed prediction is its square error to v counted in epsilon units (times alpha_bar: eps = s x_t + a v),
    with a, s from the model's own alpha_bar(t), so loss_weighting means the same as on an epsilon prior."""
    from diffusers import DDIMScheduler

    from pipelines.prior import Prior
    from video.train import TemporalObjective

    seen = {}

    class Recorder(torch.nn.Module):  # a video UNet that predicts a fixed guess and records its input
        temporal = SimpleNamespace(cfg=SimpleNamespace(word_states=False))

        def forward(self, x_t, t, emb, **kwargs):
            seen["x_t"] = x_t
            return SimpleNamespace(sample=seen["guess"])

    scheduler = DDIMScheduler.from_pretrained(str(tiny_sd_v), subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    abar = scheduler.alphas_cumprod.double()
    prior = Prior.from_pretrained(str(tiny_sd_v))
    g = torch.Generator().manual_seed(0)
    z0, noise, other = (torch.randn(2, 4, 3, 4, 4, generator=g) for _ in range(3))
    t, fps = torch.tensor([100, 800]), torch.tensor([8.0, 8.0])
    ids = prior.tokenize(["a red ball moving left", ""])
    a, s = (x.float().reshape(-1, 1, 1, 1, 1) for x in (abar[t].sqrt(), (1 - abar[t]).sqrt()))
    v = a * noise - s * z0
    per_clip = lambda guess, target: (guess - target).pow(2).mean(dim=(1, 2, 3, 4))  # noqa: E731

    def loss_of(guess, weighting="eps"):
        seen["guess"] = guess
        return TemporalObjective(Recorder(), prior, weighting, max_weight=20.0)(ids, z0, noise, t, fps)

    in_eps = abar[t].float()  # a squared error in v, counted in epsilon
    # a fixed prediction's loss is its square error to v, in epsilon units: the error of the epsilon it implies
    torch.testing.assert_close(loss_of(other), (in_eps * per_clip(other, v)).mean(), atol=1e-5, rtol=1e-5)
    x_t = a * z0 + s * noise
    torch.testing.assert_close(seen["x_t"], x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_of(other), per_clip(s * x_t + a * other, noise).mean(), atol=1e-5, rtol=1e-5)
    # predicting v exactly costs nothing; predicting epsilon exactly (the epsilon target) does not
    assert float(loss_of(v)) < 1e-8
    eps_loss = loss_of(noise)
    torch.testing.assert_close(eps_loss, (in_eps * per_clip(noise, v)).mean(), atol=1e-5, rtol=1e-5)
    assert float(eps_loss) > 0.01
    # loss_weighting=v weights each clip by 1/alpha_bar(t) (clipped, mean 1 over t), still against v
    w = (1 / abar).clamp(max=20.0)
    w = (w / w.mean()).float()[t]
    torch.testing.assert_close(loss_of(other, "v"), (w * in_eps * per_clip(other, v)).mean(), atol=1e-5, rtol=1e-5)


def test_train_temporal_on_a_v_prediction_prior(tiny_sd_v, tmp_path):
    assert run.main(["train", "temporal", f"model={tiny_sd_v}", *TINY, "--out", str(tmp_path)]) == 0
    d = only_run(tmp_path)
    log = json.loads((d / "losses.json").read_text())
    assert log and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["steps"] == 2 and meta["config"]["loss_weighting"] == "v" and meta["config"]["noise_start"] == 0.5
    assert (d / "motion" / "temporal_layers.safetensors").is_file()
