"""The minidl dataset file: one HDF5 file holding images, labels, split and statistics.

Readers trust none of it: `read_contents` checks every part's type, shape and storage before
reading it (within the limits below and the file's read budget, minidl.hdf5), the labels against
the classes and the statistics for NaN, and refuses anything else in one line naming the file.
All statistics are over the training split only. The validation split is a seeded random choice
of `val_fraction` of the images, drawn per class: every class of two images or more has at least
one validation image and one training image. Read images through `stored_images(f)`, whatever
the storage.
"""
from __future__ import annotations

# Layout. N images, C classes, S = 256. The images are stored one of two ways:
#
#   /images        uint8   (N, S, S, 3)  RGB, height x width x channel, one image per chunk:
#                                        "raw" (no compression, a fletcher32 checksum per
#                                        image) or "gzip" (level 4; every file before
#                                        storages existed); any reader of version 1 reads both
#   /jpeg          vlen uint8 (N,)       "jpeg": each image's JPEG file (quality 90, 4:2:0),
#                                        S x S RGB, decoded on reading (format version 2;
#                                        there is then no /images)
#   /labels        int64   (N,)          class index in 0..C-1
#   /class_names   UTF-8 strings (C,)    name of each class index
#   /is_val        uint8   (N,)          1 = validation image, 0 = training image
#   /mean_image    float32 (S, S, 3)     per-pixel mean of the training images (as read back)
#   /mean_rgb      float32 (3,)          per-channel mean of the training images
#   /pca_eigvals   float32 (3,)          eigenvalues, largest first, of the 3x3 covariance
#                                        of the training images' RGB values (0..255 scale,
#                                        divided by the number of pixels)
#   /pca_eigvecs   float32 (3, 3)        the matching unit eigenvectors, one per COLUMN
#
#   root attributes: format = "minidl-dataset", version = 1 (2 for "jpeg"), image_size = S
#
# A validation file (prepare-data --labels) holds only validation images (is_val all 1) and the
# statistics of the training dataset it took its classes from.
# Limits checked on reading: at most 10^8 images of at most 4096x4096, each one stored; at most
# as many classes as images, up to 10^6; names of at most 1,000 characters.

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import h5py
import numpy as np
from PIL import Image

from minidl.atomic import atomic_hdf5
from minidl.errors import DataError
from minidl.hdf5 import (FLAG, FLOAT, IMAGE_SIZES, INTEGER, MAX_CLASSES, TEXT, FileCheck,
                         open_minidl_file, whole)

FORMAT = "minidl-dataset"
VERSION = 2  # the newest this reader reads; a file is written with the oldest that holds it
IMAGE_SIZE = 256
# how the images are kept: CPU per image read against bytes on disk (benchmarks/NOTES.md)
STORAGES = ("raw", "gzip", "jpeg")
DEFAULT_STORAGE = "raw"
GZIP_LEVEL = 4
JPEG_QUALITY = 90
# the HDF5 filters of each storage kept in /images
PIXEL_FILTERS = {"raw": dict(fletcher32=True), "gzip": dict(compression="gzip", compression_opts=GZIP_LEVEL)}
# far beyond ImageNet's 1.3 million: a header claiming more is crafted or damaged
MAX_IMAGES = 10 ** 8
BYTES_PER_IMAGE = 32
REQUIRED = ("labels", "class_names", "is_val", "mean_image", "mean_rgb", "pca_eigvals", "pca_eigvecs")


class Moments:
    """Running sums (float64) for the mean image and the RGB covariance.

    Pixel values are integers, so the sums stay exact in float64 (below 2^53) up to
    about two million 256x256 images, ImageNet included; so sums made apart (by
    worker processes) add up to exactly the same, and images can be taken out again.
    """

    def __init__(self, size: int):
        self.count = 0
        self.image_sum = np.zeros((size, size, 3))
        self.rgb_products = np.zeros((3, 3))  # sum over pixels of rgb rgb^T

    def add(self, images: Sequence[np.ndarray], sign: int = 1) -> None:
        """Add uint8 images to the sums (sign=-1 takes them out again)."""
        for image in images:
            image = image.astype(np.float64)
            pixels = image.reshape(-1, 3)
            self.image_sum += sign * image
            self.rgb_products += sign * (pixels.T @ pixels)
            self.count += sign

    def merge(self, other: "Moments") -> None:
        """Add the sums of `other` (made over other images) to these."""
        self.count += other.count
        self.image_sum += other.image_sum
        self.rgb_products += other.rgb_products

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


def check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise DataError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")


_encoders = {}  # (storage, shape) -> a one-image dataset in memory, whose filters make a chunk's bytes


