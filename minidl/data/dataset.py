"""The minidl dataset file: one HDF5 file holding images, labels, split and statistics.

Readers trust none of it: `read_contents` checks every part's type, shape and storage before
reading it (within the limits below and the file's read budget, minidl.hdf5), the labels against
the classes and the statistics for NaN, and refuses anything else in one line naming the file.
All statistics are over the training split only. The validation split is a seeded random choice
of `val_fraction` of the images, drawn per class: every class of two images or more has at least
one validation image and one training image.
"""
from __future__ import annotations

# Layout (format version 1). N images, C classes, S = 256:
#
#   /images        uint8   (N, S, S, 3)  RGB, height x width x channel; chunked one
#                                        image per chunk, gzip level 4
#   /labels        int64   (N,)          class index in 0..C-1
#   /class_names   UTF-8 strings (C,)    name of each class index
#   /is_val        uint8   (N,)          1 = validation image, 0 = training image
#   /mean_image    float32 (S, S, 3)     per-pixel mean of the training images
#   /mean_rgb      float32 (3,)          per-channel mean of the training images
#   /pca_eigvals   float32 (3,)          eigenvalues, largest first, of the 3x3 covariance
#                                        of the training images' RGB values (0..255 scale,
#                                        divided by the number of pixels)
#   /pca_eigvecs   float32 (3, 3)        the matching unit eigenvectors, one per COLUMN
#
#   root attributes: format = "minidl-dataset", version = 1, image_size = S
#
# Limits checked on reading: at most 10^8 images of at most 4096x4096, each one stored; at most
# as many classes as images, up to 10^6; names of at most 1,000 characters.

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import h5py
import numpy as np

from minidl.atomic import atomic_hdf5
from minidl.errors import DataError
from minidl.hdf5 import (FLAG, FLOAT, IMAGE_SIZES, INTEGER, MAX_CLASSES, TEXT, FileCheck,
                         open_minidl_file, whole)

FORMAT = "minidl-dataset"
VERSION = 1
IMAGE_SIZE = 256
GZIP_LEVEL = 4
# far beyond ImageNet's 1.3 million: a header claiming more is crafted or damaged
MAX_IMAGES = 10 ** 8
BYTES_PER_IMAGE = 32
REQUIRED = ("images", "labels", "class_names", "is_val", "mean_image", "mean_rgb", "pca_eigvals",
            "pca_eigvecs")


class _Moments:
    """Running sums (float64) for the mean image and the RGB covariance.

    Pixel values are integers, so the sums stay exact in float64 (below 2^53) up to
    about two million 256x256 images, ImageNet included; so images can be
    subtracted out again exactly.
    """

    def __init__(self, size):
        self.count = 0
        self.image_sum = np.zeros((size, size, 3))
        self.rgb_products = np.zeros((3, 3))  # sum over pixels of rgb rgb^T

    def add(self, image, sign=1):
        """Add one uint8 image to the sums (sign=-1 takes it out again)."""
        image = image.astype(np.float64)
        pixels = image.reshape(-1, 3)
        self.count += sign
        self.image_sum += sign * image
        self.rgb_products += sign * (pixels.T @ pixels)

    def mean_image(self):
        return self.image_sum / self.count

    def mean_rgb(self):
        return self.mean_image().mean(axis=(0, 1))

    def rgb_covariance(self):
        """E[rgb rgb^T] - E[rgb] E[rgb]^T over all pixels of the images added."""
        mean = self.mean_rgb()
        pixels = self.count * self.image_sum.shape[0] * self.image_sum.shape[1]
        return self.rgb_products / pixels - np.outer(mean, mean)


