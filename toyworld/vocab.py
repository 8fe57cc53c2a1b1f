"""ToyWorld's words: shapes, colours, synonyms and motions (torch-free, for configs and a fast --help)."""

SHAPES = ("sphere", "cube", "cone", "cylinder", "torus", "pyramid")

# Saturated, well-separated hues; none is close to the light-grey background (0.92) or to the near-black front marker.
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
