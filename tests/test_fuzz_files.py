"""Crafted files against every command that reads them, each run in a child process under an
address-space limit (RLIMIT_AS) of MEMORY_LIMIT: gzip'd zeros that declare gigabytes, storage in
another file (a FIFO, which would hang a reader that opened it), counts no stored data backs, long
fixed and variable-length strings, float64 values beyond float32, for the dataset, the checkpoint
and the fc7 feature cache. Each run must end in one `error:` line naming the problem and exit 1,
or give the correct result; a traceback (MemoryError included) or a hang fails the test.

Every crafted file is under 10 MB, so the limit proves what the issue asks: no crafted file
under 10 MB makes a command grow past 500 MB before refusing it. `test_every_command_runs_under_
the_limit` proves the limit realistic: every command does its work within it on valid inputs.

RLIMIT_AS counts address space, not resident memory, and every thread's stack reserves some:
the children run with one BLAS thread (OPENBLAS_NUM_THREADS=1), on the CPU alone. A normal
run then needs about 250 MB of address space (Python, NumPy, h5py, matplotlib's fonts).
"""
import errno
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
from PIL import Image

from minidl.data import write_dataset
from minidl.training.train import train
from test_cli import TINY_MODEL, run

MEMORY_LIMIT = 400 * 2 ** 20
TIMEOUT = 60
CRAFTED_MAX = 10 * 2 ** 20


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """The valid inputs crafted files start from: dataset, model file, checkpoint of one step,
    a folder of images, and the fc7 cache of the checkpoint's training split."""
    root = tmp_path_factory.mktemp("valid")
    data = root / "data.h5"
    samples = [(np.full((256, 256, 3), 30 * i, np.uint8), i % 3) for i in range(8)]  # compresses to nothing
    write_dataset(data, samples, ["red", "green", "blue"], count=8, val_fraction=0.25)
    model = root / "tiny.py"
    model.write_text(TINY_MODEL)
    train(model, data=data, devices=("cpu",), out_dir=root / "run", max_steps=1)
    images = root / "images" / "red"
    images.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 100 * i, np.uint8)).save(images / f"{i}.png")
    checkpoint = root / "run" / "last.h5"
    result = limited("retrieve", checkpoint, "--data", data, "-k", "2", "-o", root / "n.png", "--json",
                     "--model", model, "--devices", "cpu")
    assert result.returncode == 0, result.stderr
    assert limited("visualize-filters", checkpoint, "-o", root / "f.png").returncode == 0
    return dict(filters=root / "f.png", root=root, data=data, model=model, checkpoint=checkpoint, images=root / "images",
                cache=root / "run" / "last.fc7-train.h5", neighbours=json_rows(result.stdout))


def json_rows(text):
    return json.loads(text[text.index("["):text.rindex("]") + 1])


def limited(*args, cwd=None):
    """`minidl ARGS` in a child process under MEMORY_LIMIT of address space; its CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k != "MINIDL_EMULATE_GPUS"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    try:
        return subprocess.run([sys.executable, "-m", "minidl_cli.main"] + [str(a) for a in args], env=env, cwd=cwd,
                              preexec_fn=limit, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"minidl {' '.join(map(str, args))} hung (a FIFO opened?)") from None


def assert_refused(result, message):
    """One `error:` line on stderr, naming the problem, exit 1, and no traceback anywhere."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert message in errors[0], errors[0]


# --- crafting


def bomb(group, name, shape, dtype="f4", chunk_bytes=2 ** 20):
    """gzip'd zeros declaring `shape`: every chunk stored (as the reader demands), each a few hundred bytes."""
    dtype = np.dtype(dtype)
    rows = max(1, chunk_bytes // (dtype.itemsize * math.prod(shape[1:])))
    chunks = (min(rows, shape[0]),) + tuple(shape[1:])
    d = group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression="gzip")
    packed = zlib.compress(bytes(math.prod(chunks) * dtype.itemsize), 9)
    for offset in itertools.product(*(range(0, n, c) for n, c in zip(shape, chunks))):
        d.id.write_direct_chunk(offset, packed)
    return d


