"""prepare-data: an ImageNet-style folder of images -> a minidl dataset file.

One subfolder per class (class names = the sorted subfolder names, labels their positions); every
file below a class folder that Pillow can read is an image of that class, converted to RGB, its
shorter side rescaled to 256 and its central 256x256 square kept (the paper's preprocessing). Or a
flat folder and a labels file (read_labels_file) with a training dataset's classes: a validation
file. Workers decode, encode and sum the statistics; the parent only writes, into a partial file
that an interrupted run resumes and a finished one is renamed from. Undecodable files and empty
class folders are skipped and listed in the result; bad input is refused before decoding.
"""
from __future__ import annotations

import collections
import functools
import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from PIL import Image

from minidl.atomic import hold_failed_file, remove_stale_temporaries, replace_durably, write_error
from minidl.cpu.memory import keep_freed_host_memory
from minidl.data.dataset import (DEFAULT_STORAGE, IMAGE_SIZE, ImageWriter, Moments, check_storage,
                                 check_val_fraction, check_writable, choose_validation, encode_image,
                                 finish_dataset, read_dataset, statistics)
from minidl.errors import DataError

Progress = Callable[[str, int, int], None]  # (pass, done, total): "decoding images", then "finishing"
CHUNK = 16  # images per task: amortises the pipes, and bounds what is in flight (2 tasks a worker)
CHECKPOINT_SECONDS = 30.0  # how much decoding an interrupted run may lose


@dataclass
class PrepareResult:
    path: str
    written: int = 0
    class_counts: dict = field(default_factory=dict)  # class name -> images written
    skipped: list = field(default_factory=list)  # (file path, reason) of each unreadable file
    empty_folders: list = field(default_factory=list)  # class folders without files: no class


def square_image(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PIL image -> uint8 (size, size, 3): shorter side rescaled to `size`, central square
    kept."""
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    # resize's box cuts the central square of the original and scales it in one resampling
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=box,
                                   reducing_gap=3.0))


def decode_file(path):
    """(image array, None) for a readable image file, (None, reason) otherwise. Runs in a worker;
    predict's read_image reads through it too, so both refuse the same files the same way.

    A decompression bomb (an image claiming more pixels than Pillow's MAX_IMAGE_PIXELS, of which
    Pillow refuses twice as many and only warns below that) is a file to skip, not memory to give.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return square_image(image), None
    except Exception as err:  # any decoder failure on one user file skips that file, not the job
        return None, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _check_class_name(name, image_dir):
    """A folder name is stored as a UTF-8 class name and drawn in pictures: refuse one that cannot
    be (named by repr, which shows undecodable bytes and control characters safely)."""
    try:
        name.encode("utf-8")  # a name that was not UTF-8 on disk holds surrogates here
    except UnicodeEncodeError:
        raise DataError(f"class folder {name!r} in {image_dir}: "
                        "its name is not UTF-8 text; rename it") from None
    if not name.isprintable():
        raise DataError(f"class folder {name!r} in {image_dir}: "
                        "its name holds control characters; rename it")


def list_image_folder(image_dir: str) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """(class names, [(file path, label)], [empty class folder names]) of an ImageNet-style folder.

    A class folder without files is no class: it is left out, and returned to be noted."""
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"no such image folder: {image_dir}")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: d.name)
    if not class_dirs:
        raise DataError(f"{image_dir} has no class subfolders (expected one folder of images per "
                        "class)")
    for class_dir in class_dirs:
        _check_class_name(class_dir.name, image_dir)
    listed = [(d.name, [str(path) for path in sorted(d.rglob("*"))
                        if path.is_file() and not path.name.startswith(".")])
              for d in class_dirs]
    classes = [(name, paths) for name, paths in listed if paths]
    if not classes:
        raise DataError(f"{image_dir} has class subfolders but no files in them")
    files = [(path, label) for label, (_, paths) in enumerate(classes) for path in paths]
    return [name for name, _ in classes], files, [name for name, paths in listed if not paths]


