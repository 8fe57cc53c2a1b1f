"""The prior against diffusers' StableDiffusionPipeline, and the interface's maths."""

import copy
import logging

import numpy as np
import pytest
import torch

from pipelines.image import generate
from pipelines.options import ImageConfig
from pipelines.prior import Prior
from pipelines.schedulers import SAMPLERS, make_scheduler


def reference_images(path, sampler, prompt, steps, guidance, seed, n=1, negative=None, size=32):
    """diffusers' own StableDiffusionPipeline on the same folder, scheduler and seed."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    name, extra = SAMPLERS[sampler]  # diffusers' class name and its extra config
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
                negative_prompt=negative, height=size, width=size, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed)).images


def our_images(path, sampler, prompt, steps, guidance, seed, n=1, negative=""):
    prior = Prior.from_pretrained(str(path))
    cfg = ImageConfig(model=str(path), sampler=sampler, steps=steps, guidance=guidance, num_images=n, negative=negative,
                      height=32, width=32)
    images = generate(prior, prompt, cfg, torch.Generator("cpu").manual_seed(seed), progress=False)
    return images.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "euler", "pndm", "ddpm"])
def test_matches_diffusers_epsilon(tiny_sd, sampler):
    ref = reference_images(tiny_sd, sampler, "a red cube", steps=4, guidance=7.5, seed=3, n=2, negative="blue")
    ours = our_images(tiny_sd, sampler, "a red cube", steps=4, guidance=7.5, seed=3, n=2, negative="blue")
    assert ref.shape == ours.shape == (2, 32, 32, 3)
    assert np.abs(ref - ours).max() < 1e-4


# Not pndm: diffusers' PNDM converts v to epsilon after combining several steps' outputs (with the current
# sample's alpha and sigma); the prior converts each output at its own timestep, so the two differ by design.
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_matches_diffusers_v_prediction(tiny_sd_v, sampler):
    ref = reference_images(tiny_sd_v, sampler, "a green ball", steps=3, guidance=5.0, seed=1)
    ours = our_images(tiny_sd_v, sampler, "a green ball", steps=3, guidance=5.0, seed=1)
    assert np.abs(ref - ours).max() < 1e-4


@pytest.fixture(scope="module")
def tiny_sd15_pndm(tiny_sd, tmp_path_factory):
    """The tiny model with SD-1.5's own scheduler config: PNDM, PLMS only (skip_prk_steps)."""
    import json
    import shutil

    from diffusers import PNDMScheduler

    path = tmp_path_factory.mktemp("models") / "tiny-sd15-pndm"
    shutil.copytree(tiny_sd, path)
    shutil.rmtree(path / "scheduler")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1).save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("steps", [1, 3])  # PLMS needs no warm-up: any step count runs
def test_pndm_matches_diffusers_with_sd15_scheduler_config(tiny_sd15_pndm, steps):
    ref = reference_images(tiny_sd15_pndm, "pndm", "a red cube", steps=steps, guidance=7.5, seed=4, n=2, negative="blue")
    ours = our_images(tiny_sd15_pndm, "pndm", "a red cube", steps=steps, guidance=7.5, seed=4, n=2, negative="blue")
    assert np.abs(ref - ours).max() < 1e-4


def test_cfg_is_one_batched_unet_call(tiny_sd):
    prior = Prior.from_pretrained(str(tiny_sd))
    text = prior.encode_prompt(["a red cube"] * 3)
    calls = []
    prior.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(3, 4, 4, 4)
    eps = prior.predict_noise(x, 500, text, guidance=7.5)
    assert calls == [6] and eps.shape == x.shape
    # guidance = 1 is the plain conditional prediction, from a single half-size call
    eps1 = prior.predict_noise(x, 500, text, guidance=1.0)
    assert calls[-1] == 3
    with torch.no_grad():  # the UNet itself on the prompts alone, not through predict_noise
        cond = prior.unet(x, torch.tensor(500), encoder_hidden_states=text.cond).sample
        uncond = prior.unet(x, torch.tensor(500), encoder_hidden_states=text.uncond).sample
    assert (cond - uncond).abs().max() > 1e-3  # the prompt matters, so the checks below can tell them apart
    torch.testing.assert_close(eps1, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps, uncond + 7.5 * (cond - uncond), atol=1e-4, rtol=1e-4)


def test_guidance_formula(tiny_sd):
    prior = Prior.from_pretrained(str(tiny_sd))
    text = prior.encode_prompt(["a red cube"], negative="blue")
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([700])
    uncond = prior.predict_noise(x, t, type(text)(text.uncond, text.uncond), guidance=1.0)
    cond = prior.predict_noise(x, t, text, guidance=1.0)
    torch.testing.assert_close(prior.predict_noise(x, t, text, guidance=4.0), uncond + 4.0 * (cond - uncond),
                               atol=1e-5, rtol=1e-5)