def replace(f, name, **create):
    del f[name]
    return f.create_dataset(name, **create)


def crafted(original, path, change):
    shutil.copyfile(original, path)
    with h5py.File(path, "a", libver="latest") as f:  # latest: attributes beyond 64 KB allowed
        change(f, path)
    assert os.path.getsize(path) < CRAFTED_MAX
    return path


def fifo(path):
    """A FIFO beside `path`: a reader that opens it blocks forever, so a test of it cannot miss a read."""
    target = f"{path}.fifo"
    os.mkfifo(target)
    return target


def external(name, dtype, count):
    """Replace dataset `name` with one whose values are in a FIFO (or, second, /etc/passwd)."""
    def change(f, path):
        replace(f, name, shape=(count,), dtype=dtype, external=[(fifo(path), 0, count * np.dtype(dtype).itemsize)])
    return change


def external_link(name):
    def change(f, path):
        other = f"{path}.other.h5"
        with h5py.File(other, "w") as o:
            o[name.replace("/", "_")] = f[name][()]
        del f[name]
        f[name] = h5py.ExternalLink(other, name.replace("/", "_"))
    return change


def virtual(name):
    """`name` as a virtual dataset mapping another file's values."""
    def change(f, path):
        values = f[name][()]
        other = f"{path}.source.h5"
        with h5py.File(other, "w") as o:
            o["v"] = values
        layout = h5py.VirtualLayout(shape=values.shape, dtype=values.dtype)
        layout[...] = h5py.VirtualSource(other, "v", shape=values.shape)
        del f[name]
        f.create_virtual_dataset(name, layout)
    return change


def images_of(size, count, per_chunk):
    """A dataset claiming `count` images of size x size, all stored as gzip'd zeros, labels and all."""
    def change(f, path):
        for key in ("images", "labels", "is_val", "mean_image"):
            del f[key]
        bomb(f, "images", (count, size, size, 3), "u1", chunk_bytes=per_chunk * size * size * 3)
        bomb(f, "labels", (count,), "i1")
        bomb(f, "is_val", (count,), "u1")
        bomb(f, "mean_image", (size, size, 3), "f8")
        f.attrs["image_size"] = size
    return change


def set_attr(key, value):
    def change(f, path):
        f.attrs[key] = value
    return change


def poison_as_float64(name, value=1e300):
    def change(f, path):
        values = f[name][()].astype(np.float64)
        values.reshape(-1)[0] = value
        replace(f, name, data=values)
    return change


def class_names(**create):
    def change(f, path):
        replace(f, "class_names", **create)
    return change


def vlen_names(length):
    names = np.array(["x" * length, "green", "blue"], dtype=object)
    return class_names(data=names, dtype=h5py.string_dtype())


# --- the dataset: evaluate and train --data read it


