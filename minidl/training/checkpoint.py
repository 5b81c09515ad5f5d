"""Checkpoints: everything a run needs to continue, as plain HDF5 data (layout below).

Nothing in a checkpoint is ever executed. `load_checkpoint` trusts none of it:
every attribute, recipe entry and array is checked (type, range, shape, finite
values) before it is read or used, and a checkpoint that fails is refused in one
line naming the file and the problem (weights with NaN or infinity: a diverged run's).
"""
# Layout (readable by any HDF5 tool; nothing in it is ever executed):
#
#     attrs   format = "minidl-checkpoint", version = 1
#             model_file    path of the model file the run used: a name for
#                           messages, never opened or imported
#             model_source  its text, for the record (never run: the network is
#                           rebuilt from the model file the user gives, or the
#                           built-in AlexNet when model_sha256 is its hash)
#             model_sha256  sha256 of model_source (absent in older checkpoints:
#                           computed from model_source); a resumed run refuses a
#                           model file whose hash differs
#             config        the training configuration, JSON
#             class_names   JSON list; num_classes
#             devices       JSON list, the devices the run used
#             data          the dataset path ("" for the built-in data)
#             data_sha256   the dataset's fingerprint (Contents.fingerprint: its
#                           labels, split, classes and statistics; absent in older
#                           checkpoints); a resumed run refuses a dataset that
#                           differs, wherever it lies
#             seed, epoch, batch, step
#                           the next epoch to run, the next batch in it, and the
#                           number of optimizer steps taken; every random choice of
#                           the run derives from (seed, epoch, batch), so this is
#                           also the random generators' state
#     params/NAME      float arrays by dotted parameter name (tower0.conv1.W, ...)
#     momentum/NAME    the optimizer's velocities (absent before the first step)
#     mean_image       the training set's mean image (S, S, 3), which predict subtracts
#     schedule         attrs: the learning-rate schedule's state
#     loss_scale       attrs: scale, clean_steps, growth_interval: dynamic loss scaling's state
#                      (minidl.loss_scale; absent in a run without it)
#     epoch_totals     attrs: running loss sum, correct and seen count of the
#                      unfinished epoch (so a resumed epoch reports the same numbers)
#     history/KEY      one value per finished epoch: train_loss, train_top1,
#                      val_loss, val_top1, val_top5, lr; and one per logging
#                      interval: interval_step (the step it ended at) and
#                      interval_loss (its mean training loss)

import hashlib
import json
import math
import re
from typing import Callable, NamedTuple, Optional

import h5py
import numpy as np

from minidl.atomic import atomic_hdf5
from minidl.errors import CheckpointError, MinidlError
from minidl.hdf5 import (FINITE, FLOAT, IMAGE_SIZES, INTEGER, MAX_CLASSES, MAX_IMAGE_SIZE, MAX_SEED, STRING, FileCheck,
                         Rule, open_minidl_file, show, whole)

FORMAT = "minidl-checkpoint"
VERSION = 1
EPOCH_KEYS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")
INTERVAL_KEYS = ("interval_step", "interval_loss")
HISTORY_KEYS = EPOCH_KEYS + INTERVAL_KEYS

MAX_PARAMETERS = 10 ** 9  # values over all parameters: 16x AlexNet, and 4 GB of float32
MAX_HISTORY = 10 ** 7     # values per history key: one per epoch or logging interval
MAX_DEVICES = 64
WEIGHT_DTYPE = np.float32  # what a model's parameters and the optimizer's velocities are

POSITIVE = Rule(lambda v: FINITE.ok(v) and v > 0, "a positive number")
NOT_NAN = Rule(lambda v: FINITE.ok(v) or (isinstance(v, float) and v == math.inf), "a number")  # no best yet: inf


def _all_strings(values):
    return all(isinstance(v, str) for v in values)


def _device_names(names):
    return isinstance(names, (list, tuple)) and 1 <= len(names) <= MAX_DEVICES and _all_strings(names)


