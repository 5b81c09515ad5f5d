"""The CPU cost of delivering one stored 256x256 image, and its size on disk, per storage layout.

    python benchmarks/storage_layouts.py [--images 300] [--source PHOTO.jpg]

Images: 256x256 views (random position, scale and mirror) of a photo (default: matplotlib's
grace_hopper.jpg), so that the compressors see natural content. Each layout is written to a
file in a temporary folder, then every image is read back in a shuffled order, three times;
the best pass's process CPU time per image is reported (the file is in the page cache: this is
the CPU's share, not the disk's). Figures in benchmarks/NOTES.md.
"""
import argparse
import os
import tempfile
import time

import h5py
import numpy as np
from PIL import Image

from minidl.data.dataset import STORAGES, ImageWriter, encode_image, stored_images
from minidl.data.prepare import square_image


def photo_views(source, count, seed=0):
    rng = np.random.default_rng(seed)
    with Image.open(source) as photo:
        photo = photo.convert("RGB")
        width, height = photo.size
        for _ in range(count):
            side = int(rng.integers(min(width, height) // 3, min(width, height) + 1))
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            view = square_image(photo.crop((x, y, x + side, y + side)))
            yield view[:, ::-1] if rng.random() < 0.5 else view


def measure(folder, storage, images):
    path = os.path.join(folder, f"{storage}.h5")
    with h5py.File(path, "w") as f:
        f.attrs["image_size"] = 256
        writer = ImageWriter(f, storage, len(images), 256)
        for i, image in enumerate(images):
            writer.write(i, encode_image(image, storage)[0])
    order = np.random.default_rng(1).permutation(len(images))
    best = float("inf")
    with h5py.File(path, "r") as f:
        stored = stored_images(f)
        for _ in range(3):
            start = time.process_time()
            for i in order:
                stored[int(i)]
            best = min(best, (time.process_time() - start) / len(images))
    return best, os.path.getsize(path) / len(images)


def main():
    import matplotlib.cbook
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--source", default=matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    args = parser.parse_args()
    images = list(photo_views(args.source, args.images))
    with tempfile.TemporaryDirectory() as folder:
        for storage in STORAGES:
            cpu, size = measure(folder, storage, images)
            print(f"{storage:5s}  {1000 * cpu:6.3f} ms CPU per image read   {size / 1000:6.1f} kB per image")


if __name__ == "__main__":
    main()
