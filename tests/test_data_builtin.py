"""The built-in shapes dataset: deterministic, cached, classes that differ by shape."""
import os

import numpy as np

from minidl.data.builtin import CLASS_NAMES, MIN_COLOUR_DISTANCE, builtin_dataset, make_image
from minidl.data.dataset import dataset_info, open_dataset


def test_builtin_dataset_is_made_once_and_cached(tmp_path):
    calls = []
    path = builtin_dataset(tmp_path, progress=lambda done, total: calls.append((done, total)),
                           per_class=4)
    assert calls[-1] == (40, 40)
    info = dataset_info(path)
    assert info.num_images == 40 and len(CLASS_NAMES) == 10
    assert info.class_names == tuple(CLASS_NAMES)
    assert info.num_val == 10  # 10% of 4 rounds to nothing: each class keeps one for validation
    with open_dataset(path) as f:
        np.testing.assert_array_equal(np.bincount(f["labels"][()]), [4] * 10)
        np.testing.assert_array_equal(f["images"][0], make_image(0, 0))
    modified = os.stat(path).st_mtime_ns
    calls.clear()
    assert builtin_dataset(tmp_path, progress=lambda *a: calls.append(a), per_class=4) == path
    assert calls == [] and os.stat(path).st_mtime_ns == modified


def test_damaged_cache_is_made_again(tmp_path):
    path = builtin_dataset(tmp_path, per_class=1)
    with open(path, "wb") as f:
        f.write(b"half a file")
    assert builtin_dataset(tmp_path, per_class=1) == path
    assert dataset_info(path).num_images == 10


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDL_CACHE", str(tmp_path / "cache"))
    path = builtin_dataset(per_class=1)
    assert path.startswith(str(tmp_path / "cache")) and path.endswith(".h5")


def test_images_are_deterministic_and_colour_says_nothing_about_the_class():
    for label in range(len(CLASS_NAMES)):
        image = make_image(label, 3)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, make_image(label, 3))
        colours = np.unique(image.reshape(-1, 3), axis=0)
        # two colours (background and foreground) far enough apart; drawn per image, not per class
        assert len(colours) == 2
        assert np.linalg.norm(colours[0].astype(float) - colours[1]) >= MIN_COLOUR_DISTANCE
        assert not np.array_equal(np.unique(make_image(label, 4).reshape(-1, 3), axis=0), colours)