def choose_validation(labels, num_classes, val_fraction, seed):
    """A boolean mask of the validation images: a seeded, per-class random choice.

    Each class contributes about val_fraction of its images; the rounding left over
    goes to randomly chosen classes so the total is about round(val_fraction * N). A class
    of two images or more gets at least one validation image and keeps at least one
    training image (so every class is validated); a class of one image trains on it.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=num_classes)
    wanted = min(round(val_fraction * len(labels)), len(labels) - 1)
    share = val_fraction * counts
    per_class = np.floor(share).astype(np.int64)
    # the classes with the largest remainders get one more; ties broken at random
    shuffled = rng.permutation(num_classes)
    by_remainder = shuffled[np.argsort(-(share - per_class)[shuffled], kind="stable")]
    per_class[by_remainder[:max(wanted - per_class.sum(), 0)]] += 1
    per_class = np.where(counts >= 2, np.clip(per_class, 1, np.maximum(counts - 1, 1)), 0)
    is_val = np.zeros(len(labels), dtype=bool)
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        is_val[rng.choice(members, size=min(per_class[cls], len(members)), replace=False)] = True
    return is_val


def write_dataset(path: str, samples: Iterable[tuple[np.ndarray, int]],
                  class_names: Sequence[str], *, count: int, val_fraction: float = 0.1,
                  seed: int = 0, progress: Callable[[int, int], None] | None = None):
    """Write `samples`, an iterable of (uint8 256x256x3 image, int label), to the dataset `path`.

    Streams: one image is in memory at a time. `count` is the number expected (the
    file is preallocated; if fewer arrive it is shrunk). The file is written under a
    temporary name in the same folder and renamed onto `path` at the end, so an
    existing file survives a failure and no half-written file ever carries the name.
    `progress(done, count)` is called after each image. Returns the number written.
    """
    if not 0 < val_fraction < 1:  # NaN too
        raise DataError(f"val_fraction must be between 0 and 1 (both excluded), got {val_fraction}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"cannot write {path}: the folder {folder} is not writable")
    with atomic_hdf5(path) as f:
        return _write_contents(f, path, samples, list(class_names), count, val_fraction, seed,
                               progress)


def _write_contents(f, path, samples, class_names, count, val_fraction, seed, progress):
    size = IMAGE_SIZE
    images = f.create_dataset("images", shape=(count, size, size, 3),
                              maxshape=(None, size, size, 3), dtype=np.uint8,
                              chunks=(1, size, size, 3), compression="gzip",
                              compression_opts=GZIP_LEVEL)
    labels = np.zeros(count, dtype=np.int64)
    moments = _Moments(size)  # over all images; the validation ones are taken out at the end
    written = 0
    for image, label in samples:
        if written == count:
            raise DataError(f"more images than the count={count} given for {path}")
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise DataError(f"image {written} is {image.dtype} {image.shape}, expected uint8 "
                            f"({size}, {size}, 3)")
        if not 0 <= label < len(class_names):
            raise DataError(f"image {written} has label {label}, outside the {len(class_names)} "
                            "classes")
        images[written] = image
        labels[written] = label
        moments.add(image)
        written += 1
        if progress is not None:
            progress(written, count)
    if written == 0:
        raise DataError(f"no images to write to {path}")
    images.resize(written, axis=0)
    labels = labels[:written]

    is_val = choose_validation(labels, len(class_names), val_fraction, seed)
    for index in np.flatnonzero(is_val):  # a second read of the validation images only
        moments.add(images[index], sign=-1)
    eigvals, eigvecs = np.linalg.eigh(moments.rgb_covariance())
    largest_first = np.argsort(eigvals)[::-1]

    f.create_dataset("labels", data=labels)
    f.create_dataset("class_names", data=class_names, dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("is_val", data=is_val.astype(np.uint8))
    f.create_dataset("mean_image", data=moments.mean_image().astype(np.float32))
    f.create_dataset("mean_rgb", data=moments.mean_rgb().astype(np.float32))
    f.create_dataset("pca_eigvals", data=eigvals[largest_first].astype(np.float32))
    f.create_dataset("pca_eigvecs", data=eigvecs[:, largest_first].astype(np.float32))
    f.attrs.update(format=FORMAT, version=VERSION, image_size=size)
    return written


class Contents(NamedTuple):
    """Everything in a dataset file but the image pixels, checked."""
    num_images: int
    image_size: int
    labels: np.ndarray       # int64 (N,), each in 0..C-1
    is_val: np.ndarray       # bool (N,)
    class_names: tuple       # C strings
    mean_image: np.ndarray   # floating (S, S, 3)
    mean_rgb: np.ndarray     # floating (3,)
    pca_eigvals: np.ndarray  # floating (3,)
    pca_eigvecs: np.ndarray  # floating (3, 3)

    def fingerprint(self):
        """A sha256 of everything checked here: a replaced or regenerated file differs (its labels,
        split or training mean do), a copy or a symlink of the same file does not. The pixels are
        not read (hours for ImageNet); the mean image stands for them, as it sums every training
        image."""
        digest = hashlib.sha256(json.dumps([self.num_images, self.image_size,
                                            list(self.class_names)]).encode())
        for array, dtype in ((self.labels, "<i8"), (self.is_val, "u1"), (self.mean_image, "<f8"),
                             (self.mean_rgb, "<f8"), (self.pca_eigvals, "<f8"),
                             (self.pca_eigvecs, "<f8")):
            digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
        return digest.hexdigest()


def open_dataset(path: str) -> h5py.File:
    """Open a minidl dataset read-only, after checking it is one; returns the h5py.File.

    Use it as a context manager (`with open_dataset(p) as f:`). Everything but the
    pixels is checked on every opening (see read_contents), so what a caller reads
    next is sane; a problem raises DataError naming the file and the problem.
    """
    f = open_minidl_file(path, "dataset", FORMAT, VERSION, DataError)
    try:
        read_contents(f, path)
    except BaseException:
        f.close()
        raise
    return f


def read_dataset(path: str) -> Contents:
    """The checked Contents of the dataset file `path`."""
    with open_minidl_file(path, "dataset", FORMAT, VERSION, DataError) as f:
        return read_contents(f, path)


def read_contents(f: h5py.File, path: str) -> Contents:
    """The Contents of the open dataset file `f`, each part checked before it is read or trusted."""
    check = FileCheck(path, "dataset", DataError)
    with check.reading():
        # a file missing parts is named as not a dataset, before any part is judged
        for name in REQUIRED:
            check.member(f, name)
        images = check.dataset(f, "images", np.dtype(np.uint8),
                               (range(MAX_IMAGES + 1), IMAGE_SIZES, IMAGE_SIZES, 3))
        count, size = images.shape[:2]
        if images.shape[2] != size:
            raise check.corrupt(f"images are {size}x{images.shape[2]}, not square")
        check.fields(f.attrs, {"image_size": whole(size, size)})
        # what every reader keeps per image (label, split flag, position, order): so the count a
        # header claims, already backed by stored chunks, is bounded by the file's budget too
        check.charge(count * BYTES_PER_IMAGE, f"{count:,} images")
        class_names = _class_names(f, check, count)
        labels = check.array(f, "labels", INTEGER, (count,))
        outside = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
        if len(outside):
            raise check.corrupt(f"image {outside[0]} has label {labels[outside[0]]}, outside the "
                                f"{len(class_names)} classes (0..{len(class_names) - 1})")
        is_val = check.array(f, "is_val", FLAG, (count,))
        if not np.isin(is_val, (0, 1)).all():
            raise check.corrupt("'is_val' holds values other than 0 and 1")
        return Contents(num_images=count, image_size=size, labels=labels.astype(np.int64),
                        is_val=is_val.astype(bool), class_names=class_names,
                        mean_image=check.array(f, "mean_image", FLOAT, (size, size, 3)),
                        mean_rgb=check.array(f, "mean_rgb", FLOAT, (3,)),
                        pca_eigvals=check.array(f, "pca_eigvals", FLOAT, (3,)),
                        pca_eigvecs=check.array(f, "pca_eigvecs", FLOAT, (3, 3)))


def _class_names(f, check, count=None):
    """The class names (each at most MAX_NAME_CHARS), no more of them than images (`count`, if
    known)."""
    # read_contents checked the images' shape
    count = f["images"].shape[0] if count is None else count
    return check.array(f, "class_names", TEXT, (range(1, max(1, min(MAX_CLASSES, count)) + 1),))


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset file holds, for printing."""
    path: str
    num_images: int
    num_train: int
    num_val: int
    class_names: tuple
    image_size: int

    @property
    def num_classes(self):
        return len(self.class_names)


def read_class_names(f: h5py.File) -> tuple[str, ...]:
    """The class names of the dataset `f` (from open_dataset), checked."""
    check = FileCheck(f.filename, "dataset", DataError)
    with check.reading():
        return _class_names(f, check)


def dataset_info(path: str) -> DatasetInfo:
    """A DatasetInfo for the dataset file `path` (checked as open_dataset does)."""
    contents = read_dataset(path)
    num_val = int(np.count_nonzero(contents.is_val))
    return DatasetInfo(path=path, num_images=contents.num_images,
                       num_train=contents.num_images - num_val, num_val=num_val,
                       class_names=contents.class_names, image_size=contents.image_size)
