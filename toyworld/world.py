"""The toy world: batched scenes of one coloured primitive at the origin under an orbit camera, and captions.

The camera convention is `pipelines.geometry`'s. Everything random is drawn on the CPU from a caller's
`torch.Generator`, so a seed gives the same scenes and captions on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from pipelines.geometry import VIEWS, camera_frame, view_index

from .vocab import COLOR_NAMES, COLORS, MOTIONS, SHAPES, SYNONYMS

VOCAB = tuple(sorted(
    {"a", "view", ","} | set(SHAPES) | set(SYNONYMS) | set(COLORS) | set(VIEWS)
    | {word for motion in MOTIONS for word in motion.split()}
))


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
