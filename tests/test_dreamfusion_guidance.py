"""SDS: the reparameterised loss has exactly the gradient w(t) (eps_hat - eps) at the latents."""

import pytest
import torch

from dreamfusion.config import GuidanceConfig
from dreamfusion.guidance import SDS, perpendicular
from pipelines.errors import UserError
from pipelines.prior import Conditioning, NoiseSchedule, Prior

# SD's training schedule (scaled_linear, 1000 steps), so alpha_bar spans (0, 1) as in the real prior.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


class AnalyticPrior(NoiseSchedule):
    """A stand-in prior that wants exactly one latent, `target` (C, h, w): its denoiser returns the epsilon implied by
    x0 = target, eps_hat = (x_t - sqrt(abar) target) / sqrt(1 - abar), whatever the prompt and guidance. Its "VAE"
    maps images in [0, 1] to latents 2 x - 1 (3 channels), differentiably. Then eps_hat - eps =
    sqrt(abar) / sqrt(1 - abar) (latents - target) exactly: SDS must pull latents towards the target."""

    def __init__(self, target: torch.Tensor):
        super().__init__(SD_SCHEDULE)
        self.target, self.default_size = target, target.shape[-1]

    def predict_noise(self, x_t, t, text, guidance):
        return self.eps_from_x0(x_t, self.target.expand_as(x_t), t)

    def encode_images(self, images, generator=None, chunk=8):
        return images * 2 - 1


def no_text(n: int) -> Conditioning:
    return Conditioning(cond=torch.zeros(n, 1, 1), uncond=torch.zeros(n, 1, 1))


@pytest.fixture(scope="module")
def prior(tiny_sd):
    return Prior.from_pretrained(str(tiny_sd))


