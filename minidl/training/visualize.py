"""Pictures: conv1's filters (filter_grid, save_filter_grid: the paper's Figure 3, NumPy and
Pillow), the training curves (training_curves) and the paper's Figure 4 (draw_predictions,
draw_neighbours), the last two with matplotlib.

Every writer replaces its picture atomically (a temporary file in the same folder,
renamed over the target when complete). The file name's suffix chooses the format
(.png, .jpg or .jpeg); another suffix is refused (`picture_format`).
"""
import os
from typing import Callable

import numpy as np
from PIL import Image

from minidl.atomic import atomic_path
from minidl.errors import MinidlError
from minidl.training.interrupts import interrupts_held

BACKGROUND = (255, 255, 255)
SEPARATOR = (170, 170, 170)
MID_GREY = 128

# filter_grid's defaults, in pixels (see _grid_layout for how they add up)
COLS, SCALE, GAP, TOWER_GAP = 16, 4, 2, 12

# training_curves' default picture size
CURVES_SIZE = (1000, 400)

# what a picture's suffix makes it: Pillow's and matplotlib's name of the format
PICTURE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


def format_by_suffix(path: str, formats: dict, refusal: Callable[[str], str]) -> str:
    """formats[the suffix of `path`, lower case]; MinidlError(refusal(suffix)) for any other suffix."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in formats:
        raise MinidlError(refusal(suffix))
    return formats[suffix]


def picture_format(path: str) -> str:
    """The format of the picture file `path` by its suffix ('png', 'jpeg'); MinidlError for any other,
    which would otherwise get PNG bytes under a name that says JPEG, or a format no viewer expects."""
    return format_by_suffix(path, PICTURE_FORMATS, lambda suffix: f"cannot write {os.fspath(path)}: a picture's "
                            f"name ends in {', '.join(PICTURE_FORMATS)} (it chooses the format)")


def shown_name(name: str) -> str:
    """A class name as a picture or a line shows it: as it is, or quoted (repr) if it is empty or has
    characters that would break a line or hide ("", "\n", a tab), as a crafted dataset's may."""
    return name if name.isprintable() and name.strip() == name and name else repr(name)


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
    """Draw conv kernels (count, C, kh, kw), C = 3 or 1, as a grid of tiles; returns an RGB PIL.Image.

    The kernels are split into `towers` equal consecutive blocks, drawn one below the
    other (`tower_gap` pixels apart, with a grey `separator` line), `cols` tiles per
    row; each kernel pixel becomes a `scale` x `scale` square, `gap` pixels between
    tiles and round the picture. Each tile is scaled to its own range over all its
    channels; a constant kernel is mid grey, the background white.
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


def save_filter_grid(kernels: np.ndarray, path: str, **layout) -> None:
    """filter_grid(kernels, **layout) written to `path` (atomically), in the format its suffix names
    (picture_format); returns the image."""
    kind = picture_format(path)
    image = filter_grid(kernels, **layout)
    with atomic_path(os.fspath(path)) as tmp:
        image.save(tmp, format=kind)
    return image


# ----------------------------------------------------------------------------- training curves

TRAIN_COLOUR = (31, 119, 180)   # blue
VAL_COLOUR = (230, 110, 0)      # orange
TOP5_COLOUR = (44, 160, 44)     # green
LR_COLOUR = (120, 120, 120)     # grey
EPOCH_KEYS = ("train_loss", "val_loss", "train_top1", "val_top1", "val_top5", "lr")


def training_curves(history: dict, path: str, size: tuple = CURVES_SIZE) -> None:
    """Write a PNG of the training curves to `path` (atomically), `size` = (width, height) pixels.

    `history` is the trainer's dict of lists (minidl.training.checkpoint's HISTORY_KEYS);
    any key may be missing (old checkpoints) and any entry None or NaN (a break in the
    line). Left: the loss per logging interval against step, with each epoch's train and
    val loss as markers; right: top-1 and top-5 per epoch, dotted where the rate changed.
    """
    if not isinstance(history, dict):
        raise MinidlError(f"training_curves: history must be a dict of lists, got {type(history).__name__}")
    width, height = (int(v) for v in size)
    if width < 300 or height < 150:
        raise MinidlError(f"training_curves: size {width}x{height} is too small (at least 300x150)")
    s = {key: _series(history, key) for key in EPOCH_KEYS + ("interval_step", "interval_loss")}
    count = min(len(s["interval_step"]), len(s["interval_loss"]))
    steps, losses = s["interval_step"][:count], s["interval_loss"][:count]
    epochs = max(len(s[key]) for key in EPOCH_KEYS)

    dpi = 100
    fig = _canvas(width / dpi, height / dpi)
    loss_ax, acc_ax = fig.subplots(1, 2)
    _loss_panel(loss_ax, s, steps, losses, epochs)
    _accuracy_panel(acc_ax, s, epochs)
    title = f"{epochs} epoch{'s' * (epochs != 1)}"
    if count and np.isfinite(steps[-1]):
        title += f", {int(steps[-1])} steps"
    if len(s["lr"]) and np.isfinite(s["lr"][0]):
        title += f", lr {s['lr'][0]:g}"
    fig.suptitle(f"Training curves ({title})")
    _save_figure(fig, path)


def _loss_panel(ax, s, steps, losses, epochs):
    ax.set_title("Loss")
    ax.set_ylabel("loss")
    ends = _epoch_steps(steps, epochs)
    epoch_ax = ax  # where the per-epoch markers go
    if len(steps):
        from matplotlib.ticker import MaxNLocator
        dots = "." if len(steps) <= 50 else ""  # a short run's few points stay visible
        ax.plot(steps, losses, dots + "-", color=_rgb(TRAIN_COLOUR), linewidth=0.8, markersize=3, alpha=0.6,
                label="train (interval)")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 1.25
    if ends is not None:
        x_of = lambda values: ends[:len(values)]  # noqa: E731
        per_epoch = ends[0]
        top = ax.secondary_xaxis("top", functions=(lambda step: step / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
        top.set_xticks(_epoch_ticks(epochs, first=0))
    else:
        # an old checkpoint (no intervals), or intervals that do not tell where the
        # epochs ended: the markers get an epoch axis of their own
        x_of = lambda values: np.arange(1, len(values) + 1)  # noqa: E731
        if not len(steps):
            _epoch_axis(ax, epochs, "epoch")
        elif epochs:
            epoch_ax = ax.twiny()
            _epoch_axis(epoch_ax, epochs, "epoch (markers)")
    epoch_ax.plot(x_of(s["train_loss"]), s["train_loss"], "o", color=_rgb(TRAIN_COLOUR), label="train (epoch)")
    epoch_ax.plot(x_of(s["val_loss"]), s["val_loss"], "s-", color=_rgb(VAL_COLOUR), label="val")
    _legend(ax, epoch_ax)


def _accuracy_panel(ax, s, epochs):
    ax.set_title("Accuracy")
    ax.set_ylabel("accuracy (%)")
    for key, label, colour, style in (("train_top1", "train top-1", TRAIN_COLOUR, "o-"),
                                      ("val_top1", "val top-1", VAL_COLOUR, "s-"),
                                      ("val_top5", "val top-5", TOP5_COLOUR, "^-")):
        ax.plot(np.arange(1, len(s[key]) + 1), 100 * s[key], style, color=_rgb(colour), label=label)
    _epoch_axis(ax, epochs, "epoch")
    ax.set_ylim(bottom=0)
    if not epochs:
        ax.text(0.5, 0.5, "no epoch finished yet", transform=ax.transAxes, ha="center", color="grey")
    lr = s["lr"]
    for e in range(1, len(lr)):
        if lr[e] != lr[e - 1] and np.isfinite(lr[e]) and np.isfinite(lr[e - 1]):
            # lr[e] is the rate epoch e + 1 trained with: mark the boundary before it
            ax.axvline(e + 0.5, color=_rgb(LR_COLOUR), linestyle=":", linewidth=1)
            ax.annotate(f"lr {lr[e]:g}", (e + 0.5, 1), xycoords=("data", "axes fraction"), rotation=90,
                        xytext=(2, -3), textcoords="offset points", va="top", fontsize=8, color=_rgb(LR_COLOUR))
    _legend(ax)


def _epoch_steps(steps, epochs):
    """The global step at which each epoch ended, or None if the intervals do not tell.

    Every epoch has the same number of steps and ends with a logging interval, and the
    trainer draws the curves just after an epoch ended, so the last interval ends epoch
    `epochs` and epoch e ends at e * steps[-1] / epochs. Checked: each such step within
    the recorded intervals must be one of their ends (a resumed old run may have
    intervals for its later epochs only).
    """
    if not epochs or not len(steps) or not np.isfinite(steps[-1]) or steps[-1] <= 0 or steps[-1] % epochs:
        return None
    ends = np.arange(1, epochs + 1) * (steps[-1] // epochs)
    recorded = ends[ends >= np.nanmin(steps)]
    return ends if np.isin(recorded, steps).all() else None


def _epoch_ticks(epochs, first=1):
    # whole epochs, about ten ticks at most: matplotlib's own ticks would show 0.2, 0.4... for one epoch
    return np.arange(first, max(epochs, 1) + 1, max(1, -(-epochs // 10)))


def _epoch_axis(ax, epochs, label):
    ax.set_xlabel(label)
    ax.set_xticks(_epoch_ticks(epochs))
    ax.set_xlim(0.5, max(epochs, 1) + 0.5)


def _rgb(colour):
    return tuple(c / 255 for c in colour)


def _legend(*axes):
    # one legend for axes that share a panel; none (and no warning) when nothing was drawn
    axes = list(dict.fromkeys(axes))
    lines = [line for ax in axes for line in ax.get_lines()
             if not line.get_label().startswith("_") and np.isfinite(np.asarray(line.get_ydata(), float)).any()]
    if lines:
        axes[0].legend(lines, [line.get_label() for line in lines], fontsize=8)


def _series(history, key):
    """history[key] as a float array, None -> NaN; a one-line error for non-numbers."""
    values = history.get(key)
    if values is None:
        return np.zeros(0)
    try:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise MinidlError(f"training_curves: history[{key!r}] holds a non-number") from None


# ----------------------------------------------------------------------------- Figure 4

def _canvas(width_in, height_in):
    """A matplotlib Figure drawn off-screen (Agg) at 100 dpi.

    matplotlib is imported here, not at the top: it takes most of a second to load,
    and only the pictures need it; and with Ctrl-C held back (an interrupt inside
    its C extension's import would crash the interpreter's exit). The Figure API
    with the Agg canvas draws without pyplot's global backend, so no display is needed.
    """
    with interrupts_held():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path):
    kind = picture_format(path)
    with atomic_path(os.fspath(path)) as tmp:
        fig.savefig(tmp, format=kind, dpi=100)


def draw_predictions(images, names, classes, probabilities, class_names, truths, path, columns=4):
    """The paper's Figure 4 (left): each image above its top-k classes as bars, the true class's bar red.

    images: uint8 (N, H, W, 3); classes, probabilities: (N, k); truths: the true label
    of each image or None. Returns the bar lengths drawn, (N, k), for checking.
    """
    count, k = np.shape(classes)
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig = _canvas(2.8 * columns, (2.4 + 0.28 * k) * rows)
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[2.4, 0.28 * k] * rows)
    drawn = np.zeros((count, k))
    for i in range(count):
        row, column = divmod(i, columns)
        picture = fig.add_subplot(grid[2 * row, column])
        picture.imshow(images[i])
        picture.set_axis_off()
        picture.set_title(shown_name(names[i]), fontsize=8)
        bars_ax = fig.add_subplot(grid[2 * row + 1, column])
        colours = ["tab:red" if c == truths[i] else "tab:blue" for c in classes[i]]
        bars = bars_ax.barh(range(k), probabilities[i], color=colours, height=0.7)
        drawn[i] = [bar.get_width() for bar in bars]
        bars_ax.set_yticks(range(k), [shown_name(class_names[c]) for c in classes[i]], fontsize=7)
        bars_ax.invert_yaxis()  # the most probable class on top
        bars_ax.set_xlim(0, 1)
        bars_ax.tick_params(axis="x", labelsize=6)
    fig.suptitle("Top classes (red: the true class)", fontsize=10)
    _save_figure(fig, path)
    return drawn


def draw_neighbours(queries, names, neighbours, neighbour_labels, path):
    """The paper's Figure 4 (right): one row per query image, then its k nearest training images.

    queries: uint8 (Q, H, W, 3); neighbours: uint8 (Q, k, H, W, 3), nearest first.
    Returns the number of image tiles drawn.
    """
    count, k = np.shape(neighbours)[:2]
    fig = _canvas(1.5 * (k + 1), 1.65 * count)
    axes = np.asarray(fig.subplots(count, k + 1, squeeze=False))
    for q in range(count):
        for j in range(k + 1):
            ax = axes[q, j]
            ax.imshow(queries[q] if j == 0 else neighbours[q, j - 1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(shown_name(names[q] if j == 0 else neighbour_labels[q][j - 1]), fontsize=7,
                         fontweight="bold" if j == 0 else "normal")
        for spine in axes[q, 0].spines.values():  # the query framed, its neighbours not
            spine.set_edgecolor("tab:red")
            spine.set_linewidth(2)
    fig.suptitle(f"Query (left) and its {k} nearest training images in fc7", fontsize=10)
    _save_figure(fig, path)
    return count * (k + 1)
