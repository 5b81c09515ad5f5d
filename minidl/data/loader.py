"""Batches from a minidl dataset file, made by worker processes (or a thread) while the caller trains.

Every random choice is a pure function of where the run stands: the image order of
epoch e comes from (seed, e), the augmentation of batch i of epoch e from (seed, e, i).
So `epoch_batches(e, start=k)` yields exactly the batches k, k+1, ... of an
uninterrupted epoch, whatever the number of workers, and a shard (one rank's rows) is
exactly those rows of one process's batch. A batch's images are read in file order (a
forward sweep). The CPU reads and crops (uint8); the mirror, float conversion, mean, lighting
and scale run on the loader's GPU (minidl.functions.to_input), or on a CPU device in the makers.
"""
import atexit
import contextlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from minidl.data.augment import (Crops, centre_crops, check_crop, crop_and_flip, lighting_shifts, random_crops,
                                 ten_crops)
from minidl.data.dataset import open_dataset, read_dataset, stored_images
from minidl.data.workers import WorkerPool
from minidl.device import Device, device as as_device
from minidl.errors import DataError
# the module, not its names: to_input imports minidl.data.augment, so importing to_input first reaches here
# while it is still being made
from minidl.functions import to_input
from minidl.hdf5 import FileCheck

SPLITS = ("train", "val", "all")
MEANS = ("pixel", "channel")
# SeedSequence treats [s, e] and [s, e, 0] alike, so each use gets its own non-zero tag
ORDER_STREAM, AUGMENT_STREAM = 1, 2
TEN = 10  # the paper's test views


