"""Batches from a minidl dataset file, prepared by a background thread while the caller trains.

Every random choice is a pure function of where the run stands: the image order of
epoch e comes from (seed, e), the augmentation of batch i of epoch e from (seed, e, i).
So `epoch_batches(e, start=k)` yields exactly the batches k, k+1, ... of an
uninterrupted epoch, and a shard (one rank's rows) is exactly those rows of one
process's batch. A batch's images are read in file order (a forward sweep).
"""
import atexit
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator

import numpy as np

from minidl.data.augment import (centre_crops, check_crop, crop_and_flip, pca_lighting, random_crops,
                                 subtract_mean, ten_crops, to_nchw)
from minidl.data.dataset import open_dataset, read_dataset
from minidl.errors import DataError
from minidl.hdf5 import FileCheck

SPLITS = ("train", "val", "all")
MEANS = ("pixel", "channel")
# SeedSequence treats [s, e] and [s, e, 0] alike, so each use gets its own non-zero tag
ORDER_STREAM, AUGMENT_STREAM = 1, 2


class Loader:
    """Mini-batches (x float32 NCHW, y int64) of one split of a dataset file.

    augment=True: random crop + mirror, PCA lighting (pca_sigma; 0 turns it off). augment=False:
    the centre crop, or with ten_crop the paper's 10 crops, x (B, 10, 3, crop, crop) in TEN_CROP_ORDER.
    mean="pixel" subtracts the dataset's mean image, "channel" its mean RGB, an (S, S, 3) array that.
    scale multiplies the result (1: the paper's 0..255; He-initialised weights want about 1/255).
    shuffle (default: as augment) draws a new image order each epoch.
    shard=(rank, size): this rank's contiguous run of each batch's rows, augmented as one
    process augments them (len() and num_images stay the global batches' and images').
    """

    def __init__(self, path: str | os.PathLike, *, split: str = "train", batch_size: int, crop: int = 227,
                 augment: bool = True, pca_sigma: float = 0.1, mean: str | np.ndarray = "pixel",
                 ten_crop: bool = False, seed: int = 0, prefetch: int = 2, drop_last: bool = False,
                 shuffle: bool | None = None, scale: float = 1.0, shard: tuple[int, int] = (0, 1)) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(mean, str) and mean not in MEANS:
            raise ValueError(f"mean must be one of {MEANS} or a mean image, got {mean!r}")
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch must be at least 1, got {batch_size} and {prefetch}")
        if ten_crop and augment:
            raise ValueError("ten_crop is a test-time view: use it with augment=False")
        rank, size = shard
        if not 0 <= rank < size:
            raise ValueError(f"shard must be (rank, size) with 0 <= rank < size, got {shard!r}")
        self.shard = (rank, size)
        self.path, self.batch_size, self.crop, self.augment = path, batch_size, crop, augment
        self.pca_sigma, self.ten_crop, self.seed, self.prefetch = pca_sigma, ten_crop, seed, prefetch
        self.drop_last, self.scale = drop_last, scale
        self.shuffle = augment if shuffle is None else shuffle
        contents = read_dataset(path)
        chosen = {"train": ~contents.is_val, "val": contents.is_val, "all": np.ones_like(contents.is_val)}[split]
        self.indices = np.flatnonzero(chosen)  # file positions of this split's images
        self.labels = contents.labels[self.indices]
        self.class_names = contents.class_names
        self.image_size = contents.image_size
        if isinstance(mean, str):
            self.mean = contents.mean_image if mean == "pixel" else contents.mean_rgb
        elif np.shape(mean) != contents.mean_image.shape:
            raise DataError(f"{path} holds {self.image_size}x{self.image_size} images, but the mean image "
                            f"to subtract is {np.shape(mean)[0]}x{np.shape(mean)[1]}")
        else:  # another set's mean: a trained model's inputs are centred on its training set's
            self.mean = np.asarray(mean, dtype=contents.mean_image.dtype)
        # the file stores eigenvalues of 0..255 values; on 0..255 pixels the paper's shift is
        # eigvecs @ (alpha * eigvals / 255) (fb.resnet.torch's 0.2175, 0.0188, 0.0045 on the 0..1 scale)
        self.lighting_scales = contents.pca_eigvals / 255.0
        self.eigvecs = contents.pca_eigvecs
        self.fingerprint = contents.fingerprint()  # what a checkpoint records of its data, to check on resume
        check_crop(crop, self.image_size)

    @property
    def num_images(self) -> int:
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        full, rest = divmod(self.num_images, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def batch_positions(self, epoch: int) -> list[np.ndarray]:
        """For each batch of `epoch`, the sorted positions (within this split) of its images."""
        order = np.arange(self.num_images)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, ORDER_STREAM]).permutation(self.num_images)
        return [np.sort(order[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(len(self))]

    def epoch_batches(self, epoch: int, start: int = 0) -> "BackgroundIterator":
        """An iterator over the batches start, start+1, ... of `epoch`, prepared in a background thread.

        Use it in `with contextlib.closing(...)` (see BackgroundIterator): the thread then stops on
        any way out of the loop. An error in the thread is raised here, in the caller.
        """
        return BackgroundIterator(lambda: _reported(self.path, self._read_batches(epoch, start)), self.prefetch)

    def shard_rows(self, count: int) -> np.ndarray:
        """The rows of a batch of `count` this shard holds: its contiguous run of an even split."""
        rank, size = self.shard
        return np.array_split(np.arange(count), size)[rank]

    def _read_batches(self, epoch, start):
        # runs in the background thread, which opens its own file: h5py objects stay in one thread
        with open_dataset(self.path) as f:
            images = f["images"]
            for i, positions in enumerate(self.batch_positions(epoch)[start:], start=start):
                rows = self.shard_rows(len(positions))
                own = _read_images(images, self.indices[positions[rows]])
                if self.augment:  # the crops and lighting drawn for the whole batch: this shard keeps its rows
                    rng = np.random.default_rng([self.seed, epoch, AUGMENT_STREAM, i])
                    x = self.make_batch(own, rng) if len(rows) == len(positions) else \
                        self.make_batch(_padded(own, rows, len(positions)), rng)[rows]
                elif len(rows):  # no random draws: this shard's rows alone give the same input
                    x = self.make_batch(own, None)
                else:  # a last batch smaller than the ranks leaves some without rows
                    continue
                yield x, self.labels[positions[rows]]

    def make_batch(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """uint8 (B, S, S, 3) images -> the network's float32 input, augmented or test crops."""
        if self.augment:
            where = random_crops(rng, len(images), self.image_size, self.crop)
            x = self._crop(images, where)
            if self.pca_sigma > 0:
                x = pca_lighting(x, self.lighting_scales, self.eigvecs, rng, self.pca_sigma)
            return self._to_input(x)
        if self.ten_crop:
            views = ten_crops(len(images), self.image_size, self.crop)
            return np.stack([self._to_input(self._crop(images, where)) for where in views], axis=1)
        return self._to_input(self._crop(images, centre_crops(len(images), self.image_size, self.crop)))

    def _crop(self, images, where):
        return subtract_mean(crop_and_flip(images, self.crop, where), self.mean, self.crop, where)

    def _to_input(self, x):
        x = to_nchw(x)
        if self.scale != 1:
            x *= np.float32(self.scale)
        return x


def _read_images(images, file_positions):
    """The images at increasing `file_positions`, read one by one: a forward sweep through the file."""
    if len(file_positions) == 0:
        return np.zeros((0,) + images.shape[1:], images.dtype)
    return np.stack([images[index] for index in file_positions])


def _padded(own, rows, count):
    """A batch of `count` blank images with `own` at `rows`: the others' rows are drawn for, never read."""
    batch = np.zeros((count,) + own.shape[1:], own.dtype)
    batch[rows] = own
    return batch


def _reported(path, batches):
    """`batches`, with an image that cannot be read from a damaged file refused in one line naming it.

    Only h5py's OSError for unreadable data: the thread also augments, and an error there is a bug.
    """
    with FileCheck(path, "dataset", DataError).reading(errors=OSError):
        yield from batches


class BackgroundIterator:
    """Runs a generator in a daemon thread, `depth` items ahead of the consumer; its errors are raised here.

    Dropping or closing the iterator stops the thread promptly, closing the generator
    (its `with` blocks exit) in the thread; close() waits for that. Consume it in
    `with contextlib.closing(...)`: a daemon thread still running at interpreter
    shutdown may hold h5py's global lock and hang the exit. A thread left running is
    stopped at exit as a last resort.
    """

    def __init__(self, make_generator: Callable[[], Iterator], depth: int) -> None:
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        # the thread gets the queue and the event, not self: otherwise it would keep
        # this object alive and dropping the iterator could never stop it
        self._thread = threading.Thread(target=_produce, args=(make_generator, self._queue, self._stop), daemon=True)
        _running[self._thread] = self._stop  # known before it starts: a Ctrl-C can land inside start()
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()  # Ctrl-C interrupts this wait; the caller's `with` then closes
        if kind == "item":
            return value
        self.close()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and wait for it, so the file it read is closed when this returns
        (the caller may rewrite it at once, or exit)."""
        self.__del__()
        if self._thread is not threading.current_thread():
            _join(self._thread)

    def __del__(self):  # dropped: tell the thread to stop, without waiting (this may run anywhere)
        self._finished = True
        self._stop.set()


_running = weakref.WeakKeyDictionary()  # producer thread -> its stop event, for the last resort at exit


@atexit.register
def _stop_at_exit():
    # atexit runs before Python ends the daemon threads: the last moment they can still stop cleanly
    for thread, stop in list(_running.items()):
        stop.set()
        _join(thread)


def _join(thread):
    """Wait for a producer thread to end (within a batch: it checks its event between batches), even
    through a second Ctrl-C, raised once it has: leaving the thread running is what would hang."""
    interrupted = False
    while thread.is_alive():  # False too for a thread not started
        try:
            thread.join()
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _produce(make_generator, messages, stop):
    """The background thread: queue ("item", x) for each item, then ("end", None) or ("error", exc)."""
    def put(message):  # waits for room; False once the consumer has stopped
        while not stop.is_set():
            try:
                messages.put(message, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        items = make_generator()
        try:
            for item in items:
                if not put(("item", item)):
                    return
        finally:
            items.close()
        put(("end", None))
    except BaseException as err:  # handed to the consumer, which re-raises it
        put(("error", err))
