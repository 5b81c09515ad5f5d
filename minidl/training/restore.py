"""From a checkpoint back to a working model: the path train --resume, evaluate and the
other commands that read a checkpoint share.

A checkpoint names its model; it never chooses code. The network is rebuilt from
the model file the user gives, or from the built-in AlexNet when the checkpoint's
model_sha256 is that file's hash; the model_file attribute is only a name for
messages, never opened. The network goes on the devices the run used, fitted to
this machine (or the ones the user gives), and the checkpoint's weights are copied in.
"""
import functools
import json
import os
from typing import Optional, Sequence, Union

from minidl.data import Loader
from minidl.errors import CheckpointError, MinidlError
from minidl.hdf5 import show
from minidl.layers import Layer
from minidl.layers.init import parameter_budget
from minidl.training.checkpoint import Checkpoint, input_scale, load_checkpoint
from minidl.training.model_file import BUILTIN_MODEL, ModelFile, builtin_sha256, load_model_file


def model_file_for(checkpoint: Checkpoint, model_path: Optional[str] = None,
                   how: str = "with --model FILE") -> ModelFile:
    """The ModelFile to rebuild `checkpoint`'s network: the user's `model_path`, else the built-in AlexNet
    if the checkpoint was trained with it; else MinidlError saying to give the file (`how`)."""
    if model_path is not None:
        return load_model_file(model_path)
    if checkpoint.model_sha256 == builtin_sha256():
        return load_model_file(BUILTIN_MODEL)
    name = show(os.path.basename(checkpoint["model_file"]))  # the checkpoint's text: quoted and cut short
    raise MinidlError(f"{checkpoint.path} was trained with the model file {name} (sha256 "
                      f"{checkpoint.model_sha256[:16]}...), not the built-in AlexNet: give that file {how}")


class Restored:
    """A checkpoint, the model file that rebuilds it, its recipe and the model on its devices."""

    def __init__(self, checkpoint_path: str, model_path: Optional[str] = None,
                 devices: Union[None, str, Sequence[str]] = None, how: str = "with --model FILE"):
        self.checkpoint = load_checkpoint(checkpoint_path)
        self.config = self.checkpoint.config()
        self.model_file = model_file_for(self.checkpoint, model_path, how)
        # the run's devices, one per part of the network (a checkpoint naming one device for a model of two
        # parts gets the model file's devices instead)
        self.devices = self.model_file.devices_for(devices, json.loads(self.checkpoint["devices"]))

    @functools.cached_property
    def model(self) -> Layer:
        """Built on first use, so a bad dataset is reported before a large model is made; refused as soon as
        it outgrows the checkpoint's values, which it must hold exactly (a crafted num_classes would
        otherwise allocate gigabytes first)."""
        saved = sum(a.size for a in self.checkpoint.params.values())
        refusal = lambda: CheckpointError(f"{self.checkpoint.path} does not fit this model: the model has more "
                                          f"parameters than the checkpoint's {saved:,} values")
        with parameter_budget(saved, refusal):
            model = self.model_file.build(self.checkpoint["num_classes"], self.devices,
                                          self.config["init"], self.checkpoint["seed"])
        self.checkpoint.load_into(model)
        return model

    @property
    def input_scale(self) -> float:
        return input_scale(self.config, self.config["init"])

    def loader(self, data: str, split: str = "val", batch_size: int = 64, ten_crop: bool = False) -> Loader:
        """Evaluation batches of `data` as the run saw them: its crop size, input scale and training mean
        (the dataset's for checkpoints older than the mean's being saved), centre or 10 crops."""
        mean = "pixel" if self.checkpoint.mean_image is None else self.checkpoint.mean_image
        return Loader(data, split=split, batch_size=batch_size, crop=self.config["input_size"], augment=False,
                      ten_crop=ten_crop, scale=self.input_scale, mean=mean)