def encode_image(image: np.ndarray, storage: str) -> tuple[bytes, np.ndarray]:
    """(what the file stores for `image` under `storage`, the pixels a reader gets back).

    Runs in prepare-data's workers, so that the writer only writes (ImageWriter.write).
    """
    if storage == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=JPEG_QUALITY)
        payload = buffer.getvalue()
        return payload, decode_jpeg(payload, image.shape[0], "the image just encoded")
    key = (storage, image.shape)
    if key not in _encoders:
        memory = h5py.File(f"minidl-encoder-{len(_encoders)}", "w", driver="core", backing_store=False)
        _encoders[key] = memory.create_dataset("one", (1,) + image.shape, np.uint8, chunks=(1,) + image.shape,
                                               **PIXEL_FILTERS[storage])
    encoder = _encoders[key]
    encoder[0] = image
    return encoder.id.read_direct_chunk((0, 0, 0, 0))[1], image


def decode_jpeg(payload: bytes, size: int, where: str) -> np.ndarray:
    """The uint8 (size, size, 3) image a stored JPEG holds; DataError naming `where` otherwise. The header
    is checked before any pixel is decoded: a crafted one may claim gigapixels."""
    try:
        with Image.open(io.BytesIO(payload), formats=["JPEG"]) as image:
            if image.size != (size, size) or image.mode != "RGB":
                raise DataError(f"{where} is corrupt: a stored JPEG is {image.mode} {image.size[0]}x"
                                f"{image.size[1]}, expected RGB {size}x{size}")
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{where} is damaged or truncated (a stored JPEG: {err})") from None


class ImageWriter:
    """The images of a dataset file being written: each written from encode_image's bytes."""

    def __init__(self, f: h5py.File, storage: str, count: int, size: int = IMAGE_SIZE):
        check_storage(storage)
        self.storage, self.size = storage, size
        if storage == "jpeg":
            self.images = f.create_dataset("jpeg", (count,), h5py.vlen_dtype(np.uint8), maxshape=(None,),
                                           chunks=(max(1, min(count, 1024)),))
        else:
            self.images = f.create_dataset("images", (count, size, size, 3), np.uint8,
                                           maxshape=(None, size, size, 3), chunks=(1, size, size, 3),
                                           **PIXEL_FILTERS[storage])

    @classmethod
    def reopen(cls, f: h5py.File, storage: str) -> "ImageWriter":
        """The writer of a file it began (prepare-data resuming)."""
        writer = cls.__new__(cls)
        writer.storage, writer.images = storage, f["jpeg" if storage == "jpeg" else "images"]
        writer.size = writer.images.shape[1] if storage != "jpeg" else IMAGE_SIZE
        return writer

    def write(self, index: int, payload: bytes) -> None:
        if self.storage == "jpeg":
            self.images[index] = np.frombuffer(payload, np.uint8)
        else:
            self.images.id.write_direct_chunk((index, 0, 0, 0), payload)

    def shrink(self, count: int) -> None:
        self.images.resize(count, axis=0)

    def written(self) -> h5py.Dataset | JpegImages:
        """The images written so far, read back as stored_images reads them."""
        return JpegImages(self.images, self.size) if self.storage == "jpeg" else self.images


class JpegImages:
    """A "jpeg" dataset's images, read as an /images dataset is: images[i] is uint8 (S, S, 3)."""

    def __init__(self, jpeg: h5py.Dataset, size: int):
        self.jpeg, self.shape, self.dtype = jpeg, (len(jpeg), size, size, 3), np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_jpeg(self.jpeg[index].tobytes(), self.shape[1], self.jpeg.file.filename)

    def read_direct(self, dest: np.ndarray, source_sel: slice) -> None:
        """h5py's read_direct for a slice of images: each decoded into its row of `dest`."""
        for row, index in enumerate(range(*source_sel.indices(len(self)))):
            dest[row] = self[index]


def stored_images(f: h5py.File) -> h5py.Dataset | JpegImages:
    """The images of the dataset `f` (from open_dataset): images[i] is image i, uint8 (S, S, 3), and
    images.shape is (N, S, S, 3), whatever the storage."""
    if "jpeg" in f:
        return JpegImages(f["jpeg"], f.attrs["image_size"])
    return f["images"]


def storage_of(f: h5py.File) -> str:
    """The storage ("raw", "gzip", "jpeg") of the dataset `f` (from open_dataset)."""
    if "jpeg" in f:
        return "jpeg"
    return "gzip" if f["images"].compression == "gzip" else "raw"


