"""The toy world: vocabulary, batched scene sampling and captions.

A scene is one coloured primitive centred at the origin, seen by an orbiting
camera (see `toyworld.render` for the camera convention). Everything random is
drawn on the CPU from a caller-supplied `torch.Generator`, so a seed gives the
same scenes and captions on any device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
from torch import Tensor

SHAPES = ("sphere", "cube", "cone", "cylinder", "torus", "pyramid")

# Saturated, well-separated hues; none is close to the light-grey background
# (0.92) or to the near-black front marker.
COLORS = {
    "red": (0.88, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (0.95, 0.85, 0.05),
    "green": (0.10, 0.65, 0.15),
    "cyan": (0.00, 0.78, 0.85),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.45, 0.72),
}
COLOR_NAMES = tuple(COLORS)

SYNONYMS = {"ball": "sphere", "box": "cube", "block": "cube", "tube": "cylinder", "ring": "torus", "donut": "torus"}

MOTIONS = (
    "moving left", "moving right", "moving up", "moving down",
    "bouncing", "spinning", "growing", "shrinking",
)

VIEWS = ("front", "side", "back", "overhead")

VOCAB = tuple(sorted(
    {"a", "view", ","} | set(SHAPES) | set(SYNONYMS) | set(COLORS) | set(VIEWS)
    | {word for motion in MOTIONS for word in motion.split()}
))


def caption_words(text: str) -> list[str]:
    """Lowercase and split a caption into word tokens; ',' is its own token, other punctuation is dropped."""
    return re.findall(r"[a-z]+|,", text.lower())


def view_index(azimuth_deg, elevation_deg) -> Tensor:
    """Index into VIEWS by DreamFusion's rule (works elementwise on tensors or floats)."""
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32) % 360.0
    el = torch.as_tensor(elevation_deg, dtype=torch.float32)
    from_front = torch.minimum(az, 360.0 - az)  # angular distance to azimuth 0, in [0, 180]
    idx = torch.ones_like(az, dtype=torch.long)  # side by default
    idx = torch.where(from_front < 45.0, 0, idx)
    idx = torch.where(from_front > 135.0, 2, idx)  # within 45 deg of azimuth 180
    return torch.where(el > 60.0, 3, idx)


def view_name(azimuth_deg, elevation_deg):
    """'front'/'side'/'back'/'overhead' for scalars; a list of names for tensors."""
    idx = view_index(azimuth_deg, elevation_deg)
    if idx.dim() == 0:
        return VIEWS[int(idx)]
    return [VIEWS[i] for i in idx.flatten().tolist()]


@dataclass
class Scene:
    """A batch of B single-object scenes; every field has leading dim B."""

    shape: Tensor  # (B,) long, index into SHAPES
    color: Tensor  # (B,) long, index into COLOR_NAMES
    azimuth_deg: Tensor  # (B,) camera azimuth, 0 = object's front (+x)
    elevation_deg: Tensor  # (B,)
    distance: Tensor  # (B,) camera distance to the origin
    fov_deg: Tensor  # (B,) full field of view
    scale: Tensor  # (B,) uniform object scale
    yaw_deg: Tensor  # (B,) object rotation about +z; 0 keeps the marker facing azimuth 0
    offset: Tensor  # (B, 3) object translation in world units

    def __len__(self) -> int:
        return self.shape.shape[0]

    def map(self, fn) -> Scene:
        """Apply `fn` to every field (indexing, device moves, repeating per frame)."""
        return Scene(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device) -> Scene:
        return self.map(lambda x: x.to(device))

    def views(self) -> Tensor:
        return view_index(self.azimuth_deg, self.elevation_deg).to(self.shape.device)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def sample_scenes(n: int, generator: torch.Generator, device="cpu", max_offset: float = 0.0,
                  p_offset: float = 0.5) -> Scene:
    """Random objects under DreamFusion-style orbit cameras (drawn on CPU, then moved).

    With `max_offset` > 0, a fraction `p_offset` of the objects is moved off the image centre by up to
    `max_offset` world units along the camera's right and up axes (the rest stay centred): a prior that
    has only seen centred objects pulls every object back to the centre, so no video model on it could
    move one (measured: SDEdit from t=300 took objects 11 px off-centre back to 2 px).
    """
    scene = Scene(
        shape=torch.randint(len(SHAPES), (n,), generator=generator),
        color=torch.randint(len(COLORS), (n,), generator=generator),
        azimuth_deg=_uniform(n, 0.0, 360.0, generator),
        elevation_deg=_uniform(n, -10.0, 80.0, generator),
        distance=_uniform(n, 3.2, 3.8, generator),
        fov_deg=_uniform(n, 35.0, 45.0, generator),
        scale=_uniform(n, 0.9, 1.05, generator),
        yaw_deg=torch.zeros(n),  # keep the marker at azimuth 0 so view labels are truthful
        offset=torch.zeros(n, 3),
    )
    if max_offset > 0:  # drawn only when asked, so max_offset=0 keeps every earlier seed's scenes
        from .render import camera_frame  # render.py imports this module, so import lazily

        _, right, up, _ = camera_frame(scene.azimuth_deg, scene.elevation_deg, scene.distance)
        moved = (torch.rand(n, generator=generator) < p_offset).float()[:, None]
        u, v = (_uniform(n, -max_offset, max_offset, generator)[:, None] for _ in range(2))
        scene.offset = moved * (u * right + v * up)
    return scene.to(device)


def shape_word(shape: str, synonyms: bool = False, rng: torch.Generator | None = None) -> str:
    """The shape's canonical word, or (if asked and one exists) one of its synonyms."""
    options = [word for word, canon in SYNONYMS.items() if canon == shape]
    if not synonyms or not options:
        return shape
    pick = 0 if rng is None else int(torch.randint(len(options), (1,), generator=rng))
    return options[pick]


def caption(scene: Scene, i: int, view: bool = True, synonyms: bool = False,
            rng: torch.Generator | None = None) -> str:
    """'a {color} {shape}' plus optional ', {view} view' for item i of the batch."""
    shape = shape_word(SHAPES[int(scene.shape[i])], synonyms, rng)
    text = f"a {COLOR_NAMES[int(scene.color[i])]} {shape}"
    if view:
        text += f", {view_name(float(scene.azimuth_deg[i]), float(scene.elevation_deg[i]))} view"
    return text


def sample_batch(n: int, generator: torch.Generator, size: int = 64, device="cpu",
                 p_drop_view: float = 0.3, p_synonym: float = 0.2):
    """Rendered images (n, 3, size, size) in [0, 1], captions, and integer labels."""
    from .render import render  # render.py imports this module, so import lazily

    scene = sample_scenes(n, generator, device)
    keep_view = (torch.rand(n, generator=generator) >= p_drop_view).tolist()
    use_synonym = (torch.rand(n, generator=generator) < p_synonym).tolist()
    captions = [caption(scene, i, keep_view[i], use_synonym[i], generator) for i in range(n)]
    labels = {"shape": scene.shape, "color": scene.color, "view": scene.views()}
    return render(scene, size), captions, labels