def _check_output(out_path, overwrite):
    """Refuse an OUT that is a folder, or an existing file unless `overwrite`, before any work."""
    if os.path.isdir(out_path):
        raise DataError(f"cannot write {out_path}: it is a folder; give the dataset's file name, "
                        f"e.g. {os.path.join(out_path, 'data.h5')}")
    if os.path.lexists(out_path) and not overwrite:
        raise DataError(f"{out_path} exists: give another name, or --overwrite to replace it")


def _check_images(image_dir, out_path, files, split=True):
    if os.path.exists(out_path) and any(os.path.samefile(out_path, path) for path, _ in files):
        raise DataError(f"{out_path} is one of the images in {image_dir}: "
                        "give the dataset another name")
    if split and not any(count >= 2 for count in np.bincount([label for _, label in files])):
        raise DataError(f"no class in {image_dir} has two images: each class needs one to validate "
                        "on beside one to train on")


def read_labels_file(labels_file: str, image_dir: str, class_names: tuple) -> list[tuple[str, int]]:
    """[(file path, label)] of a flat folder of images and its labels file.

    Each line is "FILENAME LABEL" (any order; files not named are left out), or just "LABEL", one line
    per file of the folder in sorted name order (ILSVRC2012_validation_ground_truth.txt's form). LABEL is
    a class name (an ImageNet wnid), else a 0-based index into `class_names`. Blank lines are ignored.
    """
    try:
        with open(labels_file, encoding="utf-8") as f:
            lines = [(number, line.split()) for number, line in enumerate(f, start=1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the labels file {labels_file}: {getattr(err, 'strerror', None) or err}") \
            from None
    if not lines:
        raise DataError(f"the labels file {labels_file} is empty")
    index = {name: i for i, name in enumerate(class_names)}

    def label(number, text):
        if text in index:
            return index[text]
        if text.isdigit() and int(text) < len(class_names):
            return int(text)
        raise DataError(f"{labels_file} line {number}: {text!r} is neither a class name nor a class index "
                        f"0..{len(class_names) - 1} of the training dataset")

    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"no such image folder: {image_dir}")
    if all(len(words) == 1 for _, words in lines):
        names = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(names) != len(lines):
            raise DataError(f"{labels_file} has {len(lines)} labels, one per line, but {image_dir} has "
                            f"{len(names)} files: give one label per file, or FILENAME LABEL lines")
        return [(str(root / name), label(number, words[0])) for name, (number, words) in zip(names, lines)]
    files = []
    for number, words in lines:
        if len(words) != 2:
            raise DataError(f"{labels_file} line {number}: expected FILENAME LABEL")
        if not (root / words[0]).is_file():
            raise DataError(f"{labels_file} line {number}: no file {words[0]} in {image_dir}")
        files.append((str(root / words[0]), label(number, words[1])))
    return sorted(files)


class WorkerDied(DataError):
    """A decoding process ended without its result (killed, out of memory): the run stops, resumable."""


@dataclass
class _Job:
    """What one prepare-data run decodes and writes, decided before any image is decoded."""
    files: list          # [(path, label)], in the order written
    class_names: list
    is_val: np.ndarray   # per file: drawn before decoding, so the workers sum only training images
    storage: str
    stats: dict | None   # a validation file's: its training dataset's statistics

    def digest(self) -> str:
        """What a partial file must have been begun with to be resumed."""
        digest = hashlib.sha256(json.dumps([self.files, self.class_names, self.storage]).encode())
        digest.update(self.is_val.tobytes())
        for value in (self.stats or {}).values():
            digest.update(np.ascontiguousarray(value).tobytes())
        return digest.hexdigest()


def prepare_image_folder(image_dir: str, out_path: str, *, workers: int | None = None,
                         val_fraction: float = 0.1, seed: int = 0, progress: Progress | None = None,
                         overwrite: bool = False, storage: str = DEFAULT_STORAGE,
                         labels_file: str | None = None, classes_from: str | None = None) -> PrepareResult:
    """Decode every image under `image_dir` into the dataset `out_path`; returns a PrepareResult.

    workers: decoding processes (default: all cores; 1 decodes in this process). storage: see dataset.py.
    labels_file with classes_from (a training dataset): `image_dir` is a flat folder, and the file holds
    only validation images, with that dataset's classes and statistics (val_fraction, seed unused).
    progress(pass, done, total) after each file, skipped ones too, and for each further pass.
    overwrite: replace an existing `out_path` (never one of the images it reads). A run that stops
    leaves what it wrote in a partial file beside `out_path`: the same call continues from it.
    """
    _check_output(out_path, overwrite)
    check_storage(storage)
    check_val_fraction(val_fraction)
    if (labels_file is None) != (classes_from is None):
        raise DataError("a labels file needs the training dataset whose classes it names, and back: give both")
    result = PrepareResult(path=out_path)
    if labels_file is None:
        class_names, files, result.empty_folders = list_image_folder(image_dir)
        _check_images(image_dir, out_path, files)
        is_val = choose_validation(np.array([label for _, label in files], np.int64), len(class_names),
                                   val_fraction, seed)
        job = _Job(files, class_names, is_val, storage, None)
    else:
        training = read_dataset(classes_from)
        class_names = list(training.class_names)
        files = read_labels_file(labels_file, image_dir, training.class_names)
        _check_images(image_dir, out_path, files, split=False)
        stats = {name: getattr(training, name).astype(np.float32)
                 for name in ("mean_image", "mean_rgb", "pca_eigvals", "pca_eigvecs")}
        job = _Job(files, class_names, np.ones(len(files), bool), storage, stats)
    result.class_counts = dict.fromkeys(class_names, 0)
    check_writable(out_path)
    remove_stale_temporaries(out_path)  # left by a prepare-data that was killed before resuming existed
    _run(job, image_dir, out_path, workers or os.cpu_count() or 1, progress or (lambda *args: None), result)
    return result


def partial_path(out_path: str) -> str:
    """Where prepare-data keeps the file it is writing: beside OUT, found again by the next run."""
    folder, name = os.path.split(os.path.abspath(out_path))
    return os.path.join(folder, f".{name}.partial")


class _Partial:
    """The partial file: the images written so far and, at each checkpoint, where the run stands."""

    def __init__(self, job: _Job, out_path: str):
        self.job, self.path, self.f = job, partial_path(out_path), None

    def open(self) -> None:
        """Open the partial file to resume, or begin one; self.f is set as soon as a file is open."""
        self._open_or_begin()
        begun = "jpeg" in self.f or "images" in self.f
        self.writer = ImageWriter.reopen(self.f, self.job.storage) if begun else \
            ImageWriter(self.f, self.job.storage, len(self.job.files))

    def _open_or_begin(self):
        """The partial file of this same job, to resume; else a new one (another job's is replaced)."""
        self.done, self.written, self.skipped, self.moments = 0, 0, [], Moments(IMAGE_SIZE)
        try:
            f = h5py.File(self.path, "r+") if os.path.exists(self.path) else None
        except OSError as err:
            if "lock" in str(err):
                raise DataError(f"another prepare-data is writing {self.path}: wait for it to end") from None
            f = None  # damaged by the kill that stopped it: begun again
        if f is not None and f.get("prepare") is not None and f["prepare"].attrs.get("job") == self.job.digest():
            state = f["prepare"]
            self.done, self.written = int(state.attrs["done"]), int(state.attrs["written"])
            self.skipped = [tuple(item) for item in json.loads(state["skipped"][()])]
            self.moments.count = int(state.attrs["train_count"])
            self.moments.image_sum, self.moments.rgb_products = state["image_sum"][()], state["rgb_products"][()]
            self.f = f
            return
        if f is not None:
            f.close()
        self.f = f = h5py.File(self.path, "w")
        state = f.create_group("prepare")
        state.attrs["job"] = self.job.digest()
        state.create_dataset("image_sum", data=self.moments.image_sum)
        state.create_dataset("rgb_products", data=self.moments.rgb_products)
        state.create_dataset("skipped", data="[]", dtype=h5py.string_dtype("utf-8"))

    def checkpoint(self) -> None:
        """Record where the run stands, and flush: what a resumed run continues from."""
        state = self.f["prepare"]
        state["image_sum"][...], state["rgb_products"][...] = self.moments.image_sum, self.moments.rgb_products
        state["skipped"][()] = json.dumps(self.skipped)
        state.attrs.update(done=self.done, written=self.written, train_count=self.moments.count)
        self.f.flush()

    def add(self, start: int, decoded: list, moments: Moments) -> None:
        """Write one task's images (the files from `start` on) and count them in, all or nothing."""
        written, skipped = self.written, []
        for offset, (payload, reason) in enumerate(decoded):
            if payload is None:
                skipped.append((start + offset, reason))
            else:
                self.writer.write(written, payload)
                written += 1
        moments.merge(self.moments)
        # one statement: a Ctrl-C lands before or after it, and a checkpoint then records a whole task or none
        self.written, self.done, self.skipped, self.moments = written, start + len(decoded), self.skipped + skipped, \
            moments


def _run(job, image_dir, out_path, workers, progress, result):
    """Decode what the partial file lacks, then finish it and rename it onto `out_path`."""
    # decoding an image allocates and frees buffers of 0.2-2 MB, which glibc would give back to the kernel and
    # fault in again, zeroed, for the next one (a third of the CPU); this process decodes too with one worker
    keep_freed_host_memory()
    partial = _Partial(job, out_path)
    try:
        partial.open()
        last_checkpoint = time.monotonic()
        begin = functools.partial(progress, "decoding images", partial.done, len(job.files))
        for start, decoded, moments in _decoded_tasks(job, partial.done, workers, begin):
            partial.add(start, decoded, moments)
            progress("decoding images", partial.done, len(job.files))
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                partial.checkpoint()
                last_checkpoint = time.monotonic()
        _finish(partial, image_dir, progress, result)
        replace_durably(partial.path, out_path)
    except OSError as err:  # a full disk: what was written is in doubt, and dropped
        _drop(partial, failed=bool(partial.f))
        raise write_error(out_path, err) from None
    except DataError as err:  # the input refused: nothing to resume; a worker that died: go on later
        _keep(partial) if isinstance(err, WorkerDied) else _drop(partial)
        raise
    except BaseException:  # Ctrl-C: what was written is kept
        _keep(partial)
        raise
    progress("finishing", 1, 1)


def _keep(partial):
    """Record where the run stands in the partial file and close it, for the next run to go on from."""
    if partial.f:
        with contextlib.suppress(Exception):
            partial.checkpoint()
        partial.f.close()


def _drop(partial, failed=False):
    """Remove the partial file (if this run opened it); one whose write failed is never freed (h5py would
    crash: minidl.atomic)."""
    if partial.f is None:
        return
    if failed:
        hold_failed_file(partial.f)
    elif partial.f:
        partial.f.close()
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial.path)


