"""AnimateDiff MotionAdapter checkpoints load into the motion slot, and match diffusers' AnimateDiffPipeline."""

import numpy as np
import pytest
import torch

import run
from pipelines.prior import Prior
from video.config import VideoConfig
from video.pipeline import VideoModel, load_motion


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """A tiny random MotionAdapter matching the tiny SD UNet (block widths 4, 8; 2 norm groups)."""
    from diffusers import MotionAdapter

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(4, 8), motion_layers_per_block=1, motion_norm_num_groups=2,
                            motion_num_attention_heads=2, motion_max_seq_length=32)
    with torch.no_grad():  # AnimateDiff zero-initialises its outputs; random ones make the test meaningful
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("adapters") / "tiny-motion-adapter"
    adapter.save_pretrained(path, safe_serialization=True)
    return path


def test_matches_animatediff_pipeline(tiny_sd, tiny_adapter):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    pipe = AnimateDiffPipeline.from_pretrained(tiny_sd, motion_adapter=MotionAdapter.from_pretrained(tiny_adapter))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red ball moving right", num_frames=4, num_inference_steps=3, guidance_scale=7.5, height=16, width=16,
               generator=torch.Generator("cpu").manual_seed(2), output_type="pt").frames[0]  # (f, c, h, w)

    prior = Prior.from_pretrained(str(tiny_sd))
    model = VideoModel(prior, load_motion(prior, str(tiny_adapter)), str(tiny_adapter))
    cfg = VideoConfig(model=str(tiny_sd), sampler="ddim", steps=3, guidance=7.5, frames=4, height=16, width=16)
    ours = model.generate("a red ball moving right", cfg, torch.Generator("cpu").manual_seed(2), progress=False)
    assert ours.shape == ref.shape == (4, 3, 16, 16)
    assert np.abs(ours.numpy() - ref.float().numpy()).max() < 1e-4


def test_video_job_with_motion_adapter(tiny_sd, tiny_adapter, tmp_path):
    assert run.main(["video", "a cube", f"model={tiny_sd}", f"motion={tiny_adapter}", "steps=1", "frames=3",
                     "--out", str(tmp_path), "--quiet"]) == 0
