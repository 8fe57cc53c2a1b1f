"""Image and video files: PNG, H.264 MP4 (yuv420p, plays in browsers), GIF; every write is atomic."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .runtime import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounded like diffusers' numpy_to_pil."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) in [0, 1] (to_pil's inverse, up to its rounding)."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255


def save_image(path: str | Path, image: Image.Image) -> Path:
    """Save a PIL image atomically, in the format its name's suffix says."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    return path


def write_mp4(path: str | Path, frames: torch.Tensor, fps: float, crf: int = 18) -> Path:
    """Frames (F, 3, H, W) in [0, 1] -> H.264 in yuv420p, which needs even sides: odd sizes are padded by one."""
    import av

    rgb = to_uint8(frames)
    _, h, w, _ = rgb.shape
    rgb = np.pad(rgb, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in rgb:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return path


def write_gif(path: str | Path, frames: torch.Tensor, fps: float) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, to_uint8(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    return path


def write_frames(folder: str | Path, frames: torch.Tensor) -> list[Path]:
    """Every frame as folder/frame_0000.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_image(folder / f"frame_{i:04d}.png", image) for i, image in enumerate(to_pil(frames))]