def _finish(partial, image_dir, progress, result):
    """Labels, split and statistics of the images written; the partial file made a dataset."""
    job = partial.job
    skipped = {index for index, _ in partial.skipped}
    kept = np.array([i for i in range(len(job.files)) if i not in skipped], np.int64)
    result.skipped = [(job.files[i][0], reason) for i, reason in partial.skipped]
    if len(kept) == 0:
        first, why = result.skipped[0]
        raise DataError(f"no readable images in {image_dir}: all {len(job.files)} files failed "
                        f"to decode (first: {first}: {why})")
    progress("finishing", 0, 1)
    labels = np.array([job.files[i][1] for i in kept], np.int64)
    is_val = job.is_val[kept]
    if job.stats is None:
        is_val = _keep_every_class_validated(partial, labels, is_val, len(job.class_names))
    for label in labels:
        result.class_counts[job.class_names[label]] += 1
    result.written = len(kept)
    del partial.f["prepare"]
    partial.writer.shrink(len(kept))
    finish_dataset(partial.f, labels, is_val, job.class_names, job.stats or statistics(partial.moments))
    partial.f.close()


def _keep_every_class_validated(partial, labels, is_val, num_classes):
    """The split drawn before decoding, mended where skipped files left a class of two images or more
    without a validation or a training image (its first image moves; the statistics follow)."""
    is_val = is_val.copy()
    images = partial.writer.written()
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < 2 or 0 < is_val[members].sum() < len(members):
            continue
        moved = members[0]
        is_val[moved] = not is_val[moved]
        partial.moments.add([images[int(moved)]], sign=-1 if is_val[moved] else 1)
    return is_val