def default_workers() -> int:
    """The cores this process may use, minus one for the training loop; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class BatchPlan(NamedTuple):
    """One batch of one shard: its images, their labels, and where each crop is cut and how it is lit."""
    number: int                 # the batch's number in its epoch
    file_positions: np.ndarray  # the shard's images, increasing: a forward sweep through the file
    labels: np.ndarray          # int64, one per image
    where: Crops                # one per crop; ten_crop: each image's 10 views in a row (TEN_CROP_ORDER)
    shift: np.ndarray | None    # float32 (crops, 3): the PCA lighting; None without

    @property
    def views(self) -> int:
        return len(self.where.tops) // max(len(self.file_positions), 1)


class Loader:
    """Mini-batches (x float32 NCHW, y int64) of one split of a dataset file; on a GPU under the "fp16" and
    "bf16" precisions x is in their 16-bit compute dtype (to_input.InputFeed), the float32 values rounded once.
    augment=True: random crop + mirror, PCA lighting (pca_sigma; 0 turns it off). augment=False:
    the centre crop, or with ten_crop the paper's 10 crops, x (B, 10, 3, crop, crop) in TEN_CROP_ORDER.
    mean="pixel" subtracts the dataset's mean image, "channel" its mean RGB, an (S, S, 3) array that.
    scale multiplies the result (1: the paper's 0..255; He-initialised weights want about 1/255).
    shuffle (default: as augment) draws a new image order each epoch.
    shard=(rank, size): this rank's contiguous run of each batch's rows, augmented as one
    process augments them (len() and num_images stay the global batches' and images').
    workers: 0 cuts the crops in a thread, N >= 1 in N processes; x is delivered on `device` (or the CPU).
    """

    def __init__(self, path: str | os.PathLike, *, split: str = "train", batch_size: int, crop: int = 227,
                 augment: bool = True, pca_sigma: float = 0.1, mean: str | np.ndarray = "pixel",
                 ten_crop: bool = False, seed: int = 0, prefetch: int = 2, drop_last: bool = False,
                 shuffle: bool | None = None, scale: float = 1.0, shard: tuple[int, int] = (0, 1),
                 workers: int = 0, device: Device | str | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(mean, str) and mean not in MEANS:
            raise ValueError(f"mean must be one of {MEANS} or a mean image, got {mean!r}")
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch must be at least 1, got {batch_size} and {prefetch}")
        if ten_crop and augment:
            raise ValueError("ten_crop is a test-time view: use it with augment=False")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be a whole number of processes, 0 or more, got {workers!r}")
        rank, size = shard
        if not 0 <= rank < size:
            raise ValueError(f"shard must be (rank, size) with 0 <= rank < size, got {shard!r}")
        self.shard = (rank, size)
        self.path, self.batch_size, self.crop, self.augment = path, batch_size, crop, augment
        self.pca_sigma, self.ten_crop, self.seed, self.prefetch = pca_sigma, ten_crop, seed, prefetch
        self.drop_last, self.scale, self.workers, self.device = drop_last, scale, workers, device
        self.shuffle = augment if shuffle is None else shuffle
        self._read_contents(path, split, mean)
        check_crop(crop, self.image_size)
        self._positions, self._feeds = (None, None), {}

    def _read_contents(self, path, split, mean):
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
        # what the device stage subtracts: the same float32 values, as an image whatever the mean's kind
        self.mean_image = np.ascontiguousarray(np.broadcast_to(self.mean.astype(np.float32),
                                                               contents.mean_image.shape))
        # the file stores eigenvalues of 0..255 values; on 0..255 pixels the paper's shift is
        # eigvecs @ (alpha * eigvals / 255) (fb.resnet.torch's 0.2175, 0.0188, 0.0045 on the 0..1 scale)
        self.lighting_scales = contents.pca_eigvals / 255.0
        self.eigvecs = contents.pca_eigvecs
        self.fingerprint = contents.fingerprint()  # what a checkpoint records of its data, to check on resume

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
        kept = self._positions  # the last epoch's, which every batch's plan asks for; one read: thread-safe
        if kept[0] != epoch:
            order = np.arange(self.num_images)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, ORDER_STREAM]).permutation(self.num_images)
            kept = self._positions = (epoch, [np.sort(order[i * self.batch_size:(i + 1) * self.batch_size])
                                              for i in range(len(self))])
        return kept[1]

    def shard_rows(self, count: int) -> np.ndarray:
        """The rows of a batch of `count` this shard holds: its contiguous run of an even split."""
        rank, size = self.shard
        return np.array_split(np.arange(count), size)[rank]

    def plan(self, epoch: int, number: int) -> BatchPlan | None:
        """Batch `number` of `epoch` for this shard; None when it has no rows of that batch (a last batch
        smaller than the ranks, without augmentation: nothing is drawn for it)."""
        positions = self.batch_positions(epoch)[number]
        rows = self.shard_rows(len(positions))
        if not self.augment and not len(rows):
            return None
        mine = positions[rows]
        if self.augment:  # the crops and lighting drawn for the whole batch: this shard keeps its rows
            where, shift = self.draw(np.random.default_rng([self.seed, epoch, AUGMENT_STREAM, number]),
                                     len(positions))
            where, shift = Crops(*(a[rows] for a in where)), None if shift is None else shift[rows]
        else:
            where, shift = self.test_crops(len(rows)), None
        return BatchPlan(number, self.indices[mine], self.labels[mine], where, shift)

    def draw(self, rng: np.random.Generator, count: int) -> tuple[Crops, np.ndarray | None]:
        """The training augmentation of `count` images: crops, then lighting shifts, drawn from `rng`."""
        where = random_crops(rng, count, self.image_size, self.crop)
        shift = lighting_shifts(rng, count, self.lighting_scales, self.eigvecs, self.pca_sigma) \
            if self.pca_sigma > 0 else None
        return where, shift

    def test_crops(self, count: int) -> Crops:
        """The centre crop of `count` images, or their 10 views each, image by image."""
        if not self.ten_crop:
            return centre_crops(count, self.image_size, self.crop)
        views = ten_crops(count, self.image_size, self.crop)
        return Crops(*(np.stack([getattr(v, field) for v in views], axis=1).reshape(-1) for field in Crops._fields))

    def make_batch(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """uint8 (B, S, S, 3) images -> the network's float32 input (NumPy), augmented or test crops: the
        reference the loader's batches equal."""
        where, shift = self.draw(rng, len(images)) if self.augment else (self.test_crops(len(images)), None)
        crops = crop_and_flip(images, self.crop, where, np.repeat(np.arange(len(images)), TEN if self.ten_crop else 1))
        return self.shaped(to_input.crops_to_input_cpu(crops, self.mean_image, where, shift, self.scale), len(images))

    def shaped(self, x: np.ndarray, count: int) -> np.ndarray:
        """Ten-crop inputs as (count, 10, 3, crop, crop)."""
        return x.reshape((count, TEN) + x.shape[1:]) if self.ten_crop else x

    def batch_numbers(self, epoch: int, start: int = 0) -> list[int]:
        """The batches start, start+1, ... of `epoch` this shard has rows of."""
        return [i for i in range(start, len(self)) if self.augment or len(self.shard_rows(
            len(self.batch_positions(epoch)[i])))]

    def epoch_batches(self, epoch: int, start: int = 0, labels_on_device: bool = False) -> "Batches":
        """An iterator over the batches start, start+1, ... of `epoch`, made ahead by the workers.

        Use it in `with contextlib.closing(...)`: the workers then stop on any way out of the
        loop. An error in a worker is raised here, in the caller, and so is a worker's death.
        `labels_on_device`: on a GPU, the labels come as int32 on the loader's device, uploaded with the batch.
        """
        numbers = self.batch_numbers(epoch, start)
        # on a CPU device the makers finish the input too, as the one thread did: the loop's core only trains
        finish = not as_device(self.device).is_cuda
        if self.workers == 0:
            made = BackgroundIterator(lambda: _reported(self.path, self._made_in_thread(epoch, numbers, finish)),
                                      self.prefetch)
        else:
            crop_bytes = self.batch_size * (TEN if self.ten_crop else 1) * self.crop * self.crop * 3
            rows = self.batch_size * (TEN if self.ten_crop else 1)
            made = WorkerPool(lambda: self._maker(epoch, finish), numbers, self.workers, self.prefetch,
                              crop_bytes * (np.dtype(np.float32).itemsize if finish else 1),
                              spare_bytes=0 if finish else to_input.trailer_bytes(rows))
        return Batches(self, epoch, made, None if finish else self._feed(), labels_on_device)

    def _feed(self):
        """This loader's InputFeed for its device: one per device, so its pinned buffer is reused."""
        device = as_device(self.device)
        if device.name not in self._feeds:
            self._feeds[device.name] = to_input.InputFeed(device, self.mean_image, self.scale)
        return self._feeds[device.name]

    @contextlib.contextmanager
    def _maker(self, epoch, finish):
        """In a worker: `make(number, out)`, which writes batch `number` into the bytes `out` (its uint8 crops,
        or with `finish` its float32 input) and returns how many it filled, reading the file this opens
        (an unreadable image refused in one line naming it)."""
        with FileCheck(self.path, "dataset", DataError).reading(errors=OSError), open_dataset(self.path) as f:
            images = stored_images(f)

            def make(number, out):
                plan = self.plan(epoch, number)
                if finish:
                    shape = self.crops_shape(plan)
                    x = out[:4 * np.prod(shape)].view(np.float32).reshape((shape[0], 3) + shape[1:3])
                    self.finished(images, plan, x)
                    return x.nbytes
                crops = out[:np.prod(self.crops_shape(plan))].reshape(self.crops_shape(plan))
                self.cut(images, plan, crops, mirror=False)  # the device mirrors (to_input.cu)
                return crops.nbytes
            yield make

    def crops_shape(self, plan: BatchPlan) -> tuple:
        return (len(plan.where.tops), self.crop, self.crop, 3)

    def cut(self, images, plan: BatchPlan, out: np.ndarray, mirror: bool = True) -> None:
        """Read the plan's images from the h5py dataset `images`, one by one, and cut their crops into `out`
        (with mirror=False, the windows as the images hold them)."""
        buffer = np.empty((1,) + images.shape[1:], images.dtype)
        views = plan.views
        where = plan.where if mirror else plan.where._replace(flips=np.zeros(len(plan.where.flips), bool))
        for i, position in enumerate(plan.file_positions):
            images.read_direct(buffer, np.s_[position:position + 1])
            rows = slice(i * views, (i + 1) * views)
            crop_and_flip(buffer, self.crop, Crops(*(a[rows] for a in where)), np.zeros(views, int), out[rows])

    def finished(self, images, plan: BatchPlan, out: np.ndarray | None = None) -> np.ndarray:
        """The plan's crops as the network's float32 input (NumPy), flat: (crops, 3, crop, crop), into `out`."""
        crops = np.empty(self.crops_shape(plan), np.uint8)
        self.cut(images, plan, crops)
        return to_input.crops_to_input_cpu(crops, self.mean_image, plan.where, plan.shift, self.scale, out)

    def _made_in_thread(self, epoch, numbers, finish):
        # runs in the background thread, which opens its own file: h5py objects stay in one thread
        with open_dataset(self.path) as f:
            for number in numbers:
                start = time.perf_counter()
                plan = self.plan(epoch, number)
                if finish:
                    made = self.finished(stored_images(f), plan)
                else:
                    made = np.empty(self.crops_shape(plan), np.uint8)
                    self.cut(stored_images(f), plan, made, mirror=False)
                yield number, made, time.perf_counter() - start


class Batches:
    """An epoch's batches (x on the loader's device, y int64) made ahead (by a WorkerPool or a BackgroundIterator):
    uint8 windows finished by `feed` on a GPU (float32, or the precision's 16-bit compute dtype: InputFeed),
    or float32 inputs when `feed` is None. close() stops their makers.
    `delivery_rate()`: the images/s the makers and the feed could deliver since the last call (the makers'
    time shared among them), whatever the consumer's pace."""

    def __init__(self, loader: Loader, epoch: int, made: Iterator, feed: "to_input.InputFeed | None",
                 labels_on_device: bool = False) -> None:
        self.loader, self.epoch, self._made, self._feed = loader, epoch, made, feed
        self._labels_on_device = labels_on_device and feed is not None
        self._makers = max(1, getattr(made, "count", 1))
        self._images, self._seconds = 0, 0.0
        # the workers' slots page-locked: each batch is uploaded straight from its slot, which is given back
        # once that copy is done (at the next batch), not copied on the host first
        self._uploading = None
        self._in_place = isinstance(made, WorkerPool) and feed is not None and feed.register(made.memory)
        if self._in_place:
            made.before_unmap = feed.unregister

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        if self._uploading is not None:  # next(made) gives the last batch's slot back: its copy must be done
            if not self._uploading.done:
                self._uploading.synchronize()
            self._uploading = None
        number, made, made_in = next(self._made)
        start = time.perf_counter()
        plan = self.loader.plan(self.epoch, number)
        shape = self.loader.crops_shape(plan)
        labels = plan.labels
        if self._labels_on_device:  # the labels go up with the batch, from its slot where it is uploaded in place
            x, labels = self._feed(made.reshape(shape), plan.where, plan.shift, plan.labels,
                                   room=self._made.room() if self._in_place else None)
        elif self._feed is not None:
            x = self._feed(made.reshape(shape), plan.where, plan.shift)
        elif made.dtype == np.uint8:  # a worker's slot: copied out, as the slot is filled again
            x = made.view(np.float32).reshape((shape[0], 3) + shape[1:3]).copy()
        else:
            x = made
        if isinstance(self._made, WorkerPool) and not self._in_place:  # copied: the worker may fill it again
            self._made.release()
        elif self._in_place:  # the slot goes back at the next batch, once this copy out of it is done
            self._uploading = self._feed.last_upload
        self._images += len(plan.labels)
        self._seconds += made_in / self._makers + time.perf_counter() - start
        return self.loader.shaped(x, len(plan.labels)), labels

    def delivery_rate(self) -> float:
        rate = self._images / self._seconds if self._seconds > 0 else float("nan")
        self._images, self._seconds = 0, 0.0
        return rate

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self._made, "workers", [])]

    def close(self) -> None:
        self._made.close()


def _reported(path, batches):
    """`batches`, with an image that cannot be read from a damaged file refused in one line naming it.

    Only h5py's OSError for unreadable data: the thread also crops, and an error there is a bug.
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
