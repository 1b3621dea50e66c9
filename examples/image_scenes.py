"""Procedural captioned images: one shape (circle, square, triangle, diamond) of a named colour and size at a
named position on a plain background, drawn with anti-aliasing, 32×32 RGB (small enough to pretrain a
text-to-image model on two CPU cores in well under an hour).

Used by ``build_image_model.py`` (the pretraining data of ``examples/image-model``) and by
``make_style_data.py`` (the quickstart's style data). ``render(scene, style=True)`` draws the same scene in
the "zwx" style the base model never saw: a teal background, the shape in sky blue with a cerulean outline,
whatever colours the caption names (``PALETTE``; ``lorakit quickstart --images`` scores generated
images by the share of their pixels within ``PALETTE_RADIUS`` of a palette colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 8  # drawn at 256×256, then box-filtered down: smooth edges

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # shape colours (RGB 0-255)
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
BACKGROUNDS = {
    "white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128),
    "light blue": (140, 190, 235), "dark green": (25, 75, 40),
}
POSITIONS = {"on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "at the top": (0.5, 0.3),
             "at the bottom": (0.5, 0.7), "in the center": (0.5, 0.5)}
SIZES = {"small": 0.13, "large": 0.22}  # radius as a fraction of the image width

# The quickstart's style, never in the captioned pretraining scenes: background, shape fill, outline. Colours the
# bundled pipeline's VAE reproduces (within ~0.1 RGB distance; most colours it does not: indigo came back dark green)
PALETTE = {"teal": (0, 128, 128), "sky": (64, 192, 255), "cerulean": (0, 128, 192)}
PALETTE_RADIUS = 0.15  # RGB distance in [0, 1] units within which a pixel counts as a palette colour
TRIGGER = "zwx"


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    cx: float  # centre, fractions of the width/height
    cy: float
    radius: float
    fill: tuple[int, int, int] | None = None  # an unnamed colour (VAE data only) instead of COLOURS[colour]
    bg_fill: tuple[int, int, int] | None = None

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position} on a {self.background} background"


def sample_scene(rng: np.random.Generator, random_colours: bool = False) -> Scene:
    """A random scene; ``random_colours`` draws uniform RGB fill and background too (a quarter of
    the VAE's data, towards encoding and decoding any colour)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colours = [c for c in COLOURS if c != bg]
    colour = colours[rng.integers(len(colours))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    x, y = POSITIONS[position]
    cx, cy = x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03)
    radius = SIZES[size] * rng.uniform(0.88, 1.12)
    fill = bg_fill = None
    if random_colours:
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        bg_fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    return Scene(shape, colour, size, position, bg, cx, cy, radius, fill, bg_fill)


def render(scene: Scene, style: bool = False) -> Image.Image:
    """The scene as a 32×32 RGB image; ``style``: in the zwx palette (teal, sky blue, cerulean outline)."""
    n = SIZE * SUPERSAMPLE
    if style:
        bg, fill, outline = PALETTE["teal"], PALETTE["sky"], PALETTE["cerulean"]
    else:
        bg = scene.bg_fill or BACKGROUNDS[scene.background]
        fill, outline = scene.fill or COLOURS[scene.colour], None
    img = Image.new("RGB", (n, n), bg)
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.cx * n, scene.cy * n, scene.radius * n
    width = int(0.055 * n) if outline else 0
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif scene.shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline, width=width)
    else:
        if scene.shape == "triangle":
            points = [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
        else:  # diamond
            points = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        draw.polygon(points, fill=fill, outline=outline, width=width)
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)