DATASETS = {
    "images: 10^8 claimed, 8 stored": (lambda f, p: f["images"].resize(10 ** 8, axis=0),
                                       "'images' of shape (100000000, 256, 256, 3) stores 8 of its 100,000,000 "
                                       "chunks"),
    "images: 4 million stored as gzip'd zeros": (images_of(20, 4_000_000, 4000),
                                                 "4,000,000 images would take 128,000,000 bytes to read"),
    "images: chunks of 200 MB": (lambda f, p: replace(f, "images", shape=(8, 256, 256, 3), maxshape=(None, 256, 256, 3),
                                                      dtype="u1", chunks=(1024, 256, 256, 3)),
                                 "'images' has chunks of 201,326,592 bytes"),
    "mean_image: 4096x4096 of gzip'd zeros": (images_of(4096, 3, 1),
                                              "'mean_image' would take 402,653,184 bytes to read"),
    "class_names: 3 fixed strings of 1 MB, gzip'd": (class_names(data=np.array([b"x" * 2 ** 20] * 3), compression="gzip"),
                                                     "'class_names' holds strings of 1,048,576 bytes, beyond 1,000 "
                                                     "characters"),
    "class_names: a variable-length string of 3 MB": (vlen_names(3 * 2 ** 20),
                                                      "'class_names' holds a string of 3,145,728 bytes"),
    "class_names: more than images": (class_names(data=np.array([f"c{i}" for i in range(100)], dtype=object),
                                                  dtype=h5py.string_dtype()),
                                      "'class_names' is strings of shape (100,), expected string of shape (1..8,)"),
    "labels: stored in a FIFO": (external("labels", "i8", 8), "'labels' keeps its values in another file"),
    "labels: stored in /etc/passwd": (lambda f, p: replace(f, "labels", shape=(8,), dtype="i8",
                                                           external=[("/etc/passwd", 0, 64)]),
                                      "'labels' keeps its values in another file"),
    "mean_rgb: an external link": (external_link("mean_rgb"), "'mean_rgb' is a link, not stored in the file"),
    "is_val: a virtual dataset": (virtual("is_val"), "'is_val' keeps its values in another file"),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_a_crafted_dataset_is_refused_in_one_line_under_the_memory_limit(valid, tmp_path, name):
    change, message = DATASETS[name]
    data = crafted(valid["data"], tmp_path / "crafted.h5", change)
    command = [("evaluate", valid["checkpoint"], "--data", data, "--model", valid["model"], "--devices", "cpu"),
               ("train", valid["model"], "--data", data, "--out", tmp_path / "run", "--devices", "cpu")]
    for args in command[:1] if "FIFO" in name or "gzip" not in name else command:  # train: the heavy ones only
        assert_refused(limited(*args), message)


# --- the checkpoint: every command that reads one


def extra_param(group, shape):
    def change(f, path):
        bomb(f[group], "extra.W", shape)
    return change


# name: (change, message, whether visualize-filters, which reads conv1's weights alone, draws them right)
CHECKPOINTS = {
    "an extra parameter of 2.5 GB, gzip'd": (extra_param("params", (25_000, 25_000)),
                                            "the arrays in 'params' would take", True),
    "fc.W as a 1 GB matrix, gzip'd": (lambda f, p: (f.attrs.__setitem__("num_classes", 250_000),
                                                    f.attrs.__delitem__("class_names"), f.__delitem__("params/fc.W"),
                                                    f.__delitem__("momentum/fc.W"),
                                                    bomb(f["params"], "fc.W", (250_000, 1000))),
                                      "the arrays in 'params' would take", True),
    "num_classes 100,000, no such weights": (lambda f, p: (f.attrs.__setitem__("num_classes", 100_000),
                                                           f.attrs.__delitem__("class_names")),
                                             "the checkpoint's model has 100000", True),
    "num_classes 100,000 and a matrix to match": (lambda f, p: (f.attrs.__setitem__("num_classes", 100_000),
                                                                f.attrs.__delitem__("class_names"),
                                                                bomb(f["params"], "extra.W", (100_000, 1))),
                                                  "does not fit this model", True),
    "mean_image 4096x4096 float64, gzip'd": (lambda f, p: (f.__delitem__("mean_image"),
                                                           bomb(f, "mean_image", (4096, 4096, 3), "f8")),
                                             "'mean_image' would take 402,653,184 bytes to read", False),
    "history of 10^7 values, gzip'd": (lambda f, p: (f.__delitem__("history/lr"),
                                                     bomb(f["history"], "lr", (10 ** 7,), "f8")),
                                       "'history/lr' would take 80,000,000 bytes to read", False),
    "a weight of 1e300 in float64": (poison_as_float64("params/conv1.W"),
                                     "holds NaN or infinity in parameter conv1.W (as float32): the run it came "
                                     "from diverged", False),
    "a velocity of -1e300 in float64": (poison_as_float64("momentum/fc.b", -1e300),
                                        "holds NaN or infinity in the velocity of fc.b (as float32)", True),
    "params/fc.b stored in a FIFO": (external("params/fc.b", "f4", 3), "'params/fc.b' keeps its values in another "
                                                                       "file", False),
    "params/conv1.W a virtual dataset": (virtual("params/conv1.W"), "'params/conv1.W' keeps its values in another "
                                                                    "file", False),
    "class_names: 8 MB of JSON": (set_attr("class_names", json.dumps(["x" * 1000] * 8000)),
                                  "it has 8000 class names for 3 classes", False),
    "config: an array of strings": (set_attr("config", np.array(["{}"] * 3000, dtype=h5py.string_dtype())),
                                    "attribute 'config' is an array of shape (3000,), expected one value", False),
}
COMMANDS = {
    "evaluate": lambda c, v, t: ["evaluate", c, "--data", v["data"], "--model", v["model"], "--devices", "cpu"],
    "predict": lambda c, v, t: ["predict", c, v["images"], "-o", t / "p.png", "--model", v["model"], "--devices", "cpu"],
    "retrieve": lambda c, v, t: ["retrieve", c, "--data", v["data"], "-k", "2", "-o", t / "n.png", "--model", v["model"],
                                 "--devices", "cpu"],
    "visualize-filters": lambda c, v, t: ["visualize-filters", c, "-o", t / "f.png"],
    "train --resume": lambda c, v, t: ["train", v["model"], "--resume", c, "--data", v["data"], "--out", t / "run",
                                       "--devices", "cpu"],
}
# the issue's own case against every command; each other craft against one command, in turn
PAIRS = [(name, command) for i, name in enumerate(CHECKPOINTS)
         for command in (COMMANDS if i == 0 else [list(COMMANDS)[i % len(COMMANDS)]])]


@pytest.mark.parametrize("name, command", PAIRS)
def test_a_crafted_checkpoint_is_refused_in_one_line_under_the_memory_limit(valid, tmp_path, name, command):
    change, message, conv1_fine = CHECKPOINTS[name]
    checkpoint = crafted(valid["checkpoint"], tmp_path / "crafted.h5", change)
    result = limited(*COMMANDS[command](checkpoint, valid, tmp_path))
    if command == "visualize-filters" and conv1_fine:  # what is wrong is never read: the right picture
        assert result.returncode == 0 and "6 conv1 kernels" in result.stdout, result.stderr[-3000:]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), np.asarray(Image.open(valid["filters"])))
    else:
        assert_refused(result, message)


