"""The video sampler's maths, checked directly: classifier-free guidance on the video UNet's two predictions."""

import pytest
import torch

import pipelines.sampling
from pipelines.prior import Prior
from video.config import VideoConfig
from video.pipeline import VideoModel
from video.temporal import inflate


@pytest.fixture(scope="module")
def model(tiny_sd):
    prior = Prior.from_pretrained(str(tiny_sd))
    unet = inflate(prior.unet)
    with torch.no_grad():  # identity-initialised layers would make the frames independent; these mix them
        g = torch.Generator().manual_seed(0)
        for p in unet.temporal.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return VideoModel(prior, unet, None)


@pytest.mark.parametrize("guidance", [7.5, 3.0])
def test_video_sampler_guides_with_both_predictions(model, monkeypatch, guidance):
    """Each scheduler step of `VideoModel.sample` gets eps_u + g (eps_c - eps_u), eps_c and eps_u from two
    separate calls of the video UNet on the prompt and on the negative prompt."""
    steps_seen, make = [], pipelines.sampling.make_scheduler

    def recording_scheduler(*args, **kwargs):
        scheduler = make(*args, **kwargs)
        step = scheduler.step
        scheduler.step = lambda eps, t, x, **kw: steps_seen.append((eps.clone(), t, x.clone())) or step(eps, t, x, **kw)
        return scheduler

    monkeypatch.setattr(pipelines.sampling, "make_scheduler", recording_scheduler)
    prior = model.prior
    cfg = VideoConfig(model="tiny", sampler="ddim", steps=2, guidance=guidance, frames=3, height=16, width=16, fps=6.0)
    text = prior.encode_prompt(["a red ball moving right"], negative="blue", words=True)
    model.sample(text, (1, prior.latent_channels, 3, 2, 2), cfg, torch.Generator().manual_seed(0), False)
    assert len(steps_seen) == 2
    for eps, t, x in steps_seen:  # DDIM: the UNet's input is the scheduler's sample unscaled
        with torch.no_grad():
            cond = model.unet(x, t, encoder_hidden_states=text.cond, fps=6.0, words=text.cond_words).sample
            uncond = model.unet(x, t, encoder_hidden_states=text.uncond, fps=6.0, words=text.uncond_words).sample
        assert (cond - uncond).abs().max() > 1e-3  # the prompts differ, so guidance is visible
        torch.testing.assert_close(eps, uncond + guidance * (cond - uncond), atol=1e-4, rtol=1e-4)