def _json(kind, ok=lambda value: True, expected=""):
    """A Rule for JSON text that parses to a `kind` (list, dict) and passes `ok`."""
    def parses(text):
        try:
            value = json.loads(text)
        except (TypeError, ValueError, RecursionError):  # deep nesting in crafted text: RecursionError
            return False
        return isinstance(value, kind) and ok(value)
    return Rule(parses, f"JSON {'list' if kind is list else 'object'}{expected}")


SHA256 = Rule(lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "a sha256 in hex")

# what restore, evaluate and a resumed run read: the attributes, the recipe in `config`, the schedule's state
ATTRS = dict(model_file=STRING, model_source=STRING, model_sha256=SHA256, data=STRING, data_sha256=SHA256,
             config=_json(dict),
             class_names=_json(list, _all_strings, " of strings"),
             devices=_json(list, _device_names, f" of 1 to {MAX_DEVICES} device names"),
             num_classes=whole(1, MAX_CLASSES), seed=whole(0, MAX_SEED), epoch=whole(), batch=whole(), step=whole(),
             val_data=STRING, val_data_sha256=SHA256)
CONFIG = dict(input_size=whole(1, MAX_IMAGE_SIZE), batch_size=whole(1), epochs=whole(1), lr=FINITE, momentum=FINITE,
              weight_decay=FINITE, lr_drop_factor=POSITIVE, lr_drops=whole(), plateau_patience=whole(), init=STRING,
              devices=Rule(_device_names, f"a list of 1 to {MAX_DEVICES} device names"))
RECIPE_KEYS = tuple(CONFIG) + ("input_scale",)  # what a model file's CONFIG gives (input_scale: 1 by default)
SCHEDULE = dict(lr=FINITE, factor=POSITIVE, patience=whole(), max_drops=whole(), best=NOT_NAN, bad_epochs=whole(),
                drops=whole(), finished=Rule(lambda v: isinstance(v, bool), "true or false"))
EPOCH_TOTALS = dict(loss_sum=FINITE, correct=whole(), seen=whole())
LOSS_SCALE = dict(scale=POSITIVE, clean_steps=whole(), growth_interval=whole(1))
# what older checkpoints lack; val_data*: a run that validated on its training file's split
OPTIONAL_ATTRS = ("class_names", "model_sha256", "data_sha256", "val_data", "val_data_sha256")


def source_sha256(source: str) -> str:
    """The hash a checkpoint records of its model file's text."""
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


def input_scale(config: dict, init: str) -> float:
    """The factor on the loader's pixels: a number, or a dict by initialisation scheme."""
    scale = config.get("input_scale", 1.0)
    return float(scale[init]) if isinstance(scale, dict) else float(scale)


def save_checkpoint(path: str, *, model, optimizer, schedule, meta: dict, history: dict, epoch_totals: dict,
                    mean_image: Optional[np.ndarray] = None, loss_scale: Optional[dict] = None) -> None:
    """Write atomically: a crash or Ctrl-C mid-write leaves the previous checkpoint intact."""
    with atomic_hdf5(path) as f:
        f.attrs["format"], f.attrs["version"] = FORMAT, VERSION
        for key, value in meta.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        params = f.create_group("params")
        momentum = f.create_group("momentum")
        for (name, p), v in zip(model.named_params(), optimizer.state()):
            params[name] = p.numpy()
            if v is not None:
                momentum[name] = v
        if mean_image is not None:
            f["mean_image"] = mean_image
        f.create_group("schedule").attrs.update(schedule.state())
        f.create_group("epoch_totals").attrs.update(epoch_totals)
        if loss_scale is not None:
            f.create_group("loss_scale").attrs.update(loss_scale)
        hist = f.create_group("history")
        for key in HISTORY_KEYS:
            hist[key] = np.asarray(history.get(key, []), dtype=np.float64)


