"""Checkpoints: everything a run needs to continue, as plain HDF5 data.

Layout (readable by any HDF5 tool; nothing in it is ever executed):

    attrs   format = "minidl-checkpoint", version = 1
            model_file    path of the model file the run used
            model_source  its text, for the record (never run: the network is
                          rebuilt from a model file on disk)
            config        the training configuration, JSON
            class_names   JSON list; num_classes
            devices       JSON list, the devices the run used
            data          the dataset path ("" for the built-in data)
            seed, epoch, batch, step
                          the next epoch to run, the next batch in it, and the
                          number of optimizer steps taken; every random choice of
                          the run derives from (seed, epoch, batch), so this is
                          also the random generators' state
    params/NAME      float arrays by dotted parameter name (tower0.conv1.W, ...)
    momentum/NAME    the optimizer's velocities (absent before the first step)
    mean_image       the training set's mean image (S, S, 3), which predict subtracts
    schedule         attrs: the learning-rate schedule's state
    epoch_totals     attrs: running loss sum, correct and seen count of the
                     unfinished epoch (so a resumed epoch reports the same numbers)
    history/KEY      one value per finished epoch: train_loss, train_top1,
                     val_loss, val_top1, val_top5, lr; and one per logging
                     interval: interval_step (the step it ended at) and
                     interval_loss (its mean training loss)
"""
import json
import os

import h5py
import numpy as np

from minidl.atomic import atomic_path
from minidl.hdf5 import open_minidl_file
from minidl.errors import CheckpointError

FORMAT = "minidl-checkpoint"
VERSION = 1
EPOCH_KEYS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")
INTERVAL_KEYS = ("interval_step", "interval_loss")
HISTORY_KEYS = EPOCH_KEYS + INTERVAL_KEYS


def save_checkpoint(path, *, model, optimizer, schedule, meta, history, epoch_totals, mean_image=None):
    """Write atomically: a crash or Ctrl-C mid-write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
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
        hist = f.create_group("history")
        for key in HISTORY_KEYS:
            hist[key] = np.asarray(history.get(key, []), dtype=np.float64)


class Checkpoint:
    """A loaded checkpoint: attributes plus arrays, all in host memory."""

    def __init__(self, path, attrs, params, momentum, schedule, epoch_totals, history, mean_image=None):
        self.path, self.attrs, self.params, self.momentum = path, attrs, params, momentum
        self.mean_image = mean_image  # None in checkpoints older than predict/retrieve
        self.schedule, self.epoch_totals, self.history = schedule, epoch_totals, history

    def __getitem__(self, key):
        return self.attrs[key]

    def config(self):
        return json.loads(self.attrs["config"])

    def load_into(self, model):
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

    def velocities(self, model):
        """The optimizer's velocities in the order of model.params() (None where there is none yet)."""
        return [self.momentum.get(name) for name, _ in model.named_params()]


def load_checkpoint(path):
    try:
        with open_minidl_file(path, "checkpoint", FORMAT, CheckpointError) as f:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            params = {n: d[()] for n, d in f["params"].items()}
            momentum = {n: d[()] for n, d in f["momentum"].items()}
            schedule = dict(f["schedule"].attrs)
            epoch_totals = {k: v.item() for k, v in f["epoch_totals"].attrs.items()}
            # checkpoints from before the interval keys have none: an empty list
            mean_image = f["mean_image"][()] if "mean_image" in f else None
            history = {k: f["history"][k][()].tolist() if k in f["history"] else [] for k in HISTORY_KEYS}
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None
    return Checkpoint(path, attrs, params, momentum, schedule, epoch_totals, history, mean_image)

