"""The fc7 feature cache: a dataset split's features under a checkpoint, kept beside the checkpoint
so that `retrieve` computes them once.

The cache is read like any minidl file (minidl.hdf5): its mark, key, shape, storage
and values are checked before it is trusted, within a budget of exactly N x D float32
values. The labels and file positions are not stored: they come from the dataset.
"""
# Layout (HDF5, format version 1):
#
#     attrs      format = "minidl-features", version = 1
#                key    sha256 of what the features depend on: the checkpoint file's bytes,
#                       the model file's source, the dataset's Contents.fingerprint(), the split
#                features_sha256  sha256 of the features' bytes: an edited or damaged cache is not used
#     features   float32 (N, D)  the split's features (D: the model's fc7 width), in the order of
#                the split's file positions
import hashlib
import json

import numpy as np

from minidl.atomic import atomic_hdf5
from minidl.errors import MinidlError
from minidl.hdf5 import STRING, FileCheck, open_minidl_file

FORMAT = "minidl-features"
VERSION = 1


class CacheError(MinidlError):
    """A feature cache that cannot be used: the caller recomputes the features."""


def file_sha256(path, block=2 ** 20):
    """sha256 of a file's bytes, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(features):
    return hashlib.sha256(np.ascontiguousarray(features, dtype="<f4").tobytes()).hexdigest()


def cache_key(checkpoint_path, model_source, dataset_fingerprint, split):
    return hashlib.sha256(json.dumps([file_sha256(checkpoint_path), hashlib.sha256(model_source.encode()).hexdigest(),
                                      dataset_fingerprint, split]).encode()).hexdigest()


def read_cache(path, key, count, width):
    """The cached (count, width) float32 features at `path` if made under `key`; None if it is absent or
    was made from other inputs (stale); CacheError in one line if it is not a sound cache."""
    check = FileCheck(path, "feature cache", CacheError, budget=count * width * 4)
    with open_minidl_file(path, "feature cache", FORMAT, VERSION, CacheError) as f, check.reading():
        attrs = check.fields(f.attrs, {"key": STRING, "features_sha256": STRING})
        if attrs["key"] != key:
            return None
        features = check.array(f, "features", np.dtype(np.float32), (count, width))
    if _sha256(features) != attrs["features_sha256"]:
        raise check.corrupt("its features are not those it was written with")
    return features


def write_cache(path, key, features):
    """Write the cache atomically; OSError if it cannot be written (a read-only folder, a full disk)."""
    with atomic_hdf5(path) as f:
        f.attrs.update(format=FORMAT, version=VERSION, key=key, features_sha256=_sha256(features))
        f["features"] = features
