"""toyworld: a deterministic procedural world of coloured 3D primitives with captions."""

from .render import camera_frame, camera_rays, render, render_with_aux
from .video import sample_clip_batch
from .world import (
    COLOR_NAMES, COLORS, MOTIONS, SHAPES, SYNONYMS, VIEWS, VOCAB, Scene,
    caption, caption_words, sample_batch, sample_scenes, view_index, view_name,
)
