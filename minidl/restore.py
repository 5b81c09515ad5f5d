"""From a checkpoint back to a working model: the path train --resume, evaluate and the
other commands that read a checkpoint share.

The network is rebuilt from the model file the checkpoint names (or one the user
gives), on the devices the run used fitted to this machine (or the ones the user
gives), and the checkpoint's weights are copied in.
"""
import functools
import json

from minidl.checkpoint import load_checkpoint
from minidl.data import Loader
from minidl.device import resolve_devices
from minidl.model_file import input_scale, load_model_file


class Restored:
    """A checkpoint, the model file it was trained with, its recipe and the model on its devices."""

    def __init__(self, checkpoint_path, model_path=None, devices=None):
        self.checkpoint = load_checkpoint(checkpoint_path)
        self.config = self.checkpoint.config()
        self.model_file = load_model_file(model_path or self.checkpoint["model_file"])
        # the run's devices, one per part of the network; the model file says how many parts there are
        # (a checkpoint naming one device for AlexNet's two towers gets the model file's devices instead)
        saved, parts = json.loads(self.checkpoint["devices"]), self.model_file.config["devices"]
        self.devices = resolve_devices(devices, saved if len(saved) == len(parts) else parts)

    @functools.cached_property
    def model(self):
        """Built on first use, so a bad dataset is reported before a large model is made."""
        model = self.model_file.build(self.checkpoint["num_classes"], [d.name for d in self.devices],
                                      self.config["init"], self.checkpoint["seed"])
        self.checkpoint.load_into(model)
        return model

    @property
    def input_scale(self):
        return input_scale(self.config, self.config["init"])

    def loader(self, data, split="val", batch_size=64, ten_crop=False):
        """Evaluation batches of `data` as the run saw them: its crop size, input scale and training mean
        (the dataset's for checkpoints older than the mean's being saved), centre or 10 crops."""
        mean = "pixel" if self.checkpoint.mean_image is None else self.checkpoint.mean_image
        return Loader(data, split=split, batch_size=batch_size, crop=self.config["input_size"], augment=False,
                      ten_crop=ten_crop, scale=self.input_scale, mean=mean)
