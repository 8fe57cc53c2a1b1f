"""SDS: the reparameterised loss has exactly the gradient w(t) (eps_hat - eps) at the latents."""

import pytest
import torch

from dreamfusion.config import GuidanceConfig
from dreamfusion.guidance import SDS, perpendicular
from pipelines.errors import UserError
from pipelines.prior import Prior


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


@pytest.mark.parametrize("bad", [dict(scale=-1.0), dict(t_min=0.5, t_max=0.4), dict(t_max=1.5),
                                 dict(weighting="nope"), dict(encode_size=2)])
def test_bad_guidance_options(bad):
    with pytest.raises(UserError):
        GuidanceConfig(**bad).validate()