# --- the fc7 cache: retrieve recomputes what it cannot trust, and gives the right answer


def cache_bomb(f, path):
    del f["features"]
    bomb(f, "features", (6 * 10 ** 6, 54))


def cache_nan(f, path):
    values = f["features"][()]
    values[0, 0] = np.nan
    f["features"][...] = values
    f.attrs["features_sha256"] = __import__("hashlib").sha256(values.astype("<f4").tobytes()).hexdigest()


def cache_fifo(f, path):
    count, width = f["features"].shape
    replace(f, "features", shape=(count, width), dtype="f4", external=[(fifo(path), 0, count * width * 4)])


CACHES = {
    "gzip'd zeros of 1.3 GB": cache_bomb,
    "NaN, its hash updated": cache_nan,
    "features in a FIFO": cache_fifo,
    "features a virtual dataset": virtual("features"),
    "features edited": lambda f, p: f["features"].__setitem__((0, 0), f["features"][0, 0] + 1),
    "not HDF5": None,
}


@pytest.mark.parametrize("name", sorted(CACHES))
def test_a_crafted_feature_cache_is_recomputed_and_the_result_is_right(valid, tmp_path, name):
    checkpoint = tmp_path / "last.h5"
    shutil.copyfile(valid["checkpoint"], checkpoint)
    cache = tmp_path / "last.fc7-train.h5"
    if CACHES[name] is None:
        cache.write_bytes(b"not an HDF5 file" * 100)
    else:
        crafted(valid["cache"], cache, CACHES[name])
    result = limited("retrieve", checkpoint, "--data", valid["data"], "-k", "2", "-o", tmp_path / "n.png", "--json",
                     "--model", valid["model"], "--devices", "cpu")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert json_rows(result.stdout) == valid["neighbours"]
    assert "note: ignoring the feature cache" in result.stderr, result.stderr
    with h5py.File(cache) as f:  # replaced by a sound one
        assert f.attrs["format"] == "minidl-features" and np.array_equal(f["features"][()], h5py.File(valid["cache"])["features"][()])


