"""Augmentation and test crops: coordinates, mirroring, the PCA shift, mean subtraction."""
import numpy as np
import pytest

from minidl.data.augment import (TEN_CROP_ORDER, Crops, centre_crops, crop_and_flip, fixed_crops,
                                 lighting_shift, pca_lighting, random_crops, subtract_mean,
                                 ten_crops, to_nchw)
from minidl.errors import DataError


def gradient_images(count=1, size=256):
    """Pixel (y, x) of image n holds (y, x, n): a crop's pixels say where they came from."""
    y, x = np.mgrid[0:size, 0:size]
    images = [np.stack([y, x, np.full_like(y, n)], axis=-1) for n in range(count)]
    return np.stack(images).astype(np.uint8)


def test_crop_coordinates_and_flip():
    images = gradient_images(2)
    where = Crops(tops=np.array([10, 0]), lefts=np.array([20, 29]), flips=np.array([False, True]))
    crops = crop_and_flip(images, 227, where)
    assert crops.shape == (2, 227, 227, 3) and crops.dtype == np.uint8
    # image 0: plain crop, its corners are the window's corners
    assert tuple(crops[0, 0, 0]) == (10, 20, 0)
    assert tuple(crops[0, 0, -1]) == (10, 246, 0)
    assert tuple(crops[0, -1, -1]) == (236, 246, 0)
    # image 1: mirrored, the left column is the window's right edge
    assert tuple(crops[1, 0, 0]) == (0, 255, 1)
    assert tuple(crops[1, 0, -1]) == (0, 29, 1)
    assert tuple(crops[1, -1, 0]) == (226, 255, 1)
    np.testing.assert_array_equal(crops[1], images[1, 0:227, 29:256][:, ::-1])


def test_random_crops_are_within_the_image_and_seeded():
    where = random_crops(np.random.default_rng(7), 2000, 256, 227)
    for offsets in (where.tops, where.lefts):
        assert offsets.min() == 0 and offsets.max() == 29
    assert 0.45 < where.flips.mean() < 0.55
    again = random_crops(np.random.default_rng(7), 2000, 256, 227)
    for a, b in zip(where, again):
        np.testing.assert_array_equal(a, b)
    # the crops returned are cut where the offsets say
    images = gradient_images(3)
    where = random_crops(np.random.default_rng(1), 3, 256, 227)
    crops = crop_and_flip(images, 227, where)
    for crop, top, left, flip in zip(crops, *where):
        assert tuple(crop[0, 0, :2]) == (top, left + 226 if flip else left)


def test_centre_and_ten_crops_positions_and_order():
    images = gradient_images(1)
    centre = crop_and_flip(images, 227, centre_crops(1, 256, 227))[0]
    assert tuple(centre[0, 0, :2]) == (14, 14)
    views = ten_crops(1, 256, 227)
    assert len(views) == len(TEN_CROP_ORDER) == 10
    corners = [tuple(crop_and_flip(images, 227, where)[0, 0, 0, :2]) for where in views]
    # top-left, top-right, bottom-left, bottom-right, centre; then the same mirrored,
    # whose first pixel is the window's top-right one
    assert corners == [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14),
                       (0, 226), (0, 255), (29, 226), (29, 255), (14, 240)]
    for plain, mirrored in zip(views[:5], views[5:]):
        np.testing.assert_array_equal(crop_and_flip(images, 227, mirrored),
                                      crop_and_flip(images, 227, plain)[:, :, ::-1])


def test_pca_shift_on_a_constant_image():
    angle = 0.3
    eigvecs = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                        [0, 0, 1]])
    eigvals = np.array([9.0, 4.0, 1.0])
    alphas = np.array([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]])
    shift = lighting_shift(alphas, eigvals, eigvecs)
    # the paper's [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T, written out
    expected = sum(alphas[0, i] * eigvals[i] * eigvecs[:, i] for i in range(3))
    np.testing.assert_allclose(shift[0], expected)
    np.testing.assert_allclose(shift[0], [0.9 * np.cos(angle) + 0.8 * np.sin(angle),
                                          0.9 * np.sin(angle) - 0.8 * np.cos(angle), 0.3])
    np.testing.assert_allclose(shift[1], 0)
    # pca_lighting draws the alphas from the generator, N(0, sigma^2), one triple per image
    images = np.full((2, 5, 4, 3), 100, dtype=np.float32)
    lit = pca_lighting(images, eigvals, eigvecs, np.random.default_rng(3), sigma=0.1)
    drawn = np.random.default_rng(3).normal(0.0, 0.1, size=(2, 3))
    assert lit.dtype == np.float32
    expected = 100 + np.broadcast_to(lighting_shift(drawn, eigvals, eigvecs)[:, None, None, :],
                                     images.shape)
    np.testing.assert_allclose(lit, expected, rtol=1e-6)
    many = pca_lighting(np.zeros((4000, 1, 1, 3)), np.ones(3), np.eye(3), np.random.default_rng(0),
                        sigma=0.1)
    assert abs(many.std() - 0.1) < 0.005


def test_subtract_per_pixel_mean_follows_the_crop_and_its_mirror():
    where = Crops(np.array([0, 7, 29]), np.array([29, 3, 0]), np.array([True, False, True]))
    # images equal to the mean image: only a mean cut at the same place and mirrored with it gives 0
    mean = gradient_images(1)[0].astype(np.float32)
    images = gradient_images(1).repeat(3, axis=0)
    images[..., 2] = 0
    out = subtract_mean(crop_and_flip(images, 227, where), mean * [1, 1, 0], 227, where)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, 0)
    # any images: the same as subtracting before cropping
    images = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    out = subtract_mean(crop_and_flip(images, 227, where), mean, 227, where)
    np.testing.assert_array_equal(out, crop_and_flip(images.astype(np.float32) - mean, 227, where))


def test_subtract_per_channel_mean():
    images = np.full((2, 256, 256, 3), 50, dtype=np.uint8)
    where = centre_crops(2, 256, 227)
    out = subtract_mean(crop_and_flip(images, 227, where), np.array([10.0, 20.0, 30.0]), 227, where)
    np.testing.assert_array_equal(out[..., 0], 40)
    np.testing.assert_array_equal(out[..., 2], 20)


def test_to_nchw():
    images = np.arange(2 * 4 * 5 * 3).reshape(2, 4, 5, 3)
    x = to_nchw(images)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x[1, 2, 3, 4] == images[1, 3, 4, 2]


def test_crop_larger_than_the_images():
    with pytest.raises(DataError, match=r"^crop 300x300 is larger than the stored 256x256 images$"):
        random_crops(np.random.default_rng(0), 1, 256, 300)
    with pytest.raises(DataError, match="crop 227x227 is larger than the stored 200x200 images"):
        crop_and_flip(np.zeros((1, 200, 200, 3), np.uint8), 227, fixed_crops(1, 0, 0))
