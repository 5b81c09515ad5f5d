"""The loader: splits, labels, shapes, seeded order and augmentation, resuming, the background thread."""
import gc
import re
import threading
import time

import h5py
import numpy as np
import pytest

from minidl.data.dataset import open_dataset, write_dataset
from minidl.data.loader import AUGMENT_STREAM, Loader
from minidl.errors import DataError

COUNT = 30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Image n is filled with the value 8n and has label n % 3; 6 of the 30 are validation images."""
    path = tmp_path_factory.mktemp("data") / "d.h5"
    samples = ((np.full((256, 256, 3), 8 * n, dtype=np.uint8), n % 3) for n in range(COUNT))
    write_dataset(path, samples, ["zero", "one", "two"], count=COUNT, val_fraction=0.2)
    return path


def image_numbers(path, x):
    """Which image each row of a batch was cut from (constant images, channel mean, no lighting)."""
    with open_dataset(path) as f:
        mean_red = f["mean_rgb"][0]
    return np.rint((x[:, 0, 0, 0] + mean_red) / 8).astype(int).tolist()


def split_numbers(path, split):
    with open_dataset(path) as f:
        is_val = f["is_val"][()].astype(bool)
    return set(np.flatnonzero({"train": ~is_val, "val": is_val, "all": np.ones(COUNT, bool)}[split]).tolist())


def all_batches(loader, epoch, start=0):
    return list(loader.epoch_batches(epoch, start=start))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_split_sizes_and_class_names(dataset):
    sizes = {split: Loader(dataset, split=split, batch_size=5).num_images for split in ("train", "val", "all")}
    assert sizes == {"train": 24, "val": 6, "all": 30}
    loader = Loader(dataset, batch_size=5)
    assert loader.num_classes == 3 and loader.class_names == ("zero", "one", "two")
    assert len(loader) == 5 and len(Loader(dataset, batch_size=5, drop_last=True)) == 4
    assert len(Loader(dataset, batch_size=7, split="val")) == 1


@pytest.mark.parametrize("split, augment", [("train", True), ("val", False), ("all", False)])
def test_every_image_once_with_its_label(dataset, split, augment):
    loader = Loader(dataset, split=split, batch_size=4, augment=augment, pca_sigma=0, mean="channel")
    seen = []
    for x, y in loader.epoch_batches(0):
        assert x.dtype == np.float32 and x.shape == (len(y), 3, 227, 227) and y.dtype == np.int64
        numbers = image_numbers(dataset, x)
        assert numbers == sorted(numbers)  # file order inside a batch
        assert y.tolist() == [n % 3 for n in numbers]
        seen += numbers
    assert sorted(seen) == sorted(split_numbers(dataset, split))


def test_same_seed_same_batches_and_epochs_differ(dataset):
    first = all_batches(Loader(dataset, batch_size=4, seed=5), epoch=2)
    assert_same_batches(first, all_batches(Loader(dataset, batch_size=4, seed=5), epoch=2))
    other_seed = all_batches(Loader(dataset, batch_size=4, seed=6), epoch=2)
    assert not np.array_equal(first[0][0], other_seed[0][0])

    loader = Loader(dataset, batch_size=4, seed=5, pca_sigma=0, mean="channel")
    orders = [[image_numbers(dataset, x) for x, _ in loader.epoch_batches(epoch)] for epoch in (0, 1, 0)]
    assert orders[0] == orders[2] and orders[0] != orders[1]


def test_resuming_at_a_batch_sees_what_an_uninterrupted_run_sees(dataset):
    loader = Loader(dataset, batch_size=4, seed=1)
    assert_same_batches(all_batches(loader, 3)[2:], all_batches(loader, 3, start=2))
    assert all_batches(loader, 3, start=len(loader)) == []


def test_validation_without_augmentation_is_deterministic(dataset):
    loader = Loader(dataset, split="val", batch_size=4, augment=False)
    assert_same_batches(all_batches(loader, 0), all_batches(loader, 7))
    x, _ = all_batches(loader, 0)[0]
    # the centre crop of a constant image minus the per-pixel mean is constant too
    np.testing.assert_allclose(x, x[:, :, :1, :1] * np.ones_like(x))


def test_scale_multiplies_the_input(dataset):
    plain = all_batches(Loader(dataset, batch_size=4, seed=2), 0)[0][0]
    scaled = all_batches(Loader(dataset, batch_size=4, seed=2, scale=1 / 255), 0)[0][0]
    np.testing.assert_allclose(scaled, plain / 255, rtol=1e-6)


def test_ten_crop(dataset):
    loader = Loader(dataset, split="val", batch_size=4, augment=False, ten_crop=True, crop=200)
    x, y = all_batches(loader, 0)[0]
    assert x.shape == (4, 10, 3, 200, 200) and x.dtype == np.float32
    centre, _ = all_batches(Loader(dataset, split="val", batch_size=4, augment=False, crop=200), 0)[0]
    np.testing.assert_array_equal(x[:, 4], centre)  # the 5th view is the centre crop
    with pytest.raises(ValueError, match="ten_crop"):
        Loader(dataset, batch_size=4, ten_crop=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_making_a_batch_reaches_the_caller(dataset, monkeypatch, workers):
    loader = Loader(dataset, batch_size=4, workers=workers)
    real_cut = loader.cut

    def failing(images, plan, out):
        if plan.number == 1:
            raise RuntimeError("cropping broke")
        real_cut(images, plan, out)

    monkeypatch.setattr(loader, "cut", failing)  # the workers are forked: they have it too
    batches = loader.epoch_batches(0)
    next(batches)
    with pytest.raises(RuntimeError, match="cropping broke"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def test_file_gone_after_construction(dataset, tmp_path):
    path = tmp_path / "copy.h5"
    path.write_bytes(dataset.read_bytes())
    loader = Loader(path, batch_size=4)
    path.unlink()
    with pytest.raises(DataError, match="no such dataset file"):
        all_batches(loader, 0)


def test_a_damaged_image_is_refused_in_one_line(dataset, tmp_path):
    path = tmp_path / "copy.h5"
    path.write_bytes(dataset.read_bytes())
    with h5py.File(path, "r") as f:  # where image 5's stored bytes lie in the file
        chunk = f["images"].id.get_chunk_info(5)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset)
        # random bytes: a run of one byte, checksum included, can pass a Fletcher checksum
        f.write(np.random.default_rng(5).bytes(chunk.size))
    loader = Loader(path, split="all", batch_size=4, augment=False)  # labels and statistics are intact
    batches = loader.epoch_batches(0)
    next(batches)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))} is damaged or truncated \\(.*\\)$"):
        next(batches)


def test_labels_beyond_the_classes_are_refused_before_loading(dataset, tmp_path):
    path = tmp_path / "copy.h5"
    path.write_bytes(dataset.read_bytes())
    with h5py.File(path, "a") as f:
        f["labels"][7] = 3
    with pytest.raises(DataError, match=r"is corrupt: image 7 has label 3, outside the 3 classes \(0\.\.2\)$"):
        Loader(path, batch_size=4)


def wait_for_threads(count, seconds=5):
    deadline = time.monotonic() + seconds
    while threading.active_count() > count and time.monotonic() < deadline:
        time.sleep(0.02)
    return threading.active_count()


def test_breaking_out_stops_the_thread(dataset):
    before = threading.active_count()
    loader = Loader(dataset, split="all", batch_size=1, prefetch=1)
    for _ in loader.epoch_batches(0):
        break
    gc.collect()
    assert wait_for_threads(before) == before
    batches = loader.epoch_batches(0)
    next(batches)
    batches.close()
    assert wait_for_threads(before) == before


def test_after_close_the_file_can_be_rewritten_at_once(dataset, tmp_path):
    """close() waits for the thread, so its read-only handle is gone: h5py would refuse to
    open the file for writing while this process still has it open for reading."""
    import shutil
    copy = tmp_path / "copy.h5"
    shutil.copyfile(dataset, copy)
    for _ in range(5):
        batches = Loader(copy, split="all", batch_size=1, prefetch=1).epoch_batches(0)
        next(batches)
        batches.close()
        with h5py.File(copy, "a") as f:
            f.attrs["touched"] = 1


def test_crop_larger_than_the_images(dataset):
    with pytest.raises(DataError, match=r"^crop 300x300 is larger than the stored 256x256 images$"):
        Loader(dataset, batch_size=4, crop=300)


def make_batch_as_before(loader, images, rng):
    """The loader's make_batch before its input was finished on the device (frozen here): the loader's batches
    must equal it bit for bit, so runs trained before and after see the same inputs."""
    from minidl.data.augment import (centre_crops, crop_and_flip, pca_lighting, random_crops, subtract_mean,
                                     ten_crops, to_nchw)

    def cropped(where):
        return subtract_mean(crop_and_flip(images, loader.crop, where), loader.mean, loader.crop, where)

    def to_input(x):
        x = to_nchw(x)
        if loader.scale != 1:
            x *= np.float32(loader.scale)
        return x
    if loader.augment:
        x = cropped(random_crops(rng, len(images), loader.image_size, loader.crop))
        if loader.pca_sigma > 0:
            x = pca_lighting(x, loader.lighting_scales, loader.eigvecs, rng, loader.pca_sigma)
        return to_input(x)
    if loader.ten_crop:
        views = ten_crops(len(images), loader.image_size, loader.crop)
        return np.stack([to_input(cropped(where)) for where in views], axis=1)
    return to_input(cropped(centre_crops(len(images), loader.image_size, loader.crop)))


@pytest.fixture(scope="module")
def random_dataset(tmp_path_factory):
    """Random images: every crop position, mirror and mean window shows."""
    path = tmp_path_factory.mktemp("data") / "random.h5"
    rng = np.random.default_rng(1)
    samples = ((rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), n % 3) for n in range(COUNT))
    write_dataset(path, samples, ["zero", "one", "two"], count=COUNT, val_fraction=0.2)
    return path


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("options", [dict(), dict(mean="channel", scale=1 / 255), dict(pca_sigma=0, scale=0.5),
                                     dict(split="val", augment=False), dict(split="val", augment=False,
                                                                            ten_crop=True, crop=200)])
def test_the_batches_are_those_of_before(random_dataset, options, workers):
    loader = Loader(random_dataset, batch_size=4, seed=7, workers=workers, **options)
    with open_dataset(random_dataset) as f:
        for i, (x, y) in enumerate(loader.epoch_batches(2)):
            positions = loader.batch_positions(2)[i]
            images = np.stack([f["images"][index] for index in loader.indices[positions]])
            expected = make_batch_as_before(loader, images, np.random.default_rng([7, 2, AUGMENT_STREAM, i]))
            np.testing.assert_array_equal(x, expected)
            same_draws = np.random.default_rng([7, 2, AUGMENT_STREAM, i])
            np.testing.assert_array_equal(loader.make_batch(images, same_draws), expected)
            np.testing.assert_array_equal(y, loader.labels[positions])


def sharded_batches_as_before(loader, epoch, rank, size):
    """The batches the ShardedLoader subclass gave (its _read_batches, frozen here): shard=(rank, size) must
    give exactly these, so existing and resumed data-parallel runs see the same data."""
    batches = []
    with open_dataset(loader.path) as f:
        images = f["images"]
        for i, positions in enumerate(loader.batch_positions(epoch)):
            mine = np.array_split(np.arange(len(positions)), size)[rank]
            own = np.stack([images[index] for index in loader.indices[positions[mine]]]) if len(mine) else \
                np.zeros((0,) + images.shape[1:], images.dtype)
            if not loader.augment:
                if len(mine):
                    batches.append((make_batch_as_before(loader, own, None), loader.labels[positions[mine]]))
                continue
            batch = np.zeros((len(positions),) + images.shape[1:], images.dtype)
            batch[mine] = own
            rng = np.random.default_rng([loader.seed, epoch, AUGMENT_STREAM, i])
            batches.append((make_batch_as_before(loader, batch, rng)[mine], loader.labels[positions[mine]]))
    return batches


@pytest.mark.parametrize("split, augment, batch_size, size", [("train", True, 8, 2), ("train", True, 7, 3),
                                                                ("val", False, 4, 3), ("all", False, 7, 2)])
def test_a_shard_gives_the_batches_the_sharded_loader_gave(dataset, split, augment, batch_size, size):
    """Each rank's rows and augmentation are those of the old ShardedLoader; together the shards are one
    process's batches (augmentation included), row for row."""
    whole = Loader(dataset, split=split, batch_size=batch_size, augment=augment, mean="channel", seed=3)
    single = all_batches(whole, 1)
    shards = []
    for rank in range(size):
        loader = Loader(dataset, split=split, batch_size=batch_size, augment=augment, mean="channel", seed=3,
                        shard=(rank, size))
        assert len(loader) == len(whole) and loader.num_images == whole.num_images
        shards.append(all_batches(loader, 1))
        assert_same_batches(shards[-1], sharded_batches_as_before(loader, 1, rank, size))
        assert_same_batches(all_batches(loader, 1, start=1), shards[-1][1:])  # resuming a shard
    if augment or all(len(y) >= size for _, y in single):  # every shard has rows of every batch
        joined = [(np.concatenate([s[i][0] for s in shards]), np.concatenate([s[i][1] for s in shards]))
                  for i in range(len(single))]
        assert_same_batches(joined, single)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0)])
def test_a_shard_outside_the_ranks_is_refused(dataset, shard):
    with pytest.raises(ValueError, match=r"^shard must be \(rank, size\) with 0 <= rank < size, got "):
        Loader(dataset, batch_size=4, shard=shard)
