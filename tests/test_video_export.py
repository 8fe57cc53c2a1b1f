"""Video files: a browser-playable MP4 (H.264, yuv420p) with the right frame count and fps, and a GIF."""

import pytest
import torch

from pipelines.media import write_frames, write_gif, write_mp4
from tests.tiny import probe


@pytest.mark.parametrize("fps, size", [(8, 64), (12, 33)])
def test_mp4_is_h264_yuv420p_with_all_frames(tmp_path, fps, size):
    frames = torch.rand(16, 3, size, size)
    path = write_mp4(tmp_path / "video.mp4", frames, fps)
    info = probe(path)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["frames"] == 16 and info["fps"] == pytest.approx(fps)
    assert info["width"] % 2 == 0 and info["width"] >= size
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]  # no temp files left


def test_gif_and_frames(tmp_path):
    import imageio.v3 as iio

    frames = torch.rand(5, 3, 16, 16)
    gif = iio.imread(write_gif(tmp_path / "preview.gif", frames, fps=8))
    assert gif.shape[0] == 5
    paths = write_frames(tmp_path / "frames", frames)
    assert [p.name for p in paths] == [f"frame_{i:04d}.png" for i in range(5)]