def _decode_task(start, paths, is_val, storage):
    """One task, in a worker: (start, [(stored bytes or None, None or why)], Moments of its training
    images)."""
    moments, decoded = Moments(IMAGE_SIZE), []
    for path, val in zip(paths, is_val):
        image, reason = decode_file(path)
        if image is None:
            decoded.append((None, reason))
            continue
        payload, pixels = encode_image(image, storage)
        if not val:
            moments.add([pixels])
        decoded.append((payload, None))
    return start, decoded, moments


def _decode_task_to_file(start, paths, is_val, storage, folder):
    """_decode_task in a worker, its result left in a file of `folder`; returns the file's path. Only that
    short line goes through the pool's pipe: a worker killed while it sent megabytes would leave the
    parent waiting forever for the rest (concurrent.futures cannot tell)."""
    path = os.path.join(folder, f"{start}.pickle")
    with open(path + ".part", "wb") as f:
        pickle.dump(_decode_task(start, paths, is_val, storage), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".part", path)
    return path


def _task_result(future):
    """The result a worker left in its file (see _decode_task_to_file), the file removed."""
    path = future.result()
    with open(path, "rb") as f:
        result = pickle.load(f)  # written by this run's own workers, a moment ago
    os.remove(path)
    return result


def _decoded_tasks(job, start, workers, begin):
    """The decoded tasks from file `start` on, in order; at most 2 tasks a worker in flight. begin() is
    called once the workers are started."""
    paths = [path for path, _ in job.files]
    chunk = max(1, min(CHUNK, (len(paths) - start) // (4 * workers)))
    tasks = ((i, paths[i:i + chunk], job.is_val[i:i + chunk], job.storage)
             for i in range(start, len(paths), chunk))
    if workers == 1:
        begin()
        yield from (_decode_task(*task) for task in tasks)
        return
    # on any way out, Ctrl-C included, the workers end and their files are removed
    with tempfile.TemporaryDirectory(prefix="minidl-prepare-") as folder, _decoding_pool(workers) as pool:
        begin()
        pending = collections.deque()
        try:
            for task in tasks:
                pending.append(pool.submit(_decode_task_to_file, *task, folder))
                if len(pending) >= 2 * workers:
                    yield _task_result(pending.popleft())
            while pending:
                yield _task_result(pending.popleft())
        except BrokenProcessPool:
            raise WorkerDied("a decoding worker process died (killed, or out of memory): run the same "
                            "command again to continue") from None
        finally:
            for future in pending:
                future.cancel()


def _start_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_host_memory()  # as the parent (_run)


def _decoding_pool(workers):
    """A pool of `workers` processes that ignore Ctrl-C.

    Ctrl-C signals every process of the terminal's group: the parent alone should
    act on it (end the pool, report one line), not each worker with a traceback.
    Spawned (workers start clean, whatever threads or GPU state the parent has)
    while the parent ignores SIGINT, a worker inherits that and Python keeps it,
    even during the second of imports before a pool initializer could run; the
    initializer covers a worker started later. Only the main thread may change a
    signal's handling; elsewhere the initializer alone.
    """
    start = functools.partial(concurrent.futures.ProcessPoolExecutor, workers,
                              mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)
    if threading.current_thread() is not threading.main_thread():
        return start()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # for the few milliseconds the workers take to start
    try:
        pool = start()
        for _ in range(workers):  # the executor starts a process for each task submitted while none is idle
            pool.submit(time.sleep, 0)
        return pool
    finally:
        signal.signal(signal.SIGINT, previous)