@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_retrieve_works_where_its_cache_cannot_be_written(valid, tmp_path, monkeypatch, error):
    import minidl.training.predict
    checkpoint = tmp_path / "last.h5"
    shutil.copyfile(valid["checkpoint"], checkpoint)

    def cannot(path, key, features):
        raise OSError(error, os.strerror(error))
    monkeypatch.setattr(minidl.training.predict, "write_cache", cannot)
    code, output = run("retrieve", checkpoint, "--data", valid["data"], "-k", "2", "-o", tmp_path / "n.png", "--json",
                       "--model", valid["model"], "--devices", "cpu")
    assert code == 0 and json_rows(output) == valid["neighbours"], output
    assert f"could not cache the features in {tmp_path / 'last.fc7-train.h5'} ({os.strerror(error)})" in output
    assert not (tmp_path / "last.fc7-train.h5").exists()


def test_a_cache_path_that_cannot_be_replaced_is_not_fatal(valid, tmp_path):
    """A real failure to write: a non-empty folder where the cache would go (root can write anywhere else)."""
    checkpoint = tmp_path / "last.h5"
    shutil.copyfile(valid["checkpoint"], checkpoint)
    (tmp_path / "last.fc7-train.h5").mkdir()
    (tmp_path / "last.fc7-train.h5" / "keep").write_text("mine")
    result = limited("retrieve", checkpoint, "--data", valid["data"], "-k", "2", "-o", tmp_path / "n.png", "--json",
                     "--model", valid["model"], "--devices", "cpu")
    assert result.returncode == 0 and json_rows(result.stdout) == valid["neighbours"], result.stderr[-3000:]
    assert "could not cache the features" in result.stderr
    assert (tmp_path / "last.fc7-train.h5" / "keep").read_text() == "mine"


# --- the limit is realistic: every command does its work under it


def test_every_command_runs_under_the_limit(valid, tmp_path):
    v, t = valid, tmp_path
    commands = [
        ["train", v["model"], "--data", v["data"], "--out", t / "run", "--devices", "cpu", "--epochs", "1"],
        ["train", v["model"], "--resume", v["checkpoint"], "--data", v["data"], "--out", t / "resumed", "--devices",
         "cpu"],
        ["evaluate", v["checkpoint"], "--data", v["data"], "--model", v["model"], "--devices", "cpu"],
        ["predict", v["checkpoint"], v["images"], "-o", t / "p.png", "--model", v["model"], "--devices", "cpu"],
        ["retrieve", v["checkpoint"], "--data", v["data"], "-k", "2", "-o", t / "n.png", "--model", v["model"],
         "--devices", "cpu"],
        ["visualize-filters", v["checkpoint"], "-o", t / "f.png"],
        ["summary", v["model"], "--classes", "3", "--devices", "cpu"],
        ["bench", v["model"], "--batch-size", "4", "--steps", "2", "--devices", "cpu"],
        ["prepare-data", v["images"], t / "prepared.h5", "--workers", "1"],
    ]
    for args in commands:
        result = limited(*args)
        assert result.returncode == 0 and "Traceback" not in result.stderr, \
            f"minidl {args[0]} failed under {MEMORY_LIMIT >> 20} MB:\n{result.stderr[-3000:]}"
