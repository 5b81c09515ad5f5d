"""Pictures, drawn with NumPy and Pillow only.

filter_grid / save_filter_grid -- conv1's kernels as enlarged colour tiles, the
paper's Figure 3: the first tower's kernels in one block over the second
tower's in another (with the defaults, 96 kernels of 11x11 give two blocks of
3 rows x 16 tiles of 44x44 pixels, a 738 x 288 picture).

training_curves -- loss and accuracy per epoch, two panels side by side.

Both writers replace their PNG atomically: the picture goes to a temporary
file in the same folder first and is renamed over the target only when it is
complete, so a reader never sees half a file.
"""
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from minidl.atomic import atomic_path
from minidl.errors import MinidlError

BACKGROUND = (255, 255, 255)
SEPARATOR = (170, 170, 170)
MID_GREY = 128

# filter_grid's defaults, in pixels (see _grid_layout for how they add up)
COLS, SCALE, GAP, TOWER_GAP = 16, 4, 2, 12

# training_curves' default picture size
CURVES_SIZE = (1000, 400)


# ----------------------------------------------------------------------------- filter grid

def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MinidlError(f"filter_grid: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_kernels(kernels, towers):
    try:
        array = np.asarray(kernels, dtype=np.float64)
    except (TypeError, ValueError):
        raise MinidlError("filter_grid: kernels must be a numeric array of shape (count, 3 or 1, kh, kw)") from None
    shape = tuple(np.shape(array))
    if array.ndim != 4 or array.shape[1] not in (1, 3) or 0 in array.shape:
        raise MinidlError(f"filter_grid: kernels must have shape (count, 3 or 1, kh, kw) "
                          f"(RGB or grey), got shape {shape}")
    if array.shape[0] % towers:
        raise MinidlError(f"filter_grid: {array.shape[0]} kernels (shape {shape}) "
                          f"cannot be split into {towers} equal towers")
    if not np.all(np.isfinite(array)):
        raise MinidlError(f"filter_grid: kernels of shape {shape} contain NaN or infinite values")
    return array


def _tiles(kernels, scale):
    """(K, C, kh, kw) floats -> (K, kh*scale, kw*scale, 3) uint8, each kernel scaled to its own range."""
    low = kernels.min(axis=(1, 2, 3), keepdims=True)
    high = kernels.max(axis=(1, 2, 3), keepdims=True)
    span = high - low
    constant = ~(span > 1e-9 * np.maximum(np.abs(low), np.abs(high)))
    scaled = 255.0 * (kernels - low) / np.where(constant, 1.0, span)
    scaled = np.where(constant, float(MID_GREY), scaled)
    tiles = np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (K, kh, kw, C)
    if tiles.shape[3] == 1:
        tiles = np.repeat(tiles, 3, axis=3)
    return tiles.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour enlargement


def _grid_layout(count, kh, kw, towers, cols, scale, gap, tower_gap):
    """Pixel geometry of the grid; the one place the picture's size is defined.

    Each tower's count/towers kernels fill min(cols, count/towers) tiles per row;
    tiles are (kh*scale) x (kw*scale) with `gap` pixels between them and `gap`
    pixels of margin round the picture; tower blocks are stacked top to bottom
    with `tower_gap` pixels between them.
    """
    per_tower = count // towers
    cols = min(cols, per_tower)
    rows = -(-per_tower // cols)
    tile_h, tile_w = kh * scale, kw * scale
    block_w = cols * tile_w + (cols - 1) * gap
    block_h = rows * tile_h + (rows - 1) * gap
    width = block_w + 2 * gap
    height = towers * block_h + (towers - 1) * tower_gap + 2 * gap
    return dict(per_tower=per_tower, cols=cols, rows=rows, tile_h=tile_h, tile_w=tile_w,
                block_w=block_w, block_h=block_h, width=width, height=height)


def filter_grid(kernels, towers=2, cols=COLS, scale=SCALE, gap=GAP, tower_gap=TOWER_GAP, separator=True):
    """Draw conv kernels as a grid of colour tiles (the paper's Figure 3); returns an RGB PIL.Image.

    kernels: array (count, C, kh, kw) -- conv1's weights (out, in, kh, kw), C = 3
        (RGB, drawn in colour) or 1 (drawn in grey). Any count divisible by `towers`,
        any kernel size.
    towers: the kernels are split into `towers` equal consecutive blocks (AlexNet: 48
        of tower 1, then 48 of tower 2); each block is drawn on its own, one below the other.
    cols: tiles per row inside a block (at most the block's kernel count).
    scale: each kernel pixel becomes a scale x scale square (11x11 -> 44x44 with 4).
    gap: pixels between tiles, and the margin round the picture.
    tower_gap: pixels between tower blocks.
    separator: draw a thin grey line across the middle of each gap between towers.

    Each tile is scaled to its own range (min -> 0, max -> 255, per kernel over all
    channels, so colours keep their balance); a constant kernel is drawn mid grey.
    Background is white. With the defaults, 96 kernels of 11x11 in 2 towers make
    2 blocks of 3 rows x 16 tiles: 738 x 288 pixels.
    """
    towers = _check_int("towers", towers, 1)
    cols = _check_int("cols", cols, 1)
    scale = _check_int("scale", scale, 1)
    gap = _check_int("gap", gap, 0)
    tower_gap = _check_int("tower_gap", tower_gap, 0)
    kernels = _check_kernels(kernels, towers)
    count, _, kh, kw = kernels.shape
    lay = _grid_layout(count, kh, kw, towers, cols, scale, gap, tower_gap)

    canvas = np.empty((lay["height"], lay["width"], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for index, tile in enumerate(_tiles(kernels, scale)):
        tower, within = divmod(index, lay["per_tower"])
        row, col = divmod(within, lay["cols"])
        top = gap + tower * (lay["block_h"] + tower_gap) + row * (lay["tile_h"] + gap)
        left = gap + col * (lay["tile_w"] + gap)
        canvas[top:top + lay["tile_h"], left:left + lay["tile_w"]] = tile
    if separator and tower_gap >= 3:
        for tower in range(1, towers):
            y = gap + tower * lay["block_h"] + (tower - 1) * tower_gap + tower_gap // 2
            canvas[y, gap:gap + lay["block_w"]] = SEPARATOR
    return Image.fromarray(canvas)  # (H, W, 3) uint8 -> RGB


def save_filter_grid(kernels, path, **layout):
    """filter_grid(kernels, **layout) written to `path` as a PNG (atomically); returns the image."""
    image = filter_grid(kernels, **layout)
    _save_png(image, path)
    return image


# ----------------------------------------------------------------------------- training curves

TRAIN_COLOUR = (31, 119, 180)   # blue
VAL_COLOUR = (230, 110, 0)      # orange
TOP5_COLOUR = (44, 160, 44)     # green
INK = (0, 0, 0)
GRID = (225, 225, 225)


def training_curves(history, path, size=CURVES_SIZE):
    """Write a PNG of the training curves; returns the image.

    history: dict of per-epoch lists -- train_loss, val_loss, train_top1, val_top1,
    val_top5 (accuracies as fractions 0..1). Any key may be missing and any entry
    None (or NaN): those points are skipped and the line is broken there. Other keys
    (e.g. lr) are ignored. Two panels side by side: loss vs epoch, and accuracy (%)
    vs epoch, each with tick labels and a legend. A single epoch is drawn as a dot.
    size: (width, height) in pixels, default 1000 x 400.
    """
    if not isinstance(history, dict):
        raise MinidlError(f"training_curves: history must be a dict of per-epoch lists, "
                          f"got {type(history).__name__}")
    width, height = (int(v) for v in size)
    if width < 300 or height < 150:
        raise MinidlError(f"training_curves: size {width}x{height} is too small (at least 300x150)")
    panels = [
        ("Loss", False, [("train", _series(history, "train_loss", 1.0), TRAIN_COLOUR),
                         ("val", _series(history, "val_loss", 1.0), VAL_COLOUR)]),
        ("Accuracy (%)", True, [("train top-1", _series(history, "train_top1", 100.0), TRAIN_COLOUR),
                                ("val top-1", _series(history, "val_top1", 100.0), VAL_COLOUR),
                                ("val top-5", _series(history, "val_top5", 100.0), TOP5_COLOUR)]),
    ]
    epochs = max((len(values) for _, _, series in panels for _, values, _ in series), default=0)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font()
    half = width // 2
    for i, (title, percent, series) in enumerate(panels):
        _panel(draw, font, (i * half, 0, (i + 1) * half, height), title, percent, series, epochs)
    _save_png(image, path)
    return image


def _series(history, key, factor):
    values = history.get(key)
    if values is None:
        return []
    out = []
    for v in values:
        try:
            f = float(v) * factor if v is not None else math.nan
        except (TypeError, ValueError):
            raise MinidlError(f"training_curves: history[{key!r}] holds a non-number {v!r}") from None
        out.append(f if math.isfinite(f) else math.nan)
    return out


def _font():
    try:
        return ImageFont.load_default(size=13)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, AttributeError, ImportError):
        return ImageFont.load_default()


def _text_size(draw, text, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _nice_step(span, target):
    """A step from {1, 2, 2.5, 5} x 10^k giving about `target` intervals over `span`."""
    raw = span / max(target, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * power >= raw * (1 - 1e-9):
            return m * power
    return 10.0 * power


def _format_tick(value, step):
    if abs(value) < step * 1e-6:
        value = 0.0
    if step >= 1 and float(value).is_integer():
        return str(int(round(value)))
    power = math.floor(math.log10(step))
    decimals = max(0, -power + (1 if round(step / 10 ** power, 6) == 2.5 else 0))  # 0.25 needs one more digit
    return f"{value:.{decimals}f}"


def _value_range(series, percent):
    if percent:
        return 0.0, 100.0, 20.0
    finite = [v for _, values, _ in series for v in values if not math.isnan(v)]
    low, high = min(finite, default=0.0), max(finite, default=1.0)
    low = min(low, 0.0)  # losses are drawn from zero up
    if high - low <= 0:
        high = low + 1.0
    step = _nice_step(high - low, 5)
    return math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step, step


def _panel(draw, font, area, title, percent, series, epochs):
    x0, y0, x1, y1 = area
    _, line_h = _text_size(draw, "0123456789", font)
    left, right = x0 + 64, x1 - 24
    title_y = y0 + 10
    legend_y = title_y + line_h + 18  # centre line of the legend row
    top, bottom = legend_y + line_h + 10, y1 - 2 * line_h - 22
    plot_w, plot_h = right - left, bottom - top

    # title, centred over the plot
    tw, _ = _text_size(draw, title, font)
    draw.text((left + (plot_w - tw) / 2, title_y), title, fill=INK, font=font)

    # y axis: range, grid lines and labels
    low, high, step = _value_range(series, percent)

    def y_of(value):
        y = bottom - plot_h * (value - low) / (high - low)
        return min(max(y, top), bottom)  # out-of-range values (e.g. accuracy > 100%) stay inside the box

    ticks = int(round((high - low) / step))
    for t in range(ticks + 1):
        value = low + t * step
        y = round(y_of(value))
        if 0 < t < ticks:
            draw.line((left + 1, y, right - 1, y), fill=GRID)
        draw.line((left - 5, y, left, y), fill=INK)
        label = _format_tick(value, step)
        lw, lh = _text_size(draw, label, font)
        draw.text((left - 8 - lw, y - lh / 2 - 2), label, fill=INK, font=font)

    # x axis: epochs 1..n, with half an epoch (or 2%) of padding each side
    n = max(epochs, 1)
    pad = max(0.5, 0.02 * n)
    ex_lo, ex_hi = 1 - pad, n + pad

    def x_of(epoch):
        return left + plot_w * (epoch - ex_lo) / (ex_hi - ex_lo)

    if epochs:
        max_labels = max(2, plot_w // (_text_size(draw, str(n), font)[0] + 20))
        estep = 1
        while n / estep > max_labels:
            estep = int(_nice_step(estep * 1.5, 1))  # 1, 2, 5, 10, 20, 50, ...
        if estep <= 5:
            labels = list(range(1, n + 1, estep))
        else:  # 1, then the round multiples that are not too close to it
            labels = [1] + [e for e in range(estep, n + 1, estep) if e - 1 >= 0.6 * estep]
        for epoch in labels:
            x = round(x_of(epoch))
            draw.line((x, bottom, x, bottom + 5), fill=INK)
            lw, _ = _text_size(draw, str(epoch), font)
            draw.text((x - lw / 2, bottom + 8), str(epoch), fill=INK, font=font)
    xl, _ = _text_size(draw, "epoch", font)
    draw.text((left + (plot_w - xl) / 2, bottom + line_h + 16), "epoch", fill=INK, font=font)
    draw.rectangle((left, top, right, bottom), outline=INK)

    # curves: lines broken at missing points, dots when there are few epochs
    dots = epochs <= 40
    for _, values, colour in series:
        points = [(x_of(e + 1), y_of(v)) if not math.isnan(v) else None for e, v in enumerate(values)]
        run = []
        for p in points + [None]:
            if p is not None:
                run.append(p)
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=2, joint="curve")
            if len(run) == 1 or dots:
                for x, y in run:
                    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            run = []

    # legend: one row between the title and the plot
    present = [(name, colour) for name, values, colour in series if any(not math.isnan(v) for v in values)]
    widths = [22 + _text_size(draw, name, font)[0] for name, _ in present]
    total = sum(widths) + 18 * max(len(present) - 1, 0)
    x = left + (plot_w - total) / 2
    y = legend_y
    for (name, colour), w in zip(present, widths):
        draw.line((x, y, x + 16, y), fill=colour, width=3)
        draw.ellipse((x + 5, y - 3, x + 11, y + 3), fill=colour)
        draw.text((x + 22, y - line_h / 2 - 2), name, fill=INK, font=font)
        x += w + 18


def _save_png(image, path):
    """Write `image` as a PNG so that an existing file is replaced only by a complete one."""
    with atomic_path(os.fspath(path), suffix=".png") as tmp:
        image.save(tmp, format="PNG")
