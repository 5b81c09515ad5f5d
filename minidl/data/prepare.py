"""prepare-data: an ImageNet-style folder of images -> a minidl dataset file.

One subfolder per class (class names = the sorted subfolder names, labels their positions);
every file below a class folder that Pillow can read is an image of that class, converted to RGB,
its shorter side rescaled to 256 and its central 256x256 square kept (the paper's preprocessing).
Worker processes decode; the parent writes the file in order. Undecodable files and empty class
folders are skipped and listed in the result. Refused first: a class folder name that is not
UTF-8 or holds control characters, an existing OUT (unless overwrite), an OUT that is one of the
images, no class to validate on.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from minidl.atomic import remove_stale_temporaries
from minidl.data.dataset import IMAGE_SIZE, write_dataset
from minidl.errors import DataError


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


def _check_images(image_dir, out_path, files):
    if os.path.exists(out_path) and any(os.path.samefile(out_path, path) for path, _ in files):
        raise DataError(f"{out_path} is one of the images in {image_dir}: "
                        "give the dataset another name")
    if not any(count >= 2 for count in np.bincount([label for _, label in files])):
        raise DataError(f"no class in {image_dir} has two images: each class needs one to validate "
                        "on beside one to train on")


def prepare_image_folder(image_dir: str, out_path: str, *, workers: int | None = None,
                         val_fraction: float = 0.1, seed: int = 0,
                         progress: Callable[[int, int], None] | None = None,
                         overwrite: bool = False) -> PrepareResult:
    """Decode every image under `image_dir` into the dataset `out_path`; returns a PrepareResult.

    workers: decoding processes (default: all cores; 1 decodes in this process).
    progress(done, total) is called after each file, counting skipped ones too.
    overwrite: replace an existing `out_path` (never one of the images it reads).
    """
    _check_output(out_path, overwrite)
    class_names, files, empty_folders = list_image_folder(image_dir)
    _check_images(image_dir, out_path, files)
    remove_stale_temporaries(out_path)  # left by a prepare-data that was killed
    result = PrepareResult(path=out_path, class_counts=dict.fromkeys(class_names, 0),
                           empty_folders=empty_folders)
    workers = workers or os.cpu_count() or 1

    def decoded_samples(decoded):
        for done, ((path, label), (image, reason)) in enumerate(zip(files, decoded), start=1):
            if image is None:
                result.skipped.append((path, reason))
            else:
                result.class_counts[class_names[label]] += 1
                yield image, label
            if progress is not None:
                progress(done, len(files))

    def write(decoded):
        try:
            result.written = write_dataset(out_path, decoded_samples(decoded), class_names,
                                           count=len(files), val_fraction=val_fraction, seed=seed)
        except DataError:
            if len(result.skipped) == len(files):
                first, why = result.skipped[0]
                raise DataError(f"no readable images in {image_dir}: all {len(files)} files failed "
                                f"to decode (first: {first}: {why})") from None
            raise

    paths = [path for path, _ in files]
    if workers == 1:
        write(map(decode_file, paths))
    else:
        # on any way out, Ctrl-C included, the pool is terminated
        with _decoding_pool(workers) as pool:
            # chunks amortise the pipe traffic yet keep every worker busy to the end
            write(pool.imap(decode_file, paths,
                            chunksize=max(1, min(16, len(paths) // (8 * workers)))))
    return result


def _decoding_pool(workers):
    """A pool of `workers` processes that ignore Ctrl-C.

    Ctrl-C signals every process of the terminal's group: the parent alone should
    act on it (end the pool, report one line), not each worker with a traceback.
    Spawned (workers start clean, whatever threads or GPU state the parent has)
    while the parent ignores SIGINT, a worker inherits that and Python keeps it,
    even during the second of imports before a pool initializer could run; the
    initializer covers a worker the pool starts later, to replace one that died.
    Only the main thread may change a signal's handling; elsewhere the initializer alone.
    """
    start = functools.partial(multiprocessing.get_context("spawn").Pool, workers,
                              initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    if threading.current_thread() is not threading.main_thread():
        return start()
    # for the few milliseconds the workers take to start
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return start()
    finally:
        signal.signal(signal.SIGINT, previous)
