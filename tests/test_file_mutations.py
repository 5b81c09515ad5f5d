"""Crafted and damaged files: a valid dataset and a valid checkpoint, mutated a few hundred times
(parts dropped, reshaped, retyped, made to claim 10^12 rows, attributes set to wrong values,
NaN written in, bytes cut off), are each either read and used or refused with minidl's own error:
never another exception, a hang or a huge allocation.

The loop runs in a child process (this file run as a script) under an address-space limit and
a timeout, so a reader that trusts a header's size fails the test instead of the machine.
"""
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from minidl.training.checkpoint import load_checkpoint
from minidl.data import Loader, dataset_info, write_dataset
from minidl.errors import CheckpointError, MinidlError
from minidl.training.evaluate import evaluate
from minidl.optim import MomentumSGD, PlateauSchedule
from minidl.training.restore import Restored
from minidl.training.train import train
from test_cli import TINY_MODEL, run

MUTATIONS = 400
SEED = 13
MEMORY_LIMIT = 3 * 2 ** 30  # bytes of address space: every honest use here needs a few hundred MB
TIMEOUT = 120               # seconds; the loop takes a few


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(dataset, tiny model file, checkpoint of one step): small, valid, and never changed by a test."""
    root = tmp_path_factory.mktemp("valid")
    data = root / "data.h5"
    # constant images compress to almost nothing, so each mutation copies a small file
    samples = [(np.full((256, 256, 3), 30 * i, np.uint8), i % 3) for i in range(8)]
    write_dataset(data, samples, ["red", "green", "blue"], count=8, val_fraction=0.25)
    model = root / "tiny.py"
    model.write_text(TINY_MODEL)
    train(model, data=data, devices=("cpu", "cpu"), out_dir=root / "run", max_steps=1)
    return data, model, root / "run" / "last.h5"


def test_mutated_files_are_used_or_refused_in_one_line(files, tmp_path):
    data, model, checkpoint = files
    # the child runs on the CPU alone, with one BLAS thread: each thread reserves address space
    env = {k: v for k, v in os.environ.items() if k != "MINIDL_EMULATE_GPUS"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        child = subprocess.run([sys.executable, __file__, str(data), str(checkpoint), str(model), str(tmp_path)],
                               capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""  # bytes, even with text=True
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise AssertionError(f"the mutation loop hung; its last lines:\n{out[-2000:]}") from None
    lines = child.stdout.strip().splitlines()
    assert child.returncode in (0, 1) and lines, f"the mutation loop crashed (exit {child.returncode}):\n" \
                                                 f"{child.stderr[-3000:]}"
    counts = json.loads(lines[-1])
    print(counts)
    assert counts["other"] == 0, "\n".join(line for line in lines if line.startswith("OTHER"))
    assert counts["tried"] == MUTATIONS and counts["accepted"] > 20 and counts["refused"] > 200, counts


def _changed(checkpoint, tmp_path, change):
    path = tmp_path / "changed.h5"
    shutil.copyfile(checkpoint, path)
    with h5py.File(path, "a") as f:
        change(f)
    return path


def _poison(name, value=np.nan):
    def change(f):
        data = f[name][()]
        data.reshape(-1)[-1] = value
        f[name][...] = data
    return change


def _set_attr(key, value, group="/"):
    def change(f):
        f[group].attrs[key] = value
    return change


def _config_entry(key, value):
    def change(f):
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), key: value})
    return change


def _claim(name, shape):
    def change(f):
        dtype = f[name].dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype, chunks=(1,) * len(shape))
    return change


def _as_float64(name, value):
    """`name` stored as float64 with one value beyond float32's range: finite here, infinite as loaded."""
    def change(f):
        data = f[name][()].astype(np.float64)
        data.reshape(-1)[0] = value
        del f[name]
        f[name] = data
    return change


def _unstored(name, shape):
    """A contiguous dataset whose header claims `shape` and whose bytes were never written."""
    def change(f):
        dtype = f[name].dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype)
    return change


