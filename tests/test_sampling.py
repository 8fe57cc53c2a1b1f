"""The shared denoising loop: SDEdit starts (init, strength) and given frames (the replacement method)."""

import pytest
import torch

from pipelines.prior import Prior
from pipelines.sampling import initial_noise, sample


@pytest.fixture(scope="module")
def prior(tiny_sd):
    return Prior.from_pretrained(str(tiny_sd))


def _spy(prior, monkeypatch):
    seen, original = [], prior.predict_noise
    monkeypatch.setattr(prior, "predict_noise", lambda x, t, *a, **kw: seen.append((x.clone(), int(t))) or original(x, t, *a, **kw))
    return seen


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_strength_runs_the_last_steps_from_the_noised_init(prior, monkeypatch, sampler):
    size = prior.default_size // prior.vae_scale_factor
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    noise = initial_noise((1, prior.latent_channels, size, size), g(), prior.device)
    init = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    text = prior.encode_prompt(["a red cube"])
    seen = _spy(prior, monkeypatch)
    full = sample(prior, text, noise, sampler, 10, 7.5, g(), False)
    assert len(seen) == 10
    seen.clear()
    light = sample(prior, text, noise, sampler, 10, 7.5, g(), False, init=init, strength=0.2)
    assert len(seen) == 2 and seen[0][1] < 250  # only the two least noisy of ten steps
    assert (light - init).abs().mean() < 0.5 * (full - init).abs().mean()  # it stays near where it started
    seen.clear()
    assert torch.equal(sample(prior, text, noise, sampler, 10, 7.5, g(), False, init=init, strength=1.0), full)


def test_given_frames_enter_every_step_noised_to_it(prior, monkeypatch):
    """Where the mask is 1, each step's input is the given latents noised as training noises them."""
    size = prior.default_size // prior.vae_scale_factor
    clean = torch.randn(8, prior.latent_channels, size, size, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(8, 1, 1, 1)
    mask[::2] = 1
    noise = initial_noise(clean.shape, torch.Generator().manual_seed(0), prior.device)
    seen = _spy(prior, monkeypatch)
    sample(prior, prior.encode_prompt(["a red cube"] * 8), noise, "ddim", 5, 7.5, torch.Generator().manual_seed(0),
           False, given=(clean, mask))
    for x, t in seen:
        abar = prior.alphas_cumprod[t]
        eps = (x[::2] - abar.sqrt() * clean[::2]) / (1 - abar).sqrt()
        assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1) < 0.15, t
        other = (x[1::2] - abar.sqrt() * clean[1::2]) / (1 - abar).sqrt()
        assert t > 500 or abs(other.std() - 1) > 0.15  # the free frames are not tied to `clean`


@pytest.mark.parametrize("sampler, steps, message", [
    ("pndm", 3, "sampler=pndm needs steps >= 4"),  # the tiny model's config runs PNDM's Runge-Kutta warm-up
    ("ddim", 1001, "steps=1001 is more than the model's 1000 training timesteps"),
    ("ddpm", 5000, "steps=5000 is more than"),
])
def test_step_counts_a_scheduler_cannot_lay_out_are_one_line_errors(prior, sampler, steps, message):
    from pipelines.errors import UserError

    noise = initial_noise((1, prior.latent_channels, 4, 4), torch.Generator().manual_seed(0), prior.device)
    with pytest.raises(UserError) as e:
        sample(prior, prior.encode_prompt(["a red cube"]), noise, sampler, steps, 7.5, torch.Generator(), False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pndm_runs_from_its_shortest_step_count(prior):
    """PNDM's step takes no generator; 4 steps (13 evaluations with its warm-up) run and give finite latents."""
    noise = initial_noise((1, prior.latent_channels, 4, 4), torch.Generator().manual_seed(0), prior.device)
    out = sample(prior, prior.encode_prompt(["a red cube"]), noise, "pndm", 4, 7.5, torch.Generator().manual_seed(0), False)
    assert out.shape == noise.shape and torch.isfinite(out).all()