def test_parameterisation_round_trips(tiny_sd_v):
    prior = Prior.from_pretrained(str(tiny_sd_v))
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    x_t = prior.add_noise(x0, eps, t)
    torch.testing.assert_close(prior.to_x0(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prior.eps_from_x0(x_t, x0, t), eps, atol=1e-4, rtol=1e-4)
    # a v-prediction model learns v = a*eps - s*x0 (Salimans & Ho 2022), and its output converts back to eps
    v = prior.training_target(x0, eps, t)
    abar = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prior.eps_from_v(x_t, v, t), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prior.to_eps(x_t, v, t), eps, atol=1e-5, rtol=1e-5)
    # the same forward process as diffusers' scheduler
    ref = make_scheduler("ddpm", prior.noise_config).add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, ref, atol=1e-5, rtol=1e-5)


def test_vae_chunking_does_not_change_results(tiny_sd):
    prior = Prior.from_pretrained(str(tiny_sd))
    latents = torch.randn(5, 4, 4, 4)
    torch.testing.assert_close(prior.decode_latents(latents, chunk=2), prior.decode_latents(latents, chunk=8),
                               atol=1e-5, rtol=1e-5)
    images = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(prior.encode_images(images, chunk=1, sample=False),
                               prior.encode_images(images, chunk=3, sample=False), atol=1e-5, rtol=1e-5)
    f = prior.vae_scale_factor
    assert prior.decode_latents(latents).shape == (5, 3, 4 * f, 4 * f)


def test_long_prompt_truncated_with_warning(tiny_sd, caplog):
    prior = Prior.from_pretrained(str(tiny_sd))
    long_prompt = "a red cube " * 20 + "TAILWORDS"
    with caplog.at_level(logging.WARNING, logger="pipelines.prior"):
        text = prior.encode_prompt([long_prompt])
    assert text.cond.shape[1] == prior.tokenizer.model_max_length
    assert "truncated" in caplog.text and "TAILWORDS".lower() in caplog.text.lower()


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_beta_schedules(tiny_sd, schedule):
    prior = Prior.from_pretrained(str(tiny_sd), beta_schedule=schedule)
    abar = prior.alphas_cumprod
    assert abar.shape == (1000,) and bool((abar[1:] < abar[:-1]).all())
    sched = make_scheduler("ddim", prior.noise_config)
    assert sched.config.beta_schedule == {"cosine": "squaredcos_cap_v2"}.get(schedule, schedule)


def _fast_path_outputs(model, device: str, dtype: torch.dtype, fast: bool, compile: bool = False,
                       unet: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided UNet's noise and the VAE's decode on fixed inputs, with the fast path on or off (`unet`: a
    copy of it replaces the model's)."""
    prior = Prior.from_pretrained(str(model), device, dtype)
    if unet is not None:
        prior.unet = copy.deepcopy(unet).to(device, dtype)
    if fast:
        prior.speed_up(fuse_qkv=True, channels_last=True, compile=compile)
    g = torch.Generator().manual_seed(0)
    size = prior.default_size // prior.vae_scale_factor
    x = torch.randn(2, prior.latent_channels, size, size, generator=g).to(device)
    with torch.no_grad():
        eps = prior.predict_noise(x, 500, prior.encode_prompt(["a red cube", "a blue ball"]), guidance=7.5)
        return eps.float().cpu(), prior.decode_latents(x).float().cpu()


def test_fast_path_is_the_same_maths(tiny_sd):
    """Fused q/k/v and channels_last change how the work is laid out, not the result."""
    (eps, image), (eps_fast, image_fast) = (_fast_path_outputs(tiny_sd, "cpu", torch.float32, fast) for fast in (False, True))
    torch.testing.assert_close(eps_fast, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(image_fast, image, atol=1e-4, rtol=1e-4)
    prior = Prior.from_pretrained(str(tiny_sd)).speed_up()
    fused = [m for m in prior.unet.modules() if type(m).__name__ == "Attention"]
    assert fused and all(type(m.processor).__name__ == "FusedAttnProcessor2_0" for m in fused)


def test_compiled_unet_is_the_same_maths_and_caches_its_kernels(tiny_sd, tmp_path, monkeypatch):
    """compile=true: torch.compile of the UNet in place (still the same module), the same numbers,
    and its generated code lands in the on-disk cache a second run reuses."""
    from diffusers import UNet2DConditionModel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch.manual_seed(0)  # one attention block, half the tiny UNet: inductor's CPU codegen takes half as long
    unet = UNet2DConditionModel(block_out_channels=(4,), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                mid_block_type=None, cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2).eval()
    (eps, image), (eps_compiled, image_compiled) = (
        _fast_path_outputs(tiny_sd, "cpu", torch.float32, True, compile=c, unet=unet) for c in (False, True))
    torch.testing.assert_close(eps_compiled, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(image_compiled, image)  # the VAE is not compiled
    assert any((tmp_path / "inductor").rglob("*.py"))
    prior = Prior.from_pretrained(str(tiny_sd)).speed_up(compile=True)
    assert type(prior.unet).__name__ == "UNet2DConditionModel" and prior.unet._compiled_call_impl is not None
    torch._dynamo.reset()