def test_sds_gradient_is_weighted_noise_residual(prior):
    sds = SDS(prior, GuidanceConfig(scale=7.0, encode_size=None))
    text = prior.encode_prompt(["a red cube", "a blue ball"])
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 4, 8, 8)

    target = (latents - sds.grad(latents, text, t, noise)).detach()  # the loss SDS.loss builds
    (0.5 * torch.nn.functional.mse_loss(latents, target, reduction="sum")).backward()

    with torch.no_grad():  # w(t) (eps_hat - eps), computed here from the prior's interface
        eps_hat = prior.predict_noise(prior.add_noise(latents, noise, t), t, text, 7.0)
        expected = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1) * (eps_hat - noise)
    torch.testing.assert_close(latents.grad, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().sum() > 0


def test_sds_loss_draws_t_in_range_and_is_reproducible(prior):
    sds = SDS(prior, GuidanceConfig(encode_size=None))  # the prior's own size
    text = prior.encode_prompt(["a red cube"] * 4)
    images = torch.rand(4, 3, prior.default_size, prior.default_size)
    a = sds.loss(images, text, 0.0, torch.Generator().manual_seed(3))
    b = sds.loss(images, text, 0.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a[0], b[0])
    lo, hi = sds.t_range(0.0)
    assert ((a[1]["t"] >= lo) & (a[1]["t"] <= hi)).all()


def test_sds_gradient_reaches_the_render(prior):
    sds = SDS(prior, GuidanceConfig(scale=100.0, encode_size=None))
    images = torch.rand(1, 3, 32, 32, requires_grad=True)  # resized to the prior's size before encoding
    loss, _ = sds.loss(images, prior.encode_prompt(["a red cube"]), 0.5, torch.Generator().manual_seed(0))
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_sds_descent_brings_a_render_closer_to_what_the_prior_wants():
    """Gradient descent on SDS.loss of a free image moves it towards the image the prior denoises to, at every step
    (with the sign of the loss flipped it moves away); whatever t and noise each step draws."""
    gen = torch.Generator().manual_seed(0)
    want = torch.rand(1, 3, 8, 8, generator=gen) * 0.6 + 0.2  # an image in [0, 1]
    prior = AnalyticPrior(want[0] * 2 - 1)
    sds = SDS(prior, GuidanceConfig(scale=7.5, encode_size=None, t_max_end=None))
    image = torch.rand(1, 3, 8, 8, generator=gen).requires_grad_(True)
    opt = torch.optim.SGD([image], lr=0.1)
    distances = [float((image - want).detach().norm())]
    for step in range(20):
        opt.zero_grad()
        loss, info = sds.loss(image, no_text(1), step / 20, gen)
        loss.backward()
        opt.step()
        distances.append(float((image - want).detach().norm()))
    assert all(b < a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.5 * distances[0], distances


@pytest.mark.parametrize("weighting", ["sds", "uniform", "snr"])
def test_sds_weighting_is_the_documented_w_of_t(weighting):
    """w(t) read back from SDS.grad: with the analytic prior, grad = w(t) sqrt(abar) / sqrt(1 - abar) (latents -
    target) exactly, so w(t) = <grad, d> / <d, d> with d that direction, compared with each weighting's formula."""
    prior = AnalyticPrior(torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(1)))
    sds = SDS(prior, GuidanceConfig(weighting=weighting))
    t = torch.tensor([0, 20, 150, 400, 500, 750, 980, 999])
    latents = torch.randn(len(t), 4, 6, 6, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(len(t), 4, 6, 6, generator=torch.Generator().manual_seed(3))
    grad = sds.grad(latents, no_text(len(t)), t, noise)
    abar = prior.alphas_cumprod[t].double()
    d = (abar.sqrt() / (1 - abar).sqrt()).view(-1, 1, 1, 1) * (latents - prior.target).double()
    measured = (grad.double() * d).sum((1, 2, 3)) / (d * d).sum((1, 2, 3))
    expected = {"sds": 1 - abar, "uniform": torch.ones_like(abar), "snr": abar.sqrt() * (1 - abar).sqrt()}[weighting]
    torch.testing.assert_close(measured, expected, rtol=1e-3, atol=1e-6)
    assert abar.min() < 0.01 and abar.max() > 0.99  # the formulas differ a lot over these t


def test_upper_time_anneals():
    class FakePrior:
        num_train_timesteps, default_size = 1000, 8
        alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    sds = SDS(FakePrior(), GuidanceConfig(t_max=0.98, t_max_end=0.5))
    assert sds.t_range(0.0) == (20, 980) and sds.t_range(1.0) == (20, 500) and sds.t_range(0.5)[1] == 740


def test_perp_neg_removes_only_the_perpendicular_part(prior):
    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    p = perpendicular(x, y)
    assert (p * y).sum((1, 2, 3)).abs().max() < 1e-4
    torch.testing.assert_close(perpendicular(3 * y, y), torch.zeros_like(y), atol=1e-5, rtol=0)

    sds = SDS(prior, GuidanceConfig(scale=10.0, encode_size=None, perp_neg=True, perp_neg_weight=1.0))
    text = prior.encode_prompt(["a red cube, front view"])
    same = prior.encode_prompt(["a red cube, front view"])  # a negative parallel to the positive: no change
    latents, noise, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
    torch.testing.assert_close(sds.grad(latents, text, t, noise, negatives=[same]), sds.grad(latents, text, t, noise),
                               atol=1e-4, rtol=1e-4)
    other = prior.encode_prompt(["a red cube, back view"])
    assert not torch.allclose(sds.grad(latents, text, t, noise, negatives=[other]), sds.grad(latents, text, t, noise))


def test_perp_neg_subtracts_the_perpendicular_part_of_the_other_views_directions():
    """With a stand-in denoiser whose epsilon is the prompt embedding itself (uncond 0, positive e1, negative
    e1 + e2: its direction's part perpendicular to the positive is e2), Perp-Neg's guided epsilon is
    scale (e1 - weight e2): it steers away from the other view, by exactly that much."""

    class EmbeddingPrior(NoiseSchedule):
        default_size = 1

        def __init__(self):
            super().__init__(SD_SCHEDULE)

        def predict_noise(self, x_t, t, text, guidance):
            assert guidance == 1.0  # Perp-Neg guides by hand from the plain predictions
            return text.cond.reshape(x_t.shape)

    e1, e2 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    text, negative = Conditioning(cond=e1, uncond=0 * e1), Conditioning(cond=e1 + e2, uncond=0 * e1)
    prior = EmbeddingPrior()
    sds = SDS(prior, GuidanceConfig(scale=7.0, perp_neg=True, perp_neg_weight=0.5))
    latents, noise, t = torch.zeros(1, 2, 1, 1), torch.tensor([0.3, -0.2]).reshape(1, 2, 1, 1), torch.tensor([600])
    eps_hat = 7.0 * (e1 - 0.5 * e2).reshape(1, 2, 1, 1)
    expected = (1 - prior.alphas_cumprod[t]) * (eps_hat - noise)
    torch.testing.assert_close(sds.grad(latents, text, t, noise, negatives=[negative]), expected)


@pytest.mark.parametrize("bad", [dict(scale=-1.0), dict(t_min=0.5, t_max=0.4), dict(t_max=1.5),
                                 dict(weighting="nope"), dict(encode_size=2)])
def test_bad_guidance_options(bad):
    with pytest.raises(UserError):
        GuidanceConfig(**bad).validate()