@pytest.mark.parametrize("change, message", [
    (_poison("params/fc.W"), "holds NaN or infinity in parameter fc.W: the run it came from diverged"),
    (_as_float64("params/conv1.W", 1e300), "holds NaN or infinity in parameter conv1.W (as float32): the run it "
                                           "came from diverged"),
    (_as_float64("momentum/fc.W", -1e39), "holds NaN or infinity in the velocity of fc.W (as float32): the run it "
                                          "came from diverged"),
    (_unstored("history/lr", (10 ** 6,)), "is corrupt: 'history/lr' of shape (1000000,) declares 8,000,000 bytes "
                                          "and stores 0"),
    (_poison("momentum/conv1.b", -np.inf), "holds NaN or infinity in the velocity of conv1.b: the run it came from "
                                           "diverged"),
    (_claim("params/fc.b", (10 ** 12,)), "is corrupt: 'params/fc.b' of shape (1000000000000,) stores 0 of its "
                                         "1,000,000,000,000 chunks"),
    (_claim("momentum/fc.b", (10 ** 12,)), "is corrupt: 'momentum/fc.b' is float32 of shape (1000000000000,), "
                                           "expected floating of shape (3,)"),
    (_claim("history/lr", (10 ** 12,)), "is corrupt: 'history/lr' is float64 of shape (1000000000000,), expected "
                                        "integer/floating of shape (0..10000000,)"),
    (_claim("mean_image", (10 ** 6, 10 ** 6, 3)), "is corrupt: 'mean_image' is float32 of shape (1000000, 1000000, 3), "
                                                  "expected floating of shape (1..4096, 1..4096, 3)"),
    (_set_attr("epoch", -1), "is corrupt: attribute 'epoch' is -1, expected a whole number >= 0"),
    (_set_attr("step", 2.5), "is corrupt: attribute 'step' is 2.5, expected a whole number >= 0"),
    (_set_attr("num_classes", 10 ** 12), "is corrupt: attribute 'num_classes' is 1000000000000, expected a whole "
                                         "number in 1..1000000"),
    (_set_attr("num_classes", 4), "is corrupt: it has 3 class names for 4 classes"),
    (_set_attr("class_names", '["a", 2, "c"]'), "is corrupt: attribute 'class_names' is '[\"a\", 2, \"c\"]', "
                                                "expected JSON list of strings"),
    (_set_attr("devices", "[]"), "is corrupt: attribute 'devices' is '[]', expected JSON list of 1 to 64 device "
                                 "names"),
    (_set_attr("config", "not json"), "is corrupt: attribute 'config' is 'not json', expected JSON object"),
    (_set_attr("version", 2), "is a version 2 checkpoint; this minidl reads version 1"),
    (_config_entry("input_size", "19"), "is corrupt: config entry 'input_size' is '19', expected a whole number "
                                        "in 1..4096"),
    (_config_entry("input_scale", {"xavier": 1}), "is corrupt: config entry 'input_scale' is {'xavier': 1}, "
                                                  "expected a finite number, or one per init including 'he'"),
    (_set_attr("lr", float("nan"), "schedule"), "is corrupt: schedule attribute 'lr' is nan, expected a finite "
                                                "number"),
    (_set_attr("seen", "many", "epoch_totals"), "is corrupt: epoch_totals attribute 'seen' is 'many', expected a "
                                                "whole number >= 0"),
    (lambda f: f.move("params/fc.b", "params/fc.bias"), "is corrupt: it has a velocity for fc.b, which is no "
                                                         "parameter"),
])
def test_a_bad_checkpoint_is_refused_in_one_line(files, tmp_path, change, message):
    path = _changed(files[2], tmp_path, change)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} {re.escape(message)}$"):
        load_checkpoint(path)


def test_evaluate_refuses_a_diverged_checkpoint_in_one_line(files, tmp_path):
    data, model, checkpoint = files
    path = _changed(checkpoint, tmp_path, _poison("params/conv1.W", np.inf))
    code, output = run("evaluate", path, "--data", data, "--model", model, "--devices", "cpu")
    assert code == 1 and output.strip().splitlines() == [
        f"error: {path} holds NaN or infinity in parameter conv1.W: the run it came from diverged"], output


# --- the child: mutations and uses


def objects(f, kind):
    """Names of f's datasets (kind=h5py.Dataset) or groups, root excluded."""
    found = []
    f.visititems(lambda name, item: found.append(name) if isinstance(item, kind) else None)
    return found


def attributes(f):
    """(object name, attribute name) for every attribute in f."""
    return [(name, key) for name in ["/"] + objects(f, h5py.Dataset) + objects(f, h5py.Group)
            for key in f[name].attrs]


def replace(f, name, data=None, **create):
    del f[name]
    f.create_dataset(name, data=data, **create)