def write_dataset(path: str, samples: Iterable[tuple[np.ndarray, int]],
                  class_names: Sequence[str], *, count: int, val_fraction: float = 0.1,
                  seed: int = 0, progress: Callable[[int, int], None] | None = None,
                  storage: str = DEFAULT_STORAGE) -> int:
    """Write `samples`, an iterable of (uint8 256x256x3 image, int label), to the dataset `path`.

    Streams: one image is in memory at a time. `count` is the number expected (the
    file is preallocated; if fewer arrive it is shrunk). The file is written under a
    temporary name in the same folder and renamed onto `path` at the end, so an
    existing file survives a failure and no half-written file ever carries the name.
    `progress(done, count)` is called after each image. Returns the number written.
    """
    check_val_fraction(val_fraction)
    check_storage(storage)
    check_writable(path)
    with atomic_hdf5(path) as f:
        return _write_contents(f, path, samples, list(class_names), count, val_fraction, seed,
                               progress, storage)


def check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:  # NaN too
        raise DataError(f"val_fraction must be between 0 and 1 (both excluded), got {val_fraction}")


def check_writable(path: str) -> None:
    """Refuse, in one line, a `path` whose folder cannot be made or written."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"cannot write {path}: the folder {folder} is not writable")


def _write_contents(f, path, samples, class_names, count, val_fraction, seed, progress, storage):
    size = IMAGE_SIZE
    writer = ImageWriter(f, storage, count, size)
    labels = np.zeros(count, dtype=np.int64)
    moments = Moments(size)  # over all images; the validation ones are taken out at the end
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
        payload, pixels = encode_image(image, storage)
        writer.write(written, payload)
        labels[written] = label
        moments.add([pixels])
        written += 1
        if progress is not None:
            progress(written, count)
    if written == 0:
        raise DataError(f"no images to write to {path}")
    writer.shrink(written)
    labels = labels[:written]
    is_val = choose_validation(labels, len(class_names), val_fraction, seed)
    images = writer.written()
    moments.add([images[int(i)] for i in np.flatnonzero(is_val)], sign=-1)
    finish_dataset(f, labels, is_val, class_names, statistics(moments))
    return written


def statistics(moments: Moments) -> dict:
    """The file's statistics (mean_image, mean_rgb, pca_eigvals, pca_eigvecs) of the images in `moments`."""
    eigvals, eigvecs = np.linalg.eigh(moments.rgb_covariance())
    largest_first = np.argsort(eigvals)[::-1]
    return dict(mean_image=moments.mean_image().astype(np.float32), mean_rgb=moments.mean_rgb().astype(np.float32),
                pca_eigvals=eigvals[largest_first].astype(np.float32),
                pca_eigvecs=eigvecs[:, largest_first].astype(np.float32))


def finish_dataset(f: h5py.File, labels: np.ndarray, is_val: np.ndarray, class_names: Sequence[str],
                   stats: dict) -> None:
    """Write everything but the images (written by an ImageWriter), and the format mark, last."""
    f.create_dataset("labels", data=np.asarray(labels, np.int64))
    f.create_dataset("class_names", data=list(class_names), dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("is_val", data=np.asarray(is_val).astype(np.uint8))
    for name, value in stats.items():
        f.create_dataset(name, data=value)
    f.attrs.update(format=FORMAT, version=2 if "jpeg" in f else 1, image_size=stats["mean_image"].shape[0])


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
        count, size = _image_shape(f, check)
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


def _image_shape(f, check):
    """(N, S) of the images, stored in /images or as JPEGs in /jpeg, checked."""
    if check.member(f, "jpeg", required=False) is None:
        images = check.dataset(f, "images", np.dtype(np.uint8),
                               (range(MAX_IMAGES + 1), IMAGE_SIZES, IMAGE_SIZES, 3))
        count, size = images.shape[:2]
        if images.shape[2] != size:
            raise check.corrupt(f"images are {size}x{images.shape[2]}, not square")
        check.fields(f.attrs, {"image_size": whole(size, size)})
        return count, size
    jpeg = check.dataset(f, "jpeg", np.dtype(object), (range(MAX_IMAGES + 1),))
    if h5py.check_vlen_dtype(jpeg.dtype) != np.uint8:
        raise check.corrupt("'jpeg' is not a list of byte strings")
    size = check.fields(f.attrs, {"image_size": whole(IMAGE_SIZES.start, IMAGE_SIZES.stop - 1)})["image_size"]
    return jpeg.shape[0], size


def _class_names(f, check, count=None):
    """The class names (each at most MAX_NAME_CHARS), no more of them than images (`count`, if
    known)."""
    # read_contents checked the images' shape
    count = len(stored_images(f)) if count is None else count
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
