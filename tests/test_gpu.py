"""GPU-only checks (`pytest -m gpu`); they skip on CPU machines, and a CPU test proves the skip fires."""

import pytest
import torch

from pipelines.image import generate
from pipelines.options import ImageConfig
from pipelines.prior import Prior
from pipelines.runtime import pick_device, pick_dtype
from tests.conftest import requires_cuda


def test_gpu_skip_condition_is_a_real_bool():
    condition = requires_cuda.mark.args[0]
    assert isinstance(condition, bool) and condition == (not torch.cuda.is_available())


@pytest.mark.gpu
@requires_cuda
def test_toyworld_image_on_cuda_bf16_matches_cpu_fp32():
    device = pick_device("auto")
    assert device.type == "cuda" and pick_dtype("auto", device) in (torch.bfloat16, torch.float16)
    cfg = ImageConfig(steps=10, num_images=2)
    gpu = generate(Prior.from_pretrained("toyworld", device, pick_dtype("auto", device)), "a red cube", cfg,
                   torch.Generator("cpu").manual_seed(0), progress=False)
    cpu = generate(Prior.from_pretrained("toyworld"), "a red cube", cfg, torch.Generator("cpu").manual_seed(0),
                   progress=False)
    assert torch.isfinite(gpu).all()
    # the same noise (drawn on the CPU generator) gives nearly the same picture in half precision
    assert (gpu.cpu() - cpu).abs().mean() < 0.05


@pytest.mark.gpu
@requires_cuda
def test_3d_fit_on_cuda_with_nerfacc_and_a_tiny_sd_prior(tiny_sd, tmp_path):
    """A few SDS steps through nerfacc's occupancy grid, bf16 autocast, then the export, on the last GPU named
    by index (cuda:N): Accelerate must not move the asset to cuda:0 while the prior stays on cuda:N."""
    import json

    pytest.importorskip("av", reason="the turntable export needs PyAV (bench/gpu_check.sh carries no av: 36 MB)")

    import run

    device = f"cuda:{torch.cuda.device_count() - 1}"
    assert run.main(["3d", "a red cube", f"model={tiny_sd}", f"device={device}", "steps=6", "render.resolution=32", "batch_size=2",
                     "guidance.encode_size=16", "export.mesh_resolution=32", "export.turntable_frames=2",
                     "export.turntable_size=32", "render.grid_update_every=2", "val_every=0",
                     "--out", str(tmp_path), "--quiet"]) == 0
    [d] = list((tmp_path / "3d").iterdir())
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["device"] == device and meta["steps"] == 6 and (d / "mesh.glb").is_file()


@pytest.mark.gpu
@requires_cuda
def test_fast_path_on_cuda_matches_it_off(tiny_sd):
    """bf16 on CUDA: fused q/k/v + channels_last against the plain layout, within bf16's rounding."""
    from tests.test_prior import _fast_path_outputs

    (eps, image), (eps_fast, image_fast) = (_fast_path_outputs(tiny_sd, "cuda", torch.bfloat16, fast) for fast in (False, True))
    torch.testing.assert_close(eps_fast, eps, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(image_fast, image, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@requires_cuda
def test_compiled_unet_on_cuda_matches_it_off(tiny_sd):
    """compile=true on CUDA in bf16 against the eager fast path, within bf16's rounding."""
    from tests.test_prior import _fast_path_outputs

    torch._dynamo.reset()
    (eps, _), (eps_compiled, _) = (_fast_path_outputs(tiny_sd, "cuda", torch.bfloat16, True, compile=c) for c in (False, True))
    torch.testing.assert_close(eps_compiled, eps, atol=3e-2, rtol=3e-2)
    torch._dynamo.reset()


@pytest.mark.gpu
@requires_cuda
def test_cuda_graphs_match_the_compiled_unet(tiny_sd):
    """cuda_graphs=true (torch.compile's reduce-overhead mode) replays the same kernels: same outputs."""
    from pipelines.prior import Prior

    outputs = []
    for graphs in (False, True):
        torch._dynamo.reset()
        prior = Prior.from_pretrained(str(tiny_sd), "cuda", torch.bfloat16).speed_up(compile=True, cuda_graphs=graphs)
        x = torch.randn(2, prior.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
        text = prior.encode_prompt(["a red cube", "a blue ball"])
        with torch.no_grad():
            outputs.append([prior.predict_noise(x, t, text, guidance=7.5).clone() for t in (500, 500, 200)])
    torch._dynamo.reset()
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=3e-2)
