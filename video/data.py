"""Training clips for `train temporal`: what a clip source returns, and one that cuts a folder of videos.

A source is called as `source(n, frames, size, fps_choices, seed, progress)` and returns uint8 clips
(N, 3, F, H, W), their captions and their frame rates (N,). ToyWorld supplies one (`toyworld.video`);
`run.py` picks it by the `data=` option.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

from pipelines.errors import UserError

logger = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


class ClipSource(Protocol):
    def __call__(self, n: int, frames: int, size: int, fps_choices: tuple[float, ...], seed: int,
                 progress: bool) -> tuple[torch.Tensor, list[str], torch.Tensor]: ...


def video_folder(folder: str | Path) -> ClipSource:
    """The clips of every readable video in `folder` (captions from its `captions.txt`: file<TAB>caption)."""
    return partial(folder_clips, Path(folder))


def folder_clips(folder: Path, n: int, frames: int, size: int, fps_choices: tuple[float, ...], seed: int,
                 progress: bool = False) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Up to n clips cut from every readable video in `folder`, every `source_fps / fps` frames, resized."""
    import av

    names = {}
    if (folder / "captions.txt").is_file():
        names = dict(line.split("\t", 1) for line in (folder / "captions.txt").read_text().splitlines() if "\t" in line)
    videos, captions, fps = [], [], []
    g = torch.Generator().manual_seed(seed)
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                source_fps = float(stream.average_rate or 24)
                decoded = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)])
        except (av.FFmpegError, OSError, IndexError, RuntimeError) as e:
            logger.warning("skipping unreadable video %s (%s)", path.name, str(e).splitlines()[0][:80])
            continue
        decoded = F.interpolate(rearrange(decoded, "t h w c -> t c h w").float(), size=(size, size), mode="area")
        for rate in fps_choices:
            stride = max(1, round(source_fps / rate))
            span = stride * (frames - 1) + 1
            for start in range(0, len(decoded) - span + 1, max(span // 2, 1)):
                videos.append(rearrange(decoded[start:start + span:stride], "f c h w -> c f h w").round().to(torch.uint8))
                captions.append(names.get(path.name, "").strip())
                fps.append(source_fps / stride)
    if not videos:
        raise UserError(f"data={folder} holds no readable video of at least {frames} frames ({', '.join(VIDEO_SUFFIXES)})")
    keep = torch.randperm(len(videos), generator=g)[:n]
    return torch.stack([videos[i] for i in keep]), [captions[i] for i in keep], torch.tensor([fps[i] for i in keep])
