"""GPU-only checks (`pytest -m gpu`); they skip on CPU machines, and a CPU test proves the skip fires."""

import pytest
import torch

from pipelines import Prior
from pipelines.image import ImageConfig, generate
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
