"""The data pipeline: HDF5 datasets, prepare-data, augmentation, loading, the built-in dataset.

See dataset.py for the file layout. This package knows no model: it hands out NumPy arrays,
or the device's arrays when a loader's input is finished on a GPU (minidl.functions.to_input).
"""
from minidl.data.augment import (TEN_CROP_ORDER, Crops, centre_crops, crop_and_flip, fixed_crops,
                                 lighting_shift, pca_lighting, random_crops, subtract_mean,
                                 ten_crops, to_nchw)
from minidl.data.builtin import builtin_dataset
from minidl.data.dataset import DatasetInfo, dataset_info, open_dataset, stored_images, write_dataset
from minidl.data.loader import Loader
from minidl.data.prepare import PrepareResult, prepare_image_folder

__all__ = ["Crops", "DatasetInfo", "Loader", "PrepareResult", "TEN_CROP_ORDER", "builtin_dataset",
           "centre_crops", "crop_and_flip", "dataset_info", "fixed_crops", "lighting_shift",
           "open_dataset", "pca_lighting", "prepare_image_folder", "random_crops", "subtract_mean",
           "stored_images", "ten_crops", "to_nchw", "write_dataset"]
