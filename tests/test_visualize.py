"""Figure 3 (conv1's kernels as tiles) and the training curves."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minidl.errors import MinidlError
from minidl.training.visualize import (TOP5_COLOUR, TRAIN_COLOUR, VAL_COLOUR, _epoch_steps, filter_grid,
                              save_filter_grid, training_curves)

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


def history(epochs, steps_per_epoch=50, log_every=10, seed=9):
    """A trainer-like history: per-epoch values, and a decaying loss every log_every steps."""
    rng = np.random.default_rng(seed)
    steps = list(range(log_every, epochs * steps_per_epoch + 1, log_every))
    return dict(train_loss=list(rng.uniform(0.5, 6.9, epochs)), val_loss=list(rng.uniform(0.5, 6.9, epochs)),
                train_top1=list(rng.uniform(0, 1, epochs)), val_top1=list(rng.uniform(0, 1, epochs)),
                val_top5=list(rng.uniform(0, 1, epochs)), lr=[0.01] * (epochs - epochs // 2) + [0.001] * (epochs // 2),
                interval_step=steps, interval_loss=[6.9 * np.exp(-s / 100) + rng.uniform(0, 0.3) for s in steps])


def draw(tmp_path, h, name="curves.png", **kwargs):
    path = tmp_path / name
    training_curves(h, path, **kwargs)
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("epochs", [1, 10])
def test_training_curves_writes_a_png_atomically(tmp_path, epochs):
    (tmp_path / "curves.png").write_bytes(b"old")
    pixels = draw(tmp_path, history(epochs))
    assert pixels.shape == (400, 1000, 3)
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert {TRAIN_COLOUR, VAL_COLOUR, TOP5_COLOUR} <= colours and len(colours) > 50  # markers, text, lines
    assert (pixels == 255).all(axis=2).mean() > 0.5  # mostly white background, not a black or noisy picture
    assert os.listdir(tmp_path) == ["curves.png"]  # replaced, no temporary file left


def test_the_interval_curve_is_drawn_in_the_loss_panel(tmp_path):
    h = history(3)
    per_epoch = {k: v for k, v in h.items() if not k.startswith("interval")}
    with_intervals, without = draw(tmp_path, h, "a.png"), draw(tmp_path, per_epoch, "b.png")
    left = slice(0, 500)
    assert not np.array_equal(with_intervals[:, left], without[:, left])
    # zero epochs but some intervals: the loss panel shows a curve where the empty history has none
    only_intervals = dict(interval_step=h["interval_step"][:4], interval_loss=h["interval_loss"][:4])
    empty, curve = draw(tmp_path, {}, "c.png"), draw(tmp_path, only_intervals, "d.png")
    assert blue(curve[:, left]) > 100 and blue(empty[:, left]) == 0


def blue(pixels):
    """How many pixels are the train colour, faded or not: black text, grey, orange and green are not."""
    pixels = pixels.astype(int)
    return int((pixels[..., 2] - pixels[..., 0] > 40).sum())


def test_epoch_ends_are_derived_from_the_interval_steps():
    steps = list(range(10, 151, 10))  # 3 epochs of 50 steps, logged every 10
    assert list(_epoch_steps(steps, 3)) == [50, 100, 150]
    assert list(_epoch_steps([7, 14, 20, 27, 34, 40], 2)) == [20, 40]  # 20 steps per epoch, logged every 7
    assert list(_epoch_steps(steps[10:], 3)) == [50, 100, 150]  # an old run resumed: late intervals only
    assert _epoch_steps(steps[:-2], 3) is None  # not ended by an epoch: 130 is not 3 epochs of whole steps
    assert _epoch_steps([10, 20, 30, 45], 3) is None  # 15 and 30 would end epochs, but 15 was not logged
    assert _epoch_steps([], 3) is None and _epoch_steps(steps, 0) is None


@pytest.mark.parametrize("h", [
    {},                                                          # nothing yet
    {"train_loss": [2.3, 2.1]},                                  # one key
    {**history(12), "interval_step": [], "interval_loss": []},  # an old checkpoint: empty interval lists
    {k: v for k, v in history(4).items() if not k.startswith("interval")},  # ...or none at all
    {**history(1), "val_loss": [None], "val_top5": [float("nan")]},        # gaps
    {"interval_step": [10, 20], "interval_loss": [6.9, 6.5]},             # zero epochs, some intervals
    {**history(3), "interval_step": [10, 20, 35], "interval_loss": [6.9, 6.5, 6.1]},  # epochs not derivable
], ids=["empty", "one-key", "empty-intervals", "no-intervals", "gaps", "zero-epochs", "epochs-not-derivable"])
def test_training_curves_draw_any_history(tmp_path, h):
    pixels = draw(tmp_path, h, size=(640, 300))
    assert pixels.shape == (300, 640, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2


def test_training_curves_rejects_bad_input_and_writes_nothing(tmp_path):
    with pytest.raises(MinidlError, match="train_loss"):
        training_curves({"train_loss": ["oops"]}, tmp_path / "c.png")
    with pytest.raises(MinidlError, match="dict"):
        training_curves([1.0], tmp_path / "c.png")
    assert os.listdir(tmp_path) == []


def test_matplotlib_loads_only_when_drawing_and_leaves_pyplot_alone(tmp_path):
    code = ("import sys, minidl.training.visualize as v; assert 'matplotlib' not in sys.modules; "
            f"v.training_curves({{'train_loss': [1.0]}}, {str(tmp_path / 'c.png')!r}); "
            "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_picture_is_written_in_the_format_its_suffix_names_and_no_other(tmp_path):
    from minidl.training.visualize import picture_format
    assert [picture_format(f"a{s}") for s in (".png", ".jpg", ".JPEG")] == ["png", "jpeg", "jpeg"]
    save_filter_grid(conv1(8), tmp_path / "f.jpg", towers=2)
    with Image.open(tmp_path / "f.jpg") as saved:
        assert saved.format == "JPEG"
    training_curves(history(2), tmp_path / "c.jpeg")
    with Image.open(tmp_path / "c.jpeg") as saved:
        assert saved.format == "JPEG"
    for name in ("f.gif", "f", "f.png.tmp"):
        with pytest.raises(MinidlError, match=r"a picture's name ends in \.png, \.jpg, \.jpeg"):
            save_filter_grid(conv1(8), tmp_path / name, towers=2)
    assert sorted(os.listdir(tmp_path)) == ["c.jpeg", "f.jpg"]


def test_class_names_that_would_garble_a_picture_are_shown_quoted():
    from minidl.training.visualize import shown_name
    assert shown_name("tabby cat") == "tabby cat" and shown_name("été") == "été"
    assert [shown_name(n) for n in ("", "\n", "a\tb", " cat", "caf\udce9")] == \
        ["''", "'\\n'", "'a\\tb'", "' cat'", "'caf\\udce9'"]
