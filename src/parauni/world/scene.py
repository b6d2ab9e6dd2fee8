"""The shapes world: scenes of coloured shapes on a grey background, their placement and rendering.

The world is the project's self-contained stand-in for natural images (it trains on a CPU): four shape
classes play the part of GenEval's object classes and GenEval's ten colour names are the palette, so the
six GenEval tags (single object, two objects, counting, colours, position, colour attribution) have an exact
counterpart here (see `parauni.world.captions` and `parauni.world.detector`).

Rendering is supersampled 4x per axis and each pixel takes an object's colour when more than half of its
subsamples fall inside the object, so edges are hard and every pixel carries an exact palette colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# GenEval's ten colour names. Chosen so that every pair is more than 100 apart in RGB and every colour is
# more than 120 from the grey background; the detector's colour decisions rely on these margins.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (250, 230, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 30, 200),
    "pink": (255, 130, 200),
    "brown": (120, 70, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)

# Object sides are drawn in [MIN_SIZE_FRAC, MAX_SIZE_FRAC] x the image size.
MIN_SIZE_FRAC = 0.28
MAX_SIZE_FRAC = 0.40
SUPERSAMPLE = 4
MIN_IMAGE_SIZE = 16
# Width of a cross's arms as a fraction of the cross's size.
CROSS_ARM = 1.0 / 3.0
# Placement: tries per object before starting over, restarts before shrinking, shrink factor per round.
_TRIES_PER_OBJECT = 60
_RESTARTS_PER_SCALE = 20
_SHRINK = 0.9
_MIN_OBJECT_PIXELS = 4.0


@dataclass(frozen=True)
class WorldObject:
    """One shape: its class, colour name, centre (cx, cy) and side of its square box, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {tuple(COLORS)}")
        if not self.size > 0:
            raise ValueError(f"object size must be positive, got {self.size}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The object's box (x0, y0, x1, y1) in continuous pixel coordinates."""
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass
class Scene:
    """A square image of `size` x `size` pixels holding `objects` (drawn in order on the background)."""

    objects: list[WorldObject]
    size: int

    def __post_init__(self) -> None:
        if self.size < MIN_IMAGE_SIZE:
            raise ConfigError(f"scene size {self.size} is too small; use at least {MIN_IMAGE_SIZE} pixels")


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether normalised points (u, v) in [-1, 1]^2 (v grows downward) lie inside `shape`."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":
        # Apex at the top centre (0, -1), base along the bottom edge v = 1.
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":
        # The box spans 2 normalised units, so an arm of width CROSS_ARM * size has half-width CROSS_ARM.
        bar_h = (np.abs(v) <= CROSS_ARM) & (np.abs(u) <= 1.0)
        bar_v = (np.abs(u) <= CROSS_ARM) & (np.abs(v) <= 1.0)
        return bar_h | bar_v
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_mask(shape: str, box: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """Rasterise `shape` filling `box` (x0, y0, x1, y1) on a height x width canvas -> bool (height, width).

    A pixel belongs to the shape when more than half of its SUPERSAMPLE^2 subsamples lie inside it.
    """
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box {box} is empty; expected x1 > x0 and y1 > y0")
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)  # (W*S,)
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)  # (H*S,)
    u = (xs[None, :] - (x0 + x1) / 2) / ((x1 - x0) / 2)
    v = (ys[:, None] - (y0 + y1) / 2) / ((y1 - y0) / 2)
    fine = _inside(shape, u, v)  # (H*S, W*S)
    coverage = fine.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage > 0.5


def render(scene: Scene) -> np.ndarray:
    """Draw `scene` -> uint8 (size, size, 3): grey background, then each object in its palette colour."""
    image = np.empty((scene.size, scene.size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        image[shape_mask(obj.shape, obj.box, scene.size, scene.size)] = COLORS[obj.color]
    return image


def boxes_apart(a: tuple[float, float, float], b: tuple[float, float, float], gap: float = 1.0) -> bool:
    """Whether square boxes (cx, cy, size) are separated by at least `gap` pixels along some axis."""
    reach = (a[2] + b[2]) / 2 + gap
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _try_place(
    rng: np.random.Generator, n: int, size: int, low: float, high: float
) -> list[tuple[float, float, float]] | None:
    """One sequential rejection-sampling pass: n boxes with sides in [low, high] pixels, or None."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        side = float(rng.uniform(low, high))
        for _ in range(_TRIES_PER_OBJECT):
            cx, cy = rng.uniform(side / 2, size - side / 2, size=2)
            box = (float(cx), float(cy), side)
            if all(boxes_apart(box, other) for other in placed):
                placed.append(box)
                break
        else:
            return None
    return placed


def place_objects(
    rng: np.random.Generator,
    n: int,
    size: int,
    min_frac: float = MIN_SIZE_FRAC,
    max_frac: float = MAX_SIZE_FRAC,
) -> list[tuple[float, float, float]]:
    """Place `n` non-overlapping square boxes inside a size x size image -> [(cx, cy, side), ...].

    Sides are drawn in [min_frac, max_frac] * size; boxes are at least 1 pixel apart along some axis (so the
    rendered shapes never touch). When the draws keep failing (crowded small images) the size range is shrunk
    by a fixed factor and placement retried; everything depends only on `rng`.
    """
    if n < 1:
        raise ValueError(f"number of objects must be at least 1, got {n}")
    if not 0 < min_frac <= max_frac < 1:
        raise ConfigError(f"need 0 < min_frac <= max_frac < 1, got min_frac={min_frac}, max_frac={max_frac}")
    low, high = min_frac * size, max_frac * size
    while low >= _MIN_OBJECT_PIXELS:
        for _ in range(_RESTARTS_PER_SCALE):
            placed = _try_place(rng, n, size, low, high)
            if placed is not None:
                return placed
        low, high = low * _SHRINK, high * _SHRINK
    raise ConfigError(
        f"cannot place {n} objects in a {size}x{size} image even with sides shrunk to {_MIN_OBJECT_PIXELS} px; "
        "use fewer objects or a larger image"
    )
