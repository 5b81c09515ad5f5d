"""AlexNet's data augmentation and test-time crops, in NumPy on batches of HWC images.

A crop is described by `Crops(tops, lefts, flips)`, one entry per image, so the same window can
be cut from the image and from the per-pixel mean image. Every random function takes an explicit
numpy.random.Generator. A training batch (the paper, Section 4.1):

    where = random_crops(rng, len(images), 256, 227)        # offsets + flip with p=1/2
    x = subtract_mean(crop_and_flip(images, 227, where), mean, 227, where)
    x = to_nchw(pca_lighting(x, np.sqrt(eigvals), eigvecs, rng))  # why sqrt: loader.py
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minidl.errors import DataError


class Crops(NamedTuple):
    """Where to cut a crop x crop window from each image: top-left corner, and mirror or not."""
    tops: np.ndarray
    lefts: np.ndarray
    flips: np.ndarray


def check_crop(crop, image_size):
    if crop > image_size:
        raise DataError(f"crop {crop}x{crop} is larger than the stored {image_size}x{image_size} "
                        "images")
    if crop < 1:
        raise DataError(f"crop size must be positive, got {crop}")


def random_crops(rng: np.random.Generator, count: int, image_size: int, crop: int) -> Crops:
    """Uniform random crop offsets and a horizontal flip with probability 1/2, per image."""
    check_crop(crop, image_size)
    tops = rng.integers(0, image_size - crop + 1, size=count)
    lefts = rng.integers(0, image_size - crop + 1, size=count)
    flips = rng.random(count) < 0.5
    return Crops(tops, lefts, flips)


def fixed_crops(count: int, top: int, left: int, flip: bool = False) -> Crops:
    """The same crop for every image."""
    return Crops(np.full(count, top), np.full(count, left), np.full(count, flip))


def centre_crops(count: int, image_size: int, crop: int) -> Crops:
    check_crop(crop, image_size)
    offset = (image_size - crop) // 2
    return fixed_crops(count, offset, offset)


TEN_CROP_ORDER = ("top-left", "top-right", "bottom-left", "bottom-right", "centre",
                  "top-left mirrored", "top-right mirrored", "bottom-left mirrored",
                  "bottom-right mirrored", "centre mirrored")


def ten_crops(count: int, image_size: int, crop: int) -> list[Crops]:
    """The paper's 10 test crops as a list of Crops, in the order of TEN_CROP_ORDER."""
    check_crop(crop, image_size)
    far = image_size - crop
    centre = far // 2
    corners = [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]
    return [fixed_crops(count, top, left, flip) for flip in (False, True) for top, left in corners]


def crop_and_flip(images: np.ndarray, crop: int, where: Crops, sources: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Cut the window `where` describes out of each image of (N, H, W, C); mirrored where flips is
    set. Crop i comes from image sources[i] (default: image i), into `out` if given."""
    check_crop(crop, min(images.shape[1], images.shape[2]))
    if out is None:
        out = np.empty((len(where.tops), crop, crop) + images.shape[3:], dtype=images.dtype)
    sources = range(len(where.tops)) if sources is None else sources
    # a loop of slice copies: each is one contiguous block, faster than fancy indexing
    for i, (source, top, left, flip) in enumerate(zip(sources, where.tops, where.lefts, where.flips)):
        window = images[source, top:top + crop, left:left + crop]
        out[i] = window[:, ::-1] if flip else window
    return out


def subtract_mean(crops: np.ndarray, mean: np.ndarray, crop: int, where: Crops) -> np.ndarray:
    """float32 crops minus the training mean.

    `mean` is the per-channel mean (3,) or the per-pixel mean image (S, S, 3); the
    mean image is cut at each crop's place and mirrored with it, so each pixel
    loses the mean of the pixel it came from.
    """
    crops = crops.astype(np.float32)  # a new array, so the in-place subtraction below is safe
    if mean.ndim == 1:
        crops -= mean.astype(np.float32)
    else:
        crops -= crop_and_flip(np.broadcast_to(mean.astype(np.float32), (len(crops),) + mean.shape),
                               crop, where)
    return crops


def lighting_shift(alphas: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray) -> np.ndarray:
    """The colour shift per image, (N, 3): eigvecs @ (alpha * eigvals) for each row of alphas."""
    return (alphas * eigvals) @ eigvecs.T


def pca_lighting(images: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray,
                 rng: np.random.Generator, sigma: float = 0.1) -> np.ndarray:
    """Add to every pixel of each image of (N, H, W, 3) the shift [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T.

    a_i ~ N(0, sigma^2) is drawn once per image; `eigvecs` holds the p_i as columns.
    The result is float32.
    """
    return images + lighting_shifts(rng, len(images), eigvals, eigvecs, sigma)[:, None, None, :]


def lighting_shifts(rng: np.random.Generator, count: int, eigvals: np.ndarray, eigvecs: np.ndarray,
                    sigma: float = 0.1) -> np.ndarray:
    """pca_lighting's float32 shifts (count, 3), drawn as it draws them, for images still to come."""
    alphas = rng.normal(0.0, sigma, size=(count, 3))
    return lighting_shift(alphas, eigvals, eigvecs).astype(np.float32)


def to_nchw(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> contiguous float32 (N, C, H, W), the layout the network takes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
