"""Write clips: H.264/yuv420p MP4 (plays in browsers) through PyAV, a GIF preview, PNG frames.

Every file is written to a temp name and renamed (`pipelines.runtime.atomic_path`), so a killed
run never leaves a half-written video under its final name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.runtime import atomic_path


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8."""
    return (frames.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def write_mp4(path: str | Path, frames: torch.Tensor, fps: float, crf: int = 18) -> Path:
    """H.264 in yuv420p (what browsers play). yuv420p needs even sides, so odd sizes are padded by one."""
    import av

    rgb = to_uint8(frames)
    _, h, w, _ = rgb.shape
    rgb = np.pad(rgb, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=_rate(fps))
            stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in rgb:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return path


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def write_gif(path: str | Path, frames: torch.Tensor, fps: float) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, to_uint8(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    return path


def write_frames(folder: str | Path, frames: torch.Tensor) -> list[Path]:
    from PIL import Image

    from pipelines.runtime import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(to_uint8(frames)):
        save_image(folder / f"frame_{i:04d}.png", Image.fromarray(frame))
        paths.append(folder / f"frame_{i:04d}.png")
    return paths


def probe(path: str | Path) -> dict:
    """Decode a video with PyAV: codec, pixel format, size, frame count and fps."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "width": stream.codec_context.width, "height": stream.codec_context.height,
                "frames": count, "fps": float(stream.average_rate or stream.guessed_rate)}