def drop(f, rng):
    name = rng.choice(objects(f, h5py.Dataset) + objects(f, h5py.Group))
    del f[name]
    return f"drop {name}"


def drop_attribute(f, rng):
    name, key = rng.choice(attributes(f))
    del f[name].attrs[key]
    return f"drop attribute {key} of {name}"


def reshape(f, rng):
    name = rng.choice(objects(f, h5py.Dataset))
    data = f[name][()]
    shapes = {"flattened": lambda a: a.reshape(-1), "an extra axis": lambda a: a[..., None],
              "one row fewer": lambda a: a[:-1], "one row more": lambda a: np.concatenate([a, a[:1]]),
              "transposed": lambda a: a.T, "a scalar": lambda a: a.reshape(-1)[0], "empty": lambda a: a[:0]}
    how = rng.choice(sorted(shapes))
    replace(f, name, shapes[how](data))
    return f"reshape {name} to {how}"


def retype(f, rng):
    name = rng.choice(objects(f, h5py.Dataset))
    data = f[name][()]
    small = data.size < 10 ** 4  # a Python string per value: not for the images
    to = rng.choice(["bytes", "float64", "float16", "int32", "bool", "compound", "empty"] + ["strings"] * small)
    if to == "strings":  # variable-length UTF-8 text, an object dtype in NumPy
        values = np.array([str(v) for v in data.reshape(-1)], dtype=object).reshape(data.shape)
        replace(f, name, values, dtype=h5py.string_dtype())
    elif to == "bytes":
        replace(f, name, data.astype("S8") if data.dtype.kind != "O" else data.astype("S"))
    elif to == "compound":
        replace(f, name, np.zeros(data.shape, dtype=[("a", "f4"), ("b", "i4")]))
    elif to == "empty":
        replace(f, name, h5py.Empty("f4"))
    else:
        replace(f, name, np.zeros(data.shape, to) if data.dtype.kind in "OS" else data.astype(to))
    return f"retype {name} to {to}"


def claim_huge(f, rng):
    """A dataset that claims 10^12 rows (or a huge axis) and stores nothing: only its header says so."""
    name = rng.choice(objects(f, h5py.Dataset))
    d = f[name]
    if name == "images" and rng.random() < 0.5:  # the resizable one, as a growing file would
        d.resize(10 ** 12, axis=0)
        return "resize images to 10^12 rows"
    shape = list(d.shape) or [1]
    axis = rng.randrange(len(shape))
    shape[axis] = rng.choice([10 ** 12, 10 ** 9, 2 ** 40])
    dtype = d.dtype
    replace(f, name, shape=tuple(shape), dtype=dtype, chunks=(1,) * len(shape))
    return f"claim shape {tuple(shape)} for {name}"


def poison(f, rng):
    names = [n for n in objects(f, h5py.Dataset) if f[n].dtype.kind == "f"]
    name = rng.choice(names)
    data = f[name][()]
    data.reshape(-1)[rng.randrange(data.size)] = rng.choice([np.nan, np.inf, -np.inf])
    replace(f, name, data)
    return f"NaN or infinity in {name}"


def out_of_range(f, rng):
    """Integer datasets given values outside their range (labels beyond the classes, a split flag of 2)."""
    names = [n for n in objects(f, h5py.Dataset) if f[n].dtype.kind in "iu" and f[n].size]
    name = rng.choice(names)
    data = f[name][()]
    value = rng.choice([-1, 2, 3, 255, 2 ** 40])
    data = data.astype(np.int64)
    data.reshape(-1)[rng.randrange(data.size)] = value
    replace(f, name, data)
    return f"set a value of {name} to {value}"


WRONG_VALUES = [10 ** 12, 2 ** 62, -1, 0, 1.5, float("nan"), float("inf"), "x", "", b"bytes", True,
                np.array([1, 2, 3]), np.array([[1.0]]), "[]", "{}", "[1, 2]", '["a"]', "null", "not json",
                "[" * 5000 + "]" * 5000, '{"a": 1}', "1e999", h5py.Empty("f4")]


def set_attribute(f, rng):
    name, key = rng.choice(attributes(f))
    value = rng.choice(WRONG_VALUES)
    f[name].attrs[key] = value
    return f"set attribute {key} of {name} to {str(value)[:30]!r}"