class Checkpoint:
    """A loaded checkpoint: attributes plus arrays, all in host memory."""

    def __init__(self, path, attrs, params, momentum, schedule, epoch_totals, history, mean_image=None,
                 loss_scale=None):
        self.path, self.attrs, self.params, self.momentum = path, attrs, params, momentum
        self.mean_image = mean_image  # None in checkpoints older than predict/retrieve
        self.loss_scale = loss_scale  # LOSS_SCALE's fields, or None: a run without loss scaling
        self.schedule, self.epoch_totals, self.history = schedule, epoch_totals, history

    def __getitem__(self, key: str):
        return self.attrs[key]

    def config(self) -> dict:
        return json.loads(self.attrs["config"])

    @property
    def model_sha256(self) -> str:
        """The hash of the model file the run used (older checkpoints: of the source they kept)."""
        return self.attrs.get("model_sha256") or source_sha256(self.attrs["model_source"])

    def load_into(self, model) -> None:
        """Copy the parameters into a model built from the same model file."""
        names = [n for n, _ in model.named_params()]
        missing = [n for n in names if n not in self.params]
        extra = [n for n in self.params if n not in names]
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise CheckpointError(f"{self.path} does not fit this model: parameters {what}")
        for name, p in model.named_params():
            saved = self.params[name]
            if saved.shape != p.shape:
                raise CheckpointError(f"{self.path} does not fit this model: {name} has shape "
                                      f"{saved.shape} in the checkpoint and {p.shape} in the model")
            with p.device:
                p.data[...] = p.device.xp.asarray(saved, dtype=p.dtype)
            p.written()  # a kept 16-bit cast of the old weights is stale

    def velocities(self, model) -> list:
        """The optimizer's velocities in the order of model.params() (None where there is none yet)."""
        return [self.momentum.get(name) for name, _ in model.named_params()]


def load_checkpoint(path: str, wanted: Optional[Callable[[str, tuple], bool]] = None) -> "Checkpoint":
    """The checkpoint `path`, every part checked before it is read or trusted; else CheckpointError in one line.

    `wanted(name, shape)`, if given, chooses the parameters to read (and their velocities); the others
    are checked by type, shape and storage but not read, nor kept (visualize-filters reads conv1 alone).
    """
    check = FileCheck(path, "checkpoint", CheckpointError)
    with open_minidl_file(path, "checkpoint", FORMAT, VERSION, CheckpointError) as f, check.reading():
        # checkpoints older than predict and retrieve have neither class names nor mean image
        attrs = check.fields(f.attrs, ATTRS, optional=OPTIONAL_ATTRS)
        _check_config(check, json.loads(attrs["config"]))
        names = json.loads(attrs["class_names"]) if "class_names" in attrs else None
        if names is not None and len(names) != attrs["num_classes"]:
            raise check.corrupt(f"it has {len(names)} class names for {attrs['num_classes']} classes")
        params = _weights(check, f, "params", "parameter", None, wanted)
        momentum = _weights(check, f, "momentum", "the velocity of", params, wanted)
        mean_image = check.array(f, "mean_image", FLOAT, (IMAGE_SIZES, IMAGE_SIZES, 3), required=False)
        if mean_image is not None and mean_image.shape[0] != mean_image.shape[1]:
            raise check.corrupt(f"'mean_image' is {mean_image.shape[0]}x{mean_image.shape[1]}, not square")
        schedule = check.fields(check.member(f, "schedule", h5py.Group).attrs, SCHEDULE, "schedule attribute ")
        epoch_totals = check.fields(check.member(f, "epoch_totals", h5py.Group).attrs, EPOCH_TOTALS,
                                    "epoch_totals attribute ")
        history = _history(check, check.member(f, "history", h5py.Group))
        scaling = check.member(f, "loss_scale", h5py.Group, required=False)
        loss_scale = None if scaling is None else check.fields(scaling.attrs, LOSS_SCALE, "loss_scale attribute ")
    return Checkpoint(path, attrs, params.arrays, momentum.arrays, schedule, epoch_totals, history, mean_image,
                      loss_scale)


