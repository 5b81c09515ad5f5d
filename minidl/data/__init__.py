"""The data pipeline: HDF5 datasets, prepare-data, augmentation, loading, the built-in dataset.

See dataset.py for the file layout. This package knows no model: it hands out NumPy arrays,
or the device's arrays when a loader's input is finished on a GPU (minidl.functions.to_input).
Its names load on first use, so that prepare-data's decoding workers import only what they run
(not the loader, which brings the framework's kernels and ml_dtypes).
"""
import importlib

_MODULES = {"augment": ["TEN_CROP_ORDER", "Crops", "centre_crops", "crop_and_flip", "fixed_crops", "lighting_shift",
                        "pca_lighting", "random_crops", "subtract_mean", "ten_crops", "to_nchw"],
            "builtin": ["builtin_dataset"],
            "dataset": ["DatasetInfo", "dataset_info", "open_dataset", "stored_images", "write_dataset"],
            "loader": ["Loader"],
            "prepare": ["PrepareResult", "prepare_image_folder"]}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'minidl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"minidl.data.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
