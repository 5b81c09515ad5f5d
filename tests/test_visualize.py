"""Figure 3 (conv1's kernels as tiles) and the training curves."""
import os

import numpy as np
import pytest
from PIL import Image

from minidl.errors import MinidlError
from minidl.visualize import filter_grid, save_filter_grid, training_curves

WHITE = 255
# the documented defaults: 16 tiles per row, 11x11 kernels enlarged 4x, 2 px between tiles
# and round the picture, 12 px between tower blocks with a grey line across the middle
TILE, GAP, TOWER_GAP, COLS = 44, 2, 12, 16
BLOCK_H = 3 * TILE + 2 * GAP  # 48 kernels per tower = 3 rows of 16


def conv1(seed=0, count=96, size=11):
    return np.random.default_rng(seed).standard_normal((count, 3, size, size))


def tile(pixels, index, size=TILE, gap=GAP, cols=COLS, block_h=BLOCK_H, tower_gap=TOWER_GAP, per_tower=48):
    tower, within = divmod(index, per_tower)
    row, col = divmod(within, cols)
    top = gap + tower * (block_h + tower_gap) + row * (size + gap)
    left = gap + col * (size + gap)
    return pixels[top:top + size, left:left + size]


def test_alexnet_conv1_grid_size_with_the_defaults():
    image = filter_grid(conv1())
    width = COLS * TILE + (COLS - 1) * GAP + 2 * GAP
    height = 2 * BLOCK_H + TOWER_GAP + 2 * GAP
    assert image.mode == "RGB" and image.size == (width, height) == (738, 288)


def test_tiles_are_enlarged_kernels_in_order():
    kernels = conv1(1)
    pixels = np.asarray(filter_grid(kernels))
    for index in (0, 17, 47, 48, 95):
        t = tile(pixels, index)
        k = kernels[index]
        small = t[::4, ::4].astype(int)  # nearest neighbour: every 4th pixel is one kernel pixel
        assert np.array_equal(t, np.repeat(np.repeat(t[::4, ::4], 4, axis=0), 4, axis=1))
        expected = np.rint(255 * (k - k.min()) / (k.max() - k.min())).transpose(1, 2, 0)
        assert np.abs(small - expected).max() <= 1


def test_tiles_differ():
    kernels = conv1(2)
    pixels = np.asarray(filter_grid(kernels))
    assert not np.array_equal(tile(pixels, 0), tile(pixels, 1))
    assert not np.array_equal(tile(pixels, 0), tile(pixels, 48))


def test_each_tile_is_scaled_to_its_own_range():
    kernels = conv1(3)
    scaled = kernels.copy()
    scaled[5] *= 1000
    scaled[60] = scaled[60] * 1e-6 - 3
    np.testing.assert_array_equal(np.asarray(filter_grid(kernels)), np.asarray(filter_grid(scaled)))


def test_constant_kernel_is_mid_grey():
    kernels = conv1(4)
    kernels[7] = 0.25
    kernels[50] = 0.0
    pixels = np.asarray(filter_grid(kernels))
    assert np.all(tile(pixels, 7) == 128) and np.all(tile(pixels, 50) == 128)


def test_tower_blocks_are_separated_by_background():
    pixels = np.asarray(filter_grid(conv1(5)))
    between = pixels[GAP + BLOCK_H:GAP + BLOCK_H + TOWER_GAP]
    line = TOWER_GAP // 2
    assert np.all(np.delete(between, line, axis=0) == WHITE)  # the gap is background...
    assert np.all(between[line, GAP:-GAP] == between[line, GAP]) and between[line, GAP, 0] < WHITE  # ...and a line
    bare = np.asarray(filter_grid(conv1(5), separator=False))
    assert np.all(bare[GAP + BLOCK_H:GAP + BLOCK_H + TOWER_GAP] == WHITE)
    assert np.all(bare[:GAP] == WHITE) and np.all(bare[:, :GAP] == WHITE)  # margins too


def test_other_counts_sizes_grey_and_one_tower():
    grey = filter_grid(np.random.default_rng(6).standard_normal((20, 1, 5, 7)), towers=1, cols=8, scale=3, gap=1)
    assert grey.mode == "RGB" and grey.size == (8 * 21 + 7 + 2, 3 * 15 + 2 + 2)
    pixels = np.asarray(grey)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])
    # fewer kernels per tower than cols: the row is only as wide as it needs to be
    small = filter_grid(conv1(7, count=6, size=3), towers=3, scale=1, gap=1, tower_gap=4)
    assert small.size == (2 * 3 + 1 + 2, 3 * 3 + 2 * 4 + 2)


@pytest.mark.parametrize("kernels, towers, message", [
    (np.zeros((96, 2, 11, 11)), 2, r"shape \(96, 2, 11, 11\)"),
    (np.zeros((96, 3, 11)), 2, r"shape \(96, 3, 11\)"),
    (np.zeros((0, 3, 11, 11)), 2, r"shape \(0, 3, 11, 11\)"),
    (np.zeros((95, 3, 11, 11)), 2, r"95 kernels .*shape \(95, 3, 11, 11\).* 2 equal towers"),
    (np.full((2, 3, 3, 3), np.nan), 2, "NaN"),
    (np.zeros((4, 3, 3, 3)), 0, "towers"),
])
def test_bad_kernels_raise_a_one_line_error(kernels, towers, message):
    with pytest.raises(MinidlError, match=message) as info:
        filter_grid(kernels, towers=towers)
    assert "\n" not in str(info.value)


def test_save_filter_grid_writes_a_png_atomically(tmp_path):
    path = tmp_path / "filters.png"
    path.write_bytes(b"old")
    image = save_filter_grid(conv1(8), path, towers=2)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == image.size
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    assert os.listdir(tmp_path) == ["filters.png"]


def test_a_failed_save_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "filters.png"
    path.write_bytes(b"old")
    with pytest.raises(MinidlError):
        save_filter_grid(np.zeros((3, 3, 3, 3)), path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["filters.png"]


def history(epochs, seed=9):
    rng = np.random.default_rng(seed)
    return dict(train_loss=list(rng.uniform(0.5, 6.9, epochs)), val_loss=list(rng.uniform(0.5, 6.9, epochs)),
                train_top1=list(rng.uniform(0, 1, epochs)), val_top1=list(rng.uniform(0, 1, epochs)),
                val_top5=list(rng.uniform(0, 1, epochs)), lr=[0.01] * epochs)


@pytest.mark.parametrize("epochs", [1, 10])
def test_training_curves_writes_a_png(tmp_path, epochs):
    path = tmp_path / "curves.png"
    training_curves(history(epochs), path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 400)
        colours = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert {(31, 119, 180), (230, 110, 0), (44, 160, 44)} <= colours  # three distinct series colours
    assert os.listdir(tmp_path) == ["curves.png"]


def test_training_curves_with_gaps_missing_keys_and_a_custom_size(tmp_path):
    h = history(12)
    h["val_loss"][3] = None
    del h["val_top5"]
    training_curves(h, tmp_path / "a.png", size=(640, 300))
    training_curves({}, tmp_path / "b.png")
    training_curves({"train_loss": [2.3, 2.1]}, tmp_path / "c.png")
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (640, 300)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "c.png"]


def test_training_curves_rejects_non_numbers(tmp_path):
    with pytest.raises(MinidlError, match="train_loss"):
        training_curves({"train_loss": ["oops"]}, tmp_path / "c.png")
    assert os.listdir(tmp_path) == []
