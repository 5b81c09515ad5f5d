"""Model files: Python files that define a network and its recipe (see models/alexnet.py).

A model file is loaded by path, not imported as a package, so `minidl train
any/dir/my_model.py` works. It must define `build_model(num_classes, devices,
init, seed)` and `CONFIG`, its whole training recipe; `BUILTIN_DATA` (overrides
for the built-in dataset) is optional.

A model file is code: minidl runs only one the user names on the command line, or
the built-in AlexNet (models/alexnet.py); a checkpoint never names a path to run.
"""
import importlib.util
import math
import os
from typing import Optional, Sequence, Union

from minidl.device import Device, available_memory, device, resolve_devices
from minidl.errors import MinidlError
from minidl.layers import Layer
from minidl.layers.init import parameter_budget
from minidl.training.checkpoint import RECIPE_KEYS, check_recipe, source_sha256


def _builtin_model():
    """models/alexnet.py where minidl is installed (the package minidl_models), never in the current folder."""
    spec = importlib.util.find_spec("minidl_models")
    folder = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else ""
    return os.path.join(folder, "alexnet.py")


BUILTIN_MODEL = _builtin_model()


def builtin_sha256():
    """The built-in AlexNet's source hash; None where this installation lacks models/alexnet.py."""
    try:
        with open(BUILTIN_MODEL) as f:
            return source_sha256(f.read())
    except OSError:
        return None


class ModelFile:
    """A loaded model file: its module, its recipe (CONFIG, checked), its source and the source's sha256."""

    def __init__(self, path: str, module):
        self.path = path
        self.module = module
        config = getattr(module, "CONFIG", None)
        if not isinstance(config, dict):
            raise MinidlError(f"{path} defines no CONFIG dict: a model file gives its whole training recipe "
                              f"({', '.join(RECIPE_KEYS)}; see models/alexnet.py)")
        self.config = dict(config)
        check_recipe(self.config, path)
        self.builtin_overrides = dict(getattr(module, "BUILTIN_DATA", {}))
        with open(path) as f:
            self.source = f.read()
        self.sha256 = source_sha256(self.source)

    def devices_for(self, requested: Union[None, str, Sequence[str]] = None,
                    preferred: Optional[Sequence[str]] = None) -> tuple:
        """The devices of the model's parts: `requested` (the user's), else `preferred` (a checkpoint's, used
        when it names one per part), else CONFIG["devices"], fitted to this machine (device.resolve_devices)."""
        parts = self.config["devices"]
        return resolve_devices(requested, preferred if preferred and len(preferred) == len(parts) else parts)

    def build(self, num_classes: int, devices: Union[None, str, Sequence[Union[str, Device]]] = None,
              init: Optional[str] = None, seed: int = 0) -> Layer:
        """The model file's network on `devices` (Devices, or what the user asked for: see devices_for).

        Refused in one line before its parameters outgrow the host's memory (each value
        is drawn in float64 before it is kept in float32: 8 bytes a value, to be safe).
        """
        if devices is None or isinstance(devices, str) or not all(isinstance(d, Device) for d in devices):
            devices = self.devices_for(devices)
        devices = [d.name for d in devices]
        free = available_memory(device("cpu"))
        refusal = lambda: MinidlError(f"{self.path}: not enough memory for the model's parameters with "
                                      f"{num_classes:,} classes ({free / 2**30:.1f} GiB available)")
        try:
            with parameter_budget(math.inf if free is None else free // 8, refusal):
                model = self.module.build_model(num_classes=num_classes, devices=tuple(devices),
                                                init=init or self.config["init"], seed=seed)
        except ValueError as e:  # a bad option the model file rejects, e.g. an unknown init
            raise MinidlError(f"{self.path}: {e}") from None
        except MemoryError:  # NumPy refuses an allocation larger than the machine can give
            raise MinidlError(f"{self.path}: not enough memory for the model's parameters with {num_classes:,} "
                              "classes") from None
        if not isinstance(model, Layer):
            raise MinidlError(f"{self.path}: build_model returned {type(model).__name__}, not a minidl Layer")
        missing = [name for name in ("input_device", "output_device") if getattr(model, name, None) is None]
        if missing:  # where the trainer puts the images and the labels
            raise MinidlError(f"{self.path}: the model build_model returned has no {' or '.join(missing)} "
                              "(the devices its input and its output are on)")
        return model


def load_model_file(path: str) -> ModelFile:
    """Run a model file and check that it defines a model and its recipe."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise MinidlError(f"no such model file: {path}")
    name = "minidl_model_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise MinidlError(f"{path} is not a Python model file (it must end in .py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise MinidlError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except OSError as e:
        raise MinidlError(f"cannot read model file {path}: {e.strerror}") from None
    except MinidlError:
        raise
    except Exception as e:
        raise MinidlError(f"model file {path} failed while loading: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "build_model", None)):
        raise MinidlError(f"{path} defines no model: a model file needs a build_model(num_classes, devices, "
                          "init, seed) function")
    return ModelFile(path, module)
