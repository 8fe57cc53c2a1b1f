"""AnimateDiff MotionAdapter checkpoints load into the motion slot, and match diffusers' AnimateDiffPipeline."""

import numpy as np
import pytest
import torch

import run
from pipelines.errors import UserError
from pipelines.prior import Prior
from pipelines.schedulers import SAMPLERS
from video.config import VideoConfig
from video.pipeline import AnimateDiffUNet, VideoModel, load_motion


def save_adapter(folder, block_out_channels=(4, 8), max_frames=32):
    """A tiny random MotionAdapter (2 norm groups); (4, 8) matches the tiny SD UNet's block widths."""
    from diffusers import MotionAdapter

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=block_out_channels, motion_layers_per_block=1, motion_norm_num_groups=2,
                            motion_num_attention_heads=2, motion_max_seq_length=max_frames)
    with torch.no_grad():  # AnimateDiff zero-initialises its outputs; random ones make the test meaningful
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("adapters") / "tiny-motion-adapter")


@pytest.mark.parametrize("sampler, frames", [("ddim", 4), ("ddim", 8), ("dpm++", 8), ("euler", 4)])
def test_matches_animatediff_pipeline(tiny_sd, tiny_adapter, sampler, frames):
    import diffusers
    from diffusers import AnimateDiffPipeline, MotionAdapter

    pipe = AnimateDiffPipeline.from_pretrained(tiny_sd, motion_adapter=MotionAdapter.from_pretrained(tiny_adapter))
    name, extra = SAMPLERS[sampler]  # diffusers' class and its extra config (dpm++: algorithm_type dpmsolver++)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red ball moving right", num_frames=frames, num_inference_steps=3, guidance_scale=7.5, height=16,
               width=16, generator=torch.Generator("cpu").manual_seed(2), output_type="pt").frames[0]  # (f, c, h, w)

    prior = Prior.from_pretrained(str(tiny_sd))
    model = VideoModel(prior, load_motion(prior, str(tiny_adapter)), str(tiny_adapter))
    cfg = VideoConfig(model=str(tiny_sd), sampler=sampler, steps=3, guidance=7.5, frames=frames, height=16, width=16)
    ours = model.generate("a red ball moving right", cfg, torch.Generator("cpu").manual_seed(2), progress=False)
    assert ours.shape == ref.shape == (frames, 3, 16, 16)
    assert np.abs(ours.numpy() - ref.float().numpy()).max() < 1e-4


def test_video_job_with_motion_adapter(tiny_sd, tiny_adapter, tmp_path):
    assert run.main(["video", "a cube", f"model={tiny_sd}", f"motion={tiny_adapter}", "steps=1", "frames=3",
                     "--out", str(tmp_path), "--quiet"]) == 0


def test_clips_longer_than_the_adapter_run_in_windows(tiny_sd, tmp_path):
    """frames > motion_max_seq_length: the UNet on half-overlapping windows of the adapter's length, fused with
    ramp weights. A frame inside one window only is that window's output; an overlap frame is their blend."""
    prior = Prior.from_pretrained(str(tiny_sd))
    unet = load_motion(prior, str(save_adapter(tmp_path / "adapter8", max_frames=8)))
    assert isinstance(unet, AnimateDiffUNet) and unet.window == 8
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 12, 2, 2, generator=g), torch.randn(2, 77, 32, generator=g)  # a CFG-sized batch
    t = torch.tensor([700, 700])
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=text).sample
        first = unet(x[:, :, :8], t, encoder_hidden_states=text).sample  # windows start at 0 and 4
        last = unet(x[:, :, 4:], t, encoder_hidden_states=text).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, :, :4], first[:, :, :4])
    torch.testing.assert_close(out[:, :, 8:], last[:, :, 4:])
    ramp = torch.tensor([1.0, 2, 3, 4, 4, 3, 2, 1])  # frame 4 + j: position 4 + j in the first window, j in the last
    w_first, w_last = ramp[4:], ramp[:4]
    blend = (first[:, :, 4:] * w_first[:, None, None] + last[:, :, :4] * w_last[:, None, None]) / (w_first + w_last)[:, None, None]
    torch.testing.assert_close(out[:, :, 4:8], blend)
    assert (first[:, :, 4:] - last[:, :, :4]).abs().max() > 1e-4  # the windows differ, so the blend is a real check


def test_video_job_longer_than_the_adapter(tiny_sd, tiny_adapter, tmp_path):
    """40 frames with a 32-frame adapter: a clip of 40 frames, not a tensor-size traceback."""
    from tests.tiny import probe

    assert run.main(["video", "a cube", f"model={tiny_sd}", f"motion={tiny_adapter}", "steps=1", "frames=40",
                     "height=16", "width=16", "--out", str(tmp_path), "--quiet"]) == 0
    [d] = list((tmp_path / "video").iterdir())
    assert probe(d / "video.mp4")["frames"] == 40


def test_adapter_with_other_channels_names_the_mismatch(tiny_sd, tmp_path, capsys):
    """Right block count, wrong widths: one line naming the first parameter that differs and both shapes."""
    wide = save_adapter(tmp_path / "wide-adapter", block_out_channels=(8, 16))
    prior = Prior.from_pretrained(str(tiny_sd))
    with pytest.raises(UserError) as e:
        load_motion(prior, str(wide))
    message = str(e.value)
    assert "\n" not in message and "down_blocks.0.motion_modules.0." in message, message
    assert "[8] in the adapter but [4] in the model" in message, message
    out = tmp_path / "out"
    assert run.main(["video", "a cube", f"model={tiny_sd}", f"motion={wide}", "steps=1", "frames=2",
                     "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "in the adapter but" in err, err
    assert not (out / "video").exists() or not list((out / "video").iterdir())
