"""Scenes of coloured shapes: seeded sampling and pixel-exact rendering.

A scene holds 1-3 non-overlapping objects on a plain light background. Inside one scene every object has its
own colour and its own region, so "the red object" and "the shape on the left" always name exactly one object.
Sizes come in two well-separated bins (small ~25% of the side, large ~42%), so every box is big enough to
ground. Geometry is sampled directly in pixels for the requested image size.

Boxes are half-open pixel boxes (x1, y1, x2, y2): the shape covers columns x1 .. x2-1 and rows y1 .. y2-1,
which is the COCO convention [x, y, w, h] with w = x2 - x1.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Well-separated hues; a name is the only word used for the colour in every text.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (230, 200, 20),
    "green": (40, 160, 60),
    "blue": (40, 90, 215),
    "purple": (140, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, tuple[float, float]] = {"small": (0.22, 0.27), "large": (0.38, 0.46)}  # side fraction range
# Region anchors (centre as a fraction of the side). Order = the order objects are mentioned in texts.
REGIONS: dict[str, tuple[float, float]] = {
    "left": (0.23, 0.5),
    "top": (0.5, 0.23),
    "center": (0.5, 0.5),
    "bottom": (0.5, 0.77),
    "right": (0.77, 0.5),
}
MAX_OBJECTS = 3
POSITION_JITTER = 0.03   # fraction of the side the centre may move away from its anchor
EDGE_MARGIN = 0.02       # fraction of the side kept free at the image border
GAP = 0.02               # minimal free space between two boxes (fraction of the side)
COLOUR_JITTER = 10       # per-channel jitter of an object's colour
BACKGROUND_RANGE = (232, 250)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    region: str
    box: tuple[int, int, int, int]   # half-open pixel box (x1, y1, x2, y2)
    rgb: tuple[int, int, int]        # the exact fill colour drawn (palette colour + jitter)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]  # sorted in REGIONS order

    def signature(self) -> tuple:
        """Everything that decides the pixels; two scenes with equal signatures render identically."""
        return (self.width, self.height, self.background,
                tuple((o.shape, o.colour, o.size, o.region, o.box, o.rgb) for o in self.objects))


def scene_rng(seed: int, stream: str, index: int | str) -> random.Random:
    """Independent, order-free random stream per (seed, stream, index); str seeds hash with SHA-512 (stable)."""
    return random.Random(f"tinygpt-shapes:{seed}:{stream}:{index}")


def _boxes_clear(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]], gap: int) -> bool:
    x1, y1, x2, y2 = box
    for ox1, oy1, ox2, oy2 in others:
        if x1 < ox2 + gap and ox1 < x2 + gap and y1 < oy2 + gap and oy1 < y2 + gap:
            return False
    return True


def _place(rng: random.Random, region: str, size: str, image_size: int) -> tuple[int, int, int, int]:
    low, high = SIZES[size]
    side = max(4, round(rng.uniform(low, high) * image_size))
    ax, ay = REGIONS[region]
    cx = (ax + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * image_size
    cy = (ay + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * image_size
    margin = round(EDGE_MARGIN * image_size)
    x1 = min(max(round(cx - side / 2), margin), image_size - margin - side)
    y1 = min(max(round(cy - side / 2), margin), image_size - margin - side)
    return (x1, y1, x1 + side, y1 + side)


def sample_scene(rng: random.Random, image_size: int, count: int | None = None) -> Scene:
    """Draw a scene: `count` objects (default uniform 1..3), distinct colours and regions, no overlap."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    count = rng.randint(1, MAX_OBJECTS) if count is None else count
    gap = max(1, round(GAP * image_size))
    for _ in range(200):
        regions = rng.sample(list(REGIONS), count)
        colours = rng.sample(list(COLOURS), count)
        placed: list[ShapeObject] = []
        for region, colour in zip(regions, colours):
            size = rng.choice(list(SIZES))
            box = _place(rng, region, size, image_size)
            if not _boxes_clear(box, [o.box for o in placed], gap):
                break
            rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
            placed.append(ShapeObject(rng.choice(SHAPES), colour, size, region, box, rgb))
        if len(placed) == count:
            order = list(REGIONS)
            placed.sort(key=lambda o: order.index(o.region))
            grey = rng.randint(*BACKGROUND_RANGE)
            background = tuple(min(255, grey + rng.randint(-3, 3)) for _ in range(3))
            return Scene(image_size, image_size, background, tuple(placed))
    raise RuntimeError(f"could not place {count} objects in a {image_size}px image")  # unreachable in practice


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x1, y1, x2, y2 = obj.box
    right, bottom = x2 - 1, y2 - 1          # PIL coordinates are inclusive
    if obj.shape == "circle":
        draw.ellipse((x1, y1, right, bottom), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, right, bottom), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x1, bottom), (right, bottom), ((x1 + right) / 2, y1)], fill=obj.rgb)
    elif obj.shape == "cross":
        third = (x2 - x1) / 3
        draw.rectangle((x1, round(y1 + third), right, round(y2 - third) - 1), fill=obj.rgb)
        draw.rectangle((round(x1 + third), y1, round(x2 - third) - 1, bottom), fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene at its own size (no anti-aliasing, so pixels and boxes agree exactly)."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return image


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render_jpeg(scene: Scene) -> bytes:
    return encode_jpeg(render_scene(scene))