def set_json_entry(f, rng):
    """An entry inside the checkpoint's JSON attributes (the recipe, class names, devices)."""
    key = rng.choice(["config", "class_names", "devices"])
    value = json.loads(f.attrs[key])
    wrong = rng.choice([None, -1, 0, 10 ** 15, 0.5, "x", [], {}, "cuda:99", float("nan"), "he"])
    if isinstance(value, dict):
        entry = rng.choice(sorted(value))
        if rng.random() < 0.3:
            del value[entry]
        else:
            value[entry] = wrong
    elif rng.random() < 0.3:
        value = value[:-1] if rng.random() < 0.5 else value + value
    else:
        entry = rng.randrange(len(value))
        value[entry] = wrong
    f.attrs[key] = json.dumps(value)
    return f"{key} entry changed: {f.attrs[key][:60]}"


def swap_kind(f, rng):
    """A group where a dataset belongs, a dataset where a group belongs, or a link to elsewhere."""
    name = rng.choice(objects(f, h5py.Dataset) + objects(f, h5py.Group))
    was_group = isinstance(f[name], h5py.Group)
    del f[name]
    how = rng.choice(["swap", "soft link to nowhere", "external link"])
    if how == "swap" and was_group:
        f[name] = np.zeros(3, np.float32)
    elif how == "swap":
        f.create_group(name)
    elif how == "soft link to nowhere":
        f[name] = h5py.SoftLink("/nowhere")
    else:
        f[name] = h5py.ExternalLink("/dev/null", "/x")
    return f"{name}: {how}"


SHARED = [drop, drop_attribute, reshape, retype, claim_huge, poison, set_attribute, swap_kind]
DATASET_MUTATIONS, CHECKPOINT_MUTATIONS = SHARED + [out_of_range], SHARED + [set_json_entry]


def truncate(path, rng):
    size = os.path.getsize(path)
    keep = rng.randrange(size)
    with open(path, "r+b") as f:
        f.truncate(keep)
    return f"truncate to {keep} of {size} bytes"


def use_dataset(path):
    """What training and evaluation read from a dataset: its summary and a first batch of each split."""
    dataset_info(path)
    for split, augment, mean in (("train", True, "pixel"), ("val", False, "channel")):
        batches = Loader(path, split=split, batch_size=4, crop=19, augment=augment, mean=mean).epoch_batches(0)
        next(batches, None)
        batches.close()


def use_checkpoint(path, model, data):
    """What evaluate and a resumed run do with a checkpoint, short of training."""
    checkpoint = load_checkpoint(path)
    restored = Restored(path, model_path=model)
    net, config = restored.model, restored.config
    MomentumSGD(net.params(), config["lr"], config["momentum"], config["weight_decay"]).load_state(
        checkpoint.velocities(net))
    PlateauSchedule(config["lr"], config["lr_drop_factor"], config["plateau_patience"], config["lr_drops"]).load_state(
        checkpoint.schedule)
    evaluate(net, restored.loader(data, batch_size=4))


def mutation_loop(data, checkpoint, model, workdir):
    """Mutate and use MUTATIONS copies; prints one line per mutation and the counts, as JSON, last."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    rng = random.Random(SEED)
    counts = dict(tried=0, accepted=0, refused=0, other=0)
    for i in range(MUTATIONS):
        original, mutations, use = ((data, DATASET_MUTATIONS, use_dataset) if i % 2 == 0 else
                                    (checkpoint, CHECKPOINT_MUTATIONS, lambda p: use_checkpoint(p, model, data)))
        path = os.path.join(workdir, "mutant.h5")
        shutil.copyfile(original, path)
        if rng.random() < 0.1:
            what = truncate(path, rng)
        else:
            with h5py.File(path, "a") as f:
                what = rng.choice(mutations)(f, rng)
        what = f"{os.path.basename(original)}: {what}"
        counts["tried"] += 1
        try:
            use(path)
            counts["accepted"] += 1
            print(f"accepted  {what}", flush=True)
        except MinidlError as e:
            one_line = "\n" not in str(e)
            counts["refused" if one_line else "other"] += 1
            print(f"{'refused' if one_line else 'OTHER':10}{what}: {e!r}", flush=True)
        except Exception as e:  # MemoryError included: a reader that trusted a header
            counts["other"] += 1
            print(f"OTHER     {what}: {type(e).__name__}: {str(e).splitlines()[:1]}", flush=True)
    print(json.dumps(counts), flush=True)
    return counts


if __name__ == "__main__":
    sys.exit(1 if mutation_loop(*sys.argv[1:])["other"] else 0)
