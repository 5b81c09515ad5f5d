"""What the network sees: its top-k classes for images, and the training images nearest to a
query in its last hidden layer (fc7): the paper's Figure 4.

Images are prepared as evaluation prepares them (shorter side 256, central square,
training mean subtracted, centre or ten crops, the run's input scale). An image's
features are the input of the model's last Linear layer in eval mode. Nearest
neighbours are found in blocks of matrix products, never an N x N matrix.
"""
import contextlib
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from minidl.core import Tensor, no_grad
from minidl.data import centre_crops, crop_and_flip, open_dataset, stored_images, subtract_mean, ten_crops, to_nchw
from minidl.data.prepare import decode_file
from minidl.errors import DataError, MinidlError
from minidl.training.feature_cache import CacheError, cache_key, read_cache, write_cache
from minidl.layers import Layer, Linear

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# --- images in


def find_images(paths: Sequence[str]) -> List[str]:
    """Image files from files and folders (a folder: every image file below it, sorted)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
            if not inside:
                raise DataError(f"{path} has no images (looked for {', '.join(IMAGE_SUFFIXES)} files)")
            found += inside
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise DataError(f"no such image or folder: {path}")
    return found


def read_image(path: str) -> np.ndarray:
    """uint8 (256, 256, 3): the paper's preprocessing of one image file, as prepare-data reads it
    (decode_file: a decompression bomb is refused too)."""
    image, reason = decode_file(path)
    if image is None:
        raise DataError(f"{path} is not an image Pillow can read ({reason})")
    return image


def true_label(path: str, class_names: Sequence[str]) -> Optional[int]:
    """The class a file's folder names, as in an ImageNet-style folder; None if it names none."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return class_names.index(folder) if folder in class_names else None


class TestInput:
    """uint8 (N, 256, 256, 3) images -> the network's input: centre crop or the paper's ten."""

    def __init__(self, mean: np.ndarray, crop: int, scale: float):
        self.mean, self.crop, self.scale = mean, crop, np.float32(scale)

    def __call__(self, images: np.ndarray, ten_crop: bool = False) -> np.ndarray:
        views = ten_crops(len(images), images.shape[1], self.crop) if ten_crop else \
            [centre_crops(len(images), images.shape[1], self.crop)]
        x = np.stack([to_nchw(subtract_mean(crop_and_flip(images, self.crop, where), self.mean, self.crop, where))
                      for where in views], axis=1) * self.scale
        return x if ten_crop else x[:, 0]


# --- predictions


def probabilities(model: Layer, x: np.ndarray) -> np.ndarray:
    """Softmax outputs (N, classes) as a NumPy array; x (N, 10, 3, S, S) averages the ten crops'."""
    crops = x.shape[1] if x.ndim == 5 else 1
    with no_grad(), _eval_mode(model):
        logits = model(Tensor(x.reshape((-1,) + x.shape[-3:]), device=model.input_device))
        scores = logits.numpy().astype(np.float64)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    p = scores / scores.sum(axis=1, keepdims=True)
    return p.reshape(len(x), crops, -1).mean(axis=1)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def top_k(p: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(classes, probabilities), each (N, k), highest first."""
    k = min(k, p.shape[1])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(p, order, axis=1)


# --- features and neighbours


def _last_linear(model):
    last = [layer for _, layer in model.named_layers() if isinstance(layer, Linear)]
    if not last:
        raise MinidlError("the model has no Linear layer: no last hidden layer to take features from")
    return last[-1]


def features(model: Layer, x: np.ndarray) -> np.ndarray:
    """The input of the model's last Linear layer for x (N, 3, S, S), as float32 (N, D), in eval mode."""
    captured = []
    remove = _last_linear(model).register_forward_hook(lambda layer, inputs, y: captured.append(inputs[0].numpy()))
    try:
        with no_grad(), _eval_mode(model):
            model(Tensor(x, device=model.input_device))
    finally:
        remove()
    return captured[0].astype(np.float32)


def nearest(queries: np.ndarray, base: np.ndarray, k: int, block: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """For each row of queries, the k rows of base nearest in Euclidean distance: (indices, distances).

    Blocks of `block` base rows at a time: the work is matrix products and the
    memory (queries x block), never (queries x N) or N x N.
    """
    if not 1 <= k <= len(base):
        raise MinidlError(f"-k {k} is out of range: the training set has {len(base)} images")
    q = queries.astype(np.float64)
    q2 = (q * q).sum(axis=1, keepdims=True)
    best_d = np.full((len(q), k), np.inf)
    best_i = np.zeros((len(q), k), dtype=np.int64)
    for start in range(0, len(base), block):
        x = base[start:start + block].astype(np.float64)
        d = np.maximum(q2 + (x * x).sum(axis=1) - 2 * q @ x.T, 0)  # rounding can make 0 slightly negative
        d_all = np.concatenate([best_d, d], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)), d.shape)], axis=1)
        keep = np.argsort(d_all, axis=1, kind="stable")[:, :k]  # stable: ties go to the earlier image
        best_d, best_i = np.take_along_axis(d_all, keep, axis=1), np.take_along_axis(i_all, keep, axis=1)
    return best_i, np.sqrt(best_d)


def dataset_features(restored, data: str, split: str = "train", batch_size: int = 64,
                     progress: Optional[Callable[[int, int], None]] = None,
                     note: Optional[Callable[[str], None]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D), labels, file positions) of a split of `data`, cached beside the checkpoint.

    The cache (minidl.training.feature_cache) is reused while the checkpoint's bytes, the model
    file's source and the dataset's contents are those it was made from, and recomputed
    otherwise; one that fails its checks is recomputed too, and replaced. Where it
    cannot be written (a read-only folder, a full disk) the features are used without
    it. `note(line)` is told of a cache ignored or not written.
    """
    note = note or (lambda line: None)
    loader = restored.loader(data, split=split, batch_size=batch_size)
    if loader.num_images == 0:
        raise DataError(f"{data} has no {'validation' if split == 'val' else split} images")
    model = restored.model
    width = _last_linear(model).W.shape[1]
    cache = f"{os.path.splitext(restored.checkpoint.path)[0]}.fc7-{split}.h5"
    key = cache_key(restored.checkpoint.path, restored.model_file.source, loader.fingerprint, split)
    if os.path.lexists(cache):
        try:
            cached = read_cache(cache, key, loader.num_images, width)
            if cached is not None:
                return cached, loader.labels, loader.indices
        except CacheError as e:
            note(f"ignoring the feature cache: {e}")
    prepared = []
    with contextlib.closing(loader.epoch_batches(0)) as batches:  # stops the loader's thread on any way out
        for i, (x, _) in enumerate(batches):
            prepared.append(features(model, x))
            if progress:
                progress(i + 1, len(loader))
    result = np.concatenate(prepared)
    try:
        write_cache(cache, key, result)
    except OSError as e:
        note(f"could not cache the features in {cache} ({e.strerror or e}); they are used without a cache")
    return result, loader.labels, loader.indices


def dataset_images(data: str, positions: np.ndarray) -> np.ndarray:
    """The stored 256x256 images at these file positions."""
    with open_dataset(data) as f:
        images = stored_images(f)
        return np.stack([images[int(i)] for i in positions])
