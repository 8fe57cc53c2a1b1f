"""Short captioned motion clips of toyworld objects.

Each clip keeps its camera fixed and animates the object's offset, yaw or
scale over time. Motion speeds are in world units (or degrees) per SECOND, so
a clip sampled at a higher fps shows less motion between consecutive frames.
Time is centred on the clip's midpoint so translating or growing objects stay
in view. Objects and cameras are drawn exactly as for still images (so the frozen
image prior already draws them), except that overhead cameras are left out, where
"up" and "bouncing" would point at the camera. A 2-second clip (8 frames at
fps 4, 16 at fps 8) moves an object by about 40% of the frame width.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from pipelines.geometry import camera_frame

from .render import render
from .vocab import COLOR_NAMES, MOTIONS, SHAPES
from .world import Scene, _uniform, sample_scenes, shape_word

FPS_CHOICES = (4, 8, 12)
SPEED = 0.5  # world units / s for moving left/right/up/down
BOUNCE_HEIGHT, BOUNCE_PERIOD = 0.45, 1.0  # world units, seconds per hop
SPIN_DEG_PER_S = 180.0
MAX_ELEVATION = 45.0  # degrees; higher cameras look down the vertical motions
GROW_RATE = 0.35  # d(log scale) / dt for growing (+) and shrinking (-)

# Per-motion coefficients, indexed like MOTIONS:
# (screen-right, screen-up) direction, bounce on/off, spin on/off, grow sign.
_SCREEN_DIR = torch.tensor([[-1, 0], [1, 0], [0, 1], [0, -1], [0, 0], [0, 0], [0, 0], [0, 0]], dtype=torch.float32)
_BOUNCE = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0], dtype=torch.float32)
_SPIN = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0], dtype=torch.float32)
_GROW = torch.tensor([0, 0, 0, 0, 0, 0, 1, -1], dtype=torch.float32)


def _clip_fps(n: int, fps, generator: torch.Generator) -> Tensor:
    """Per-clip frames per second (n,): `fps` for all clips, or sampled from FPS_CHOICES if None."""
    if fps is None:
        return torch.tensor(FPS_CHOICES, dtype=torch.float32)[torch.randint(len(FPS_CHOICES), (n,), generator=generator)]
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return torch.full((n,), float(fps))


def animate(scene: Scene, motion: Tensor, fps: Tensor, frames: int) -> Scene:
    """Expand n clips (CPU tensors) into n * frames per-frame scenes, clip-major."""
    t = torch.arange(frames, dtype=torch.float32) / fps[:, None]  # (n, F) seconds since clip start
    centred = t - t[:, -1:] / 2  # symmetric about the clip midpoint
    _, right, up, _ = camera_frame(scene.azimuth_deg, scene.elevation_deg, scene.distance)
    screen = _SCREEN_DIR[motion]  # (n, 2)
    direction = screen[:, :1] * right + screen[:, 1:] * up  # (n, 3)
    offset = SPEED * centred[..., None] * direction[:, None, :]  # (n, F, 3)
    phase = (t / BOUNCE_PERIOD) % 1.0
    hop = BOUNCE_HEIGHT * (4 * phase * (1 - phase) - 0.5)  # parabola per hop, centred on 0
    offset[..., 2] += _BOUNCE[motion][:, None] * hop
    frames_of = lambda x: rearrange(x, "n f ... -> (n f) ...")
    per_frame = scene.map(lambda x: x.repeat_interleave(frames, 0))
    per_frame.offset = frames_of(offset)
    per_frame.yaw_deg = frames_of(_SPIN[motion][:, None] * SPIN_DEG_PER_S * t)
    per_frame.scale = per_frame.scale * frames_of(torch.exp(_GROW[motion][:, None] * GROW_RATE * centred))
    return per_frame


def sample_clip_batch(n: int, generator: torch.Generator, frames: int = 8, size: int = 64, fps=None,
                      device="cpu", p_synonym: float = 0.2):
    """Videos (n, 3, F, H, W) in [0, 1], captions like 'a blue ball bouncing', and labels.

    `fps`: an int/float for every clip, or None to draw each clip's fps from FPS_CHOICES.
    Labels: shape, color, motion (index into MOTIONS), view (of the fixed camera), fps.
    """
    if frames < 1:
        raise ValueError(f"frames must be positive, got {frames}")
    scene = sample_scenes(n, generator)  # CPU; moved to `device` after animating
    scene.elevation_deg = _uniform(n, -10.0, MAX_ELEVATION, generator)
    motion = torch.randint(len(MOTIONS), (n,), generator=generator)
    clip_fps = _clip_fps(n, fps, generator)
    use_synonym = (torch.rand(n, generator=generator) < p_synonym).tolist()
    captions = [
        f"a {COLOR_NAMES[int(scene.color[i])]} "
        f"{shape_word(SHAPES[int(scene.shape[i])], use_synonym[i], generator)} {MOTIONS[int(motion[i])]}"
        for i in range(n)
    ]
    images = render(animate(scene, motion, clip_fps, frames).to(device), size)  # (n*F, 3, H, W)
    videos = rearrange(images, "(n f) c h w -> n c f h w", f=frames)
    labels = {"shape": scene.shape, "color": scene.color, "motion": motion, "view": scene.views(), "fps": clip_fps}
    return videos, captions, {k: v.to(device) for k, v in labels.items()}


def rendered_clips(n: int, frames: int, size: int, fps_choices: tuple[float, ...], seed: int,
                   progress: bool = False) -> tuple[Tensor, list[str], Tensor]:
    """The clip source of `train temporal data=toyworld` (see `video.data`): n rendered clips (N, 3, F, H, W)
    uint8, each at a frame rate drawn from `fps_choices`, their captions and frame rates."""
    g = torch.Generator().manual_seed(seed)
    videos, captions, fps = [], [], []
    for start in tqdm(range(0, n, 256), desc="rendering ToyWorld clips", disable=not progress):
        count = min(256, n - start)
        rate = torch.tensor(fps_choices)[torch.randint(len(fps_choices), (count,), generator=g)]
        for r in rate.unique().tolist():  # the renderer takes one fps per call
            k = int((rate == r).sum())
            v, c, _ = sample_clip_batch(k, g, frames=frames, size=size, fps=r)
            videos.append((v * 255).round().to(torch.uint8))
            captions += c
            fps += [r] * k
    return torch.cat(videos), captions, torch.tensor(fps)
