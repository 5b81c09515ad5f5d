"""Pictures: conv1's kernels (the paper's Figure 3) and the training curves, drawn with Pillow."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from minidl.atomic import atomic_path
from minidl.errors import MinidlError

BACKGROUND = (255, 255, 255)


def _tile(kernel):
    """One (C, kh, kw) kernel as uint8 (kh, kw, 3), scaled to its own range."""
    k = np.asarray(kernel, dtype=np.float64).transpose(1, 2, 0)
    low, high = k.min(), k.max()
    if high - low < 1e-12:
        scaled = np.full(k.shape, 128.0)  # a constant kernel: mid grey
    else:
        scaled = 255.0 * (k - low) / (high - low)
    if scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    return scaled.round().astype(np.uint8)


def filter_grid(kernels, towers=2, columns=8, zoom=4, gap=2, tower_gap=12):
    """Kernels (K, C, kh, kw), C = 3 (RGB) or 1, as enlarged tiles: each tower's K/towers
    kernels in a block of `columns` tiles per row, the blocks one over the other."""
    kernels = np.asarray(kernels)
    if kernels.ndim != 4 or kernels.shape[1] not in (1, 3):
        raise MinidlError(f"filters must have shape (count, 3 or 1, kh, kw), got {kernels.shape}")
    if towers < 1 or len(kernels) % towers:
        raise MinidlError(f"{len(kernels)} filters cannot be split into {towers} towers")
    per_tower = len(kernels) // towers
    rows = -(-per_tower // columns)
    tile_h, tile_w = kernels.shape[2] * zoom, kernels.shape[3] * zoom
    block_h = rows * tile_h + (rows - 1) * gap
    width = columns * tile_w + (columns - 1) * gap + 2 * gap
    height = towers * block_h + (towers - 1) * tower_gap + 2 * gap
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for index, kernel in enumerate(kernels):
        tower, within = divmod(index, per_tower)
        row, col = divmod(within, columns)
        top = gap + tower * (block_h + tower_gap) + row * (tile_h + gap)
        left = gap + col * (tile_w + gap)
        canvas[top:top + tile_h, left:left + tile_w] = np.kron(_tile(kernel), np.ones((zoom, zoom, 1), np.uint8))
    return Image.fromarray(canvas)


def save_filter_grid(kernels, path, **layout):
    image = filter_grid(kernels, **layout)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return image.size


def training_curves(history, path, size=(900, 340)):
    """Loss and accuracy per epoch, two panels, written as a PNG."""
    panels = [
        ("loss", [("train", history.get("train_loss", []), (31, 119, 180)),
                  ("val", history.get("val_loss", []), (255, 127, 14))], False),
        ("accuracy %", [("train top-1", history.get("train_top1", []), (31, 119, 180)),
                        ("val top-1", history.get("val_top1", []), (255, 127, 14)),
                        ("val top-5", history.get("val_top5", []), (44, 160, 44))], True),
    ]
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    half = size[0] // 2
    for i, (title, series, percent) in enumerate(panels):
        _panel(draw, font, (i * half + 50, 30, (i + 1) * half - 20, size[1] - 40), title, series, percent)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def _panel(draw, font, box, title, series, percent):
    left, top, right, bottom = box
    values = [v * (100 if percent else 1) for _, ys, _ in series for v in ys if v is not None]
    epochs = max((len(ys) for _, ys, _ in series), default=0)
    low, high = (0.0, 100.0) if percent else (0.0, max(values, default=1.0) * 1.05 or 1.0)
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 18), title, fill=(0, 0, 0), font=font)

    def point(epoch, value):
        x = left + (right - left) * (epoch + 1) / (epochs + 1)
        y = bottom - (bottom - top) * (value - low) / (high - low)
        return x, y

    for t in range(5):  # y ticks
        value = low + (high - low) * t / 4
        y = point(0, value)[1]
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((left - 44, y - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
    for epoch in range(epochs):  # x ticks, at most ~10 labels
        if epochs <= 10 or epoch % (epochs // 10 + 1) == 0:
            x = point(epoch, low)[0]
            draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
            draw.text((x - 4, bottom + 6), str(epoch + 1), fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 15, bottom + 20), "epoch", fill=(0, 0, 0), font=font)
    for k, (name, ys, colour) in enumerate(series):
        points = [point(e, v * (100 if percent else 1)) for e, v in enumerate(ys) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.line((right - 110, top + 12 + 14 * k, right - 90, top + 12 + 14 * k), fill=colour, width=3)
        draw.text((right - 85, top + 6 + 14 * k), name, fill=(0, 0, 0), font=font)