def _check_config(check, config):
    # a recipe's devices are checked, not required: a checkpoint's run keeps its devices as an attribute
    check.fields(config, CONFIG, "config entry ", optional=("devices",))
    try:  # a number, or one per initialisation scheme: then one for the run's
        scale_ok = math.isfinite(input_scale(config, config["init"]))
    except (KeyError, TypeError, ValueError, OverflowError):
        scale_ok = False
    if not scale_ok:
        raise check.corrupt(f"config entry 'input_scale' is {show(config.get('input_scale'))}, expected a finite "
                            f"number, or one per init including {config['init']!r}")


class _RecipeCheck(FileCheck):
    """The checks of a recipe that comes from a model file, refusing in one line that names the file."""

    def __init__(self, source):
        super().__init__(source, "recipe", MinidlError)

    def corrupt(self, problem):
        return self.error(f"{self.path}: {problem}")


def check_recipe(config: dict, source: str, optional: tuple = ()) -> None:
    """A recipe from `source` (a model file, or the checkpoint a run resumes) checked by the rules this reader
    applies to a checkpoint's, before it is used: no run writes a checkpoint that would be refused.
    MinidlError naming `source` and every missing entry (but those in `optional`), or the bad one."""
    missing = [key for key in CONFIG if key not in config and key not in optional]
    if missing:
        raise MinidlError(f"{source}: CONFIG lacks {', '.join(missing)} (a model file gives its whole training "
                          "recipe; see models/alexnet.py)")
    _check_config(_RecipeCheck(source), config)


class _Weights(NamedTuple):
    shapes: dict  # {name: shape} of every array in the group
    arrays: dict  # {name: float32 array} of those read


def _weights(check, f, group_name, what, params, wanted=None):
    """The arrays of the group `group_name` as float32, the type they will have, each finite in it (1e300
    is finite in float64, not in float32). Every shape is checked, and the bytes to read are charged
    to the file's budget, before any array is read; only those `wanted` are read. Velocities (`params`
    given) must each belong to a parameter and have its shape. (A network rebuilt for the checkpoint
    is bounded by these arrays as it is built: restore.Restored.model.)
    """
    group = check.member(f, group_name, h5py.Group)
    names = sorted(group)
    strays = [n for n in names if params is not None and n not in params.shapes]
    if strays:
        raise check.corrupt(f"it has a velocity for {strays[0]}, which is no parameter")
    datasets = {n: check.dataset(group, n, FLOAT, None if params is None else params.shapes[n]) for n in names}
    if sum(d.size for d in datasets.values()) > MAX_PARAMETERS:
        raise check.corrupt(f"its {group_name} claim more than {MAX_PARAMETERS:,} values")
    if params is None:
        chosen = {n: d for n, d in datasets.items() if wanted is None or wanted(n, d.shape)}
    else:  # the velocities of the parameters read
        chosen = {n: d for n, d in datasets.items() if n in params.arrays}
    # as stored and as float32, before any is read
    check.charge(sum(d.size * (d.dtype.itemsize + 4) for d in chosen.values()), f"the arrays in '{group_name}'")
    arrays = {}
    for name, d in chosen.items():
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused next
            arrays[name] = d[()].astype(WEIGHT_DTYPE, copy=False)
        if not np.isfinite(arrays[name]).all():
            raise check.error(f"{check.path} holds NaN or infinity in {what} {name}"
                              f"{' (as float32)' if d.dtype != WEIGHT_DTYPE else ''}: the run it came from diverged")
    return _Weights({n: d.shape for n, d in datasets.items()}, arrays)


def _history(check, group):
    """{key: list} for every history key; a key older checkpoints lack is an empty list."""
    arrays = {key: check.array(group, key, INTEGER + FLOAT, (range(MAX_HISTORY + 1),), required=False)
              for key in HISTORY_KEYS}
    for keys in (EPOCH_KEYS, INTERVAL_KEYS):  # values appended together: as many of each
        if len({len(arrays[k]) for k in keys if arrays[k] is not None}) > 1:
            raise check.corrupt(f"its history of {', '.join(keys)} differ in length")
    return {key: [] if values is None else values.tolist() for key, values in arrays.items()}
