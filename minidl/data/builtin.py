"""The built-in dataset: 10 classes of drawn shapes and textures, made on first use, so that
`minidl train models/alexnet.py` runs on a fresh machine with no network.

The classes differ by shape or texture only (every image draws its own colours, position, size
and rotation). Image i of class c comes from the generator seeded with (SEED, c, i). The file is
cached as shapes-v{VERSION}.h5 in the cache folder (argument, else $MINIDL_CACHE, else
~/.cache/minidl) and generated only when missing or unreadable; raise VERSION whenever the
drawing changes, so old caches are not reused.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from minidl.data.dataset import IMAGE_SIZE, open_dataset, write_dataset
from minidl.errors import DataError

VERSION = 1
SEED = 20120103
PER_CLASS = 300
MIN_COLOUR_DISTANCE = 120  # Euclidean, in 0..255 RGB: foreground always stands out


def random_colours(rng):
    """A (background, foreground) pair of RGB tuples at least MIN_COLOUR_DISTANCE apart."""
    background = rng.integers(0, 256, 3)
    while True:
        foreground = rng.integers(0, 256, 3)
        if np.linalg.norm(foreground - background) >= MIN_COLOUR_DISTANCE:
            return tuple(int(v) for v in background), tuple(int(v) for v in foreground)


def polygon(rng, corners, radii):
    """Points of a polygon around a random centre: corner k at angle 2*pi*k/corners (+ a random
    rotation), at distance radii[k % len(radii)] times a random size."""
    centre = rng.uniform(IMAGE_SIZE / 2 - 32, IMAGE_SIZE / 2 + 32, 2)
    size = rng.uniform(50, 90)
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(corners) / corners
    lengths = size * np.resize(radii, corners)
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return [tuple(p) for p in centre + lengths[:, None] * directions]


def disk_box(rng):
    """Bounding box of a random disk, and the disk's centre and radius."""
    x, y = rng.uniform(IMAGE_SIZE / 2 - 32, IMAGE_SIZE / 2 + 32, 2)
    r = rng.uniform(45, 85)
    return (x - r, y - r, x + r, y + r), (x, y), r


def draw_circle(draw, rng, fg, bg):
    draw.ellipse(disk_box(rng)[0], fill=fg)


def draw_ring(draw, rng, fg, bg):
    box, (x, y), r = disk_box(rng)
    draw.ellipse(box, fill=fg)
    hole = r * rng.uniform(0.45, 0.7)
    draw.ellipse((x - hole, y - hole, x + hole, y + hole), fill=bg)


def draw_square(draw, rng, fg, bg):
    draw.polygon(polygon(rng, 4, [1.0]), fill=fg)


def draw_triangle(draw, rng, fg, bg):
    draw.polygon(polygon(rng, 3, [1.1]), fill=fg)


def draw_star(draw, rng, fg, bg):
    draw.polygon(polygon(rng, 10, [1.1, 0.45]), fill=fg)


def draw_cross(draw, rng, fg, bg):
    # a plus sign: 12 corners alternating between the arm ends and the inner corners
    arm = rng.uniform(0.25, 0.4)  # half-width of an arm, relative to its length
    reach, angle = np.hypot(1, arm), np.arctan(arm)
    inner = np.hypot(arm, arm)
    centre = rng.uniform(IMAGE_SIZE / 2 - 32, IMAGE_SIZE / 2 + 32, 2)
    size, turn = rng.uniform(55, 90), rng.uniform(0, np.pi / 2)
    points = []
    for k in range(4):
        axis = turn + k * np.pi / 2
        for length, offset in ((reach, -angle), (reach, angle), (inner, np.pi / 4)):
            a = axis + offset
            points.append(tuple(centre + size * length * np.array([np.cos(a), np.sin(a)])))
    draw.polygon(points, fill=fg)


PIXEL_Y, PIXEL_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def texture_coordinates(rng):
    """Pixel coordinates (u, v) of a grid turned by up to 15 degrees and shifted at random."""
    y, x = PIXEL_Y, PIXEL_X
    turn = np.deg2rad(rng.uniform(-15, 15))
    u = x * np.cos(turn) + y * np.sin(turn) + rng.uniform(0, 100)
    v = -x * np.sin(turn) + y * np.cos(turn) + rng.uniform(0, 100)
    return u, v


def wrap(values, period):
    """values modulo period (written out: numpy's % is many times slower on floats)."""
    return values - period * np.floor(values / period)


def horizontal_stripes(rng):
    u, v = texture_coordinates(rng)
    period = rng.uniform(14, 40)
    return wrap(v, period) < period / 2


def vertical_stripes(rng):
    u, v = texture_coordinates(rng)
    period = rng.uniform(14, 40)
    return wrap(u, period) < period / 2


def checkerboard(rng):
    u, v = texture_coordinates(rng)
    cell = rng.uniform(14, 40)
    return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0


def dots(rng):
    u, v = texture_coordinates(rng)
    period = rng.uniform(18, 40)
    radius = period * rng.uniform(0.2, 0.33)
    return (wrap(u, period) - period / 2) ** 2 + (wrap(v, period) - period / 2) ** 2 < radius ** 2


SHAPES = {"circle": draw_circle, "square": draw_square, "triangle": draw_triangle,
          "star": draw_star, "cross": draw_cross, "ring": draw_ring}
TEXTURES = {"horizontal_stripes": horizontal_stripes, "vertical_stripes": vertical_stripes,
            "checkerboard": checkerboard, "dots": dots}
CLASS_NAMES = list(SHAPES) + list(TEXTURES)


def make_image(label, index):
    """Image `index` of class `label`: uint8 (256, 256, 3), the same on every machine."""
    rng = np.random.default_rng([SEED, label, index])
    background, foreground = random_colours(rng)
    name = CLASS_NAMES[label]
    if name in TEXTURES:
        mask = TEXTURES[name](rng)
        palette = np.array([background, foreground], dtype=np.uint8)
        return palette.take(mask.astype(np.uint8), axis=0)  # pixel = palette[mask]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    SHAPES[name](ImageDraw.Draw(image), rng, foreground, background)
    return np.asarray(image)


def generate_samples(per_class):
    """(image, label) for every image, the classes interleaved."""
    for index in range(per_class):
        for label in range(len(CLASS_NAMES)):
            yield make_image(label, index), label


def default_cache_dir() -> str:
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "minidl")
    return os.environ.get("MINIDL_CACHE") or home_cache


def builtin_dataset(cache_dir: str | None = None,
                    progress: Callable[[int, int], None] | None = None, *,
                    per_class: int = PER_CLASS) -> str:
    """Path of the built-in dataset file, generating it first if it is missing.

    progress(done, total) reports the generation, which happens once per cache folder.
    per_class (default 300) makes a smaller set, for tests; it is cached under its own name.
    """
    cache_dir = cache_dir or default_cache_dir()
    suffix = "" if per_class == PER_CLASS else f"-{per_class}-per-class"
    path = os.path.join(cache_dir, f"shapes-v{VERSION}{suffix}.h5")
    if os.path.exists(path):
        try:
            open_dataset(path).close()
            return path
        except DataError:
            pass  # a damaged cache: make it again
    count = per_class * len(CLASS_NAMES)
    # gzip: drawn shapes shrink some 70-fold (9 MB against 590 MB raw); a CPU run reads them far faster than it trains
    write_dataset(path, generate_samples(per_class), CLASS_NAMES, count=count, val_fraction=0.1,
                  seed=SEED, progress=progress, storage="gzip")
    return path
