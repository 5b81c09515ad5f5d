"""The dataset file: layout, statistics, split, atomic writing and the checks on opening."""
import contextlib
import os
import re

import h5py
import numpy as np
import pytest

from minidl.data.dataset import (choose_validation, dataset_info, open_dataset, storage_of, stored_images,
                                 write_dataset)
from minidl.errors import DataError


def random_samples(count, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
             i % num_classes) for i in range(count)]


def smooth_samples(count, num_classes, seed=0):
    """Images a JPEG keeps closely (random noise it does not): two colour gradients crossed."""
    rng = np.random.default_rng(seed)
    down, across = np.mgrid[0:1:256j, 0:1:256j]
    samples = []
    for i in range(count):
        image = (down[..., None] * rng.uniform(0, 255, 3) + across[..., None] * rng.uniform(0, 255, 3)) / 2
        samples.append((image.astype(np.uint8), i % num_classes))
    return samples


@pytest.mark.parametrize("storage, version, compression", [("raw", 1, None), ("gzip", 1, "gzip"),
                                                            ("jpeg", 2, None)])
def test_write_dataset_layout_and_statistics(tmp_path, storage, version, compression):
    samples = smooth_samples(20, 3) if storage == "jpeg" else random_samples(20, 3)
    path = tmp_path / "d.h5"
    calls = []
    written = write_dataset(path, iter(samples), ["a", "b", "c"], count=20, val_fraction=0.25,
                            progress=lambda done, total: calls.append((done, total)), storage=storage)
    assert written == 20 and calls[-1] == (20, 20) and len(calls) == 20
    with open_dataset(path) as f:
        assert dict(f.attrs) == {"format": "minidl-dataset", "version": version, "image_size": 256}
        assert storage_of(f) == storage
        images = stored_images(f)
        assert images.dtype == np.uint8 and images.shape == (20, 256, 256, 3)
        stored = np.stack([images[i] for i in range(20)])
        expected = np.stack([image for image, _ in samples])
        if storage == "jpeg":  # lossy, slightly: the statistics are of what is read back
            assert np.abs(stored.astype(int) - expected).mean() < 2
        else:
            assert f["images"].chunks == (1, 256, 256, 3) and f["images"].compression == compression
            assert f["images"].fletcher32 == (storage == "raw")
            np.testing.assert_array_equal(stored, expected)
        np.testing.assert_array_equal(f["labels"][()], [label for _, label in samples])
        assert f["labels"].dtype == np.int64
        assert [n.decode() for n in f["class_names"][()]] == ["a", "b", "c"]
        is_val = f["is_val"][()].astype(bool)
        train = stored[~is_val].astype(np.float64)
        np.testing.assert_allclose(f["mean_image"][()], train.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(f["mean_rgb"][()], train.mean(axis=(0, 1, 2)), rtol=1e-6)
        covariance = np.cov(train.reshape(-1, 3).T, bias=True)
        eigvals, eigvecs = f["pca_eigvals"][()], f["pca_eigvecs"][()]
        assert eigvals[0] >= eigvals[1] >= eigvals[2]
        # float32 storage: compare to the size of the covariance
        np.testing.assert_allclose(eigvecs @ np.diag(eigvals) @ eigvecs.T, covariance,
                                   atol=1e-5 * covariance.max())
        np.testing.assert_allclose(eigvecs.T @ eigvecs, np.eye(3), atol=1e-6)
    assert is_val.sum() == 5


def test_a_file_written_before_storages_is_read(tmp_path):
    """Files of format version 1 (gzip, no storage choice) as minidl wrote them: read as they are."""
    path = tmp_path / "old.h5"
    samples = random_samples(4, 2)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.stack([s for s, _ in samples]), chunks=(1, 256, 256, 3),
                         compression="gzip", compression_opts=4)
        f["labels"] = np.array([label for _, label in samples], np.int64)
        f.create_dataset("class_names", data=["a", "b"], dtype=h5py.string_dtype("utf-8"))
        f["is_val"] = np.array([0, 0, 1, 1], np.uint8)
        f["mean_image"] = np.zeros((256, 256, 3), np.float32)
        f["mean_rgb"], f["pca_eigvals"], f["pca_eigvecs"] = np.zeros(3), np.ones(3), np.eye(3)
        f.attrs.update(format="minidl-dataset", version=1, image_size=256)
    with open_dataset(path) as f:
        assert storage_of(f) == "gzip"
        np.testing.assert_array_equal(stored_images(f)[2], samples[2][0])


def test_a_damaged_jpeg_is_refused_in_one_line(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(path, smooth_samples(2, 1), ["a"], count=2, storage="jpeg")
    with h5py.File(path, "a") as f:
        f["jpeg"][1] = np.frombuffer(b"\xff\xd8 not a picture", np.uint8)
    with open_dataset(path) as f:
        stored_images(f)[0]
        with pytest.raises(DataError, match=f"^{re.escape(str(path))} is damaged or truncated \\(a stored JPEG"):
            stored_images(f)[1]


def test_a_jpeg_of_another_size_is_refused_before_decoding(tmp_path):
    import io

    from PIL import Image
    path = tmp_path / "d.h5"
    write_dataset(path, smooth_samples(2, 1), ["a"], count=2, storage="jpeg")
    big = io.BytesIO()
    Image.new("RGB", (300, 256)).save(big, "JPEG")
    with h5py.File(path, "a") as f:
        f["jpeg"][0] = np.frombuffer(big.getvalue(), np.uint8)
    with open_dataset(path) as f, pytest.raises(DataError, match="is corrupt: a stored JPEG is RGB 300x256"):
        stored_images(f)[0]


def test_a_damaged_raw_image_is_refused_by_its_checksum(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(path, random_samples(3, 1), ["a"], count=3)
    with h5py.File(path, "r") as f:
        chunk = f["images"].id.get_chunk_info(1)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset + 1000)
        f.write(b"\x00\x01\x02")
    from minidl.hdf5 import FileCheck
    with open_dataset(path) as f, pytest.raises(DataError, match="is damaged or truncated"):
        with FileCheck(str(path), "dataset", DataError).reading():
            stored_images(f)[1]


def test_unknown_storage(tmp_path):
    with pytest.raises(DataError, match="^unknown storage 'lzf': use one of raw, gzip, jpeg$"):
        write_dataset(tmp_path / "d.h5", random_samples(1, 1), ["a"], count=1, storage="lzf")


def test_split_is_seeded_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    is_val = choose_validation(labels, 4, 0.1, seed=3)
    assert is_val.sum() == 10
    assert list(np.bincount(labels[is_val], minlength=4)) == [1, 2, 3, 4]
    np.testing.assert_array_equal(is_val, choose_validation(labels, 4, 0.1, seed=3))
    assert not np.array_equal(is_val, choose_validation(labels, 4, 0.1, seed=4))
    # uneven shares: the total stays round(fraction * N), one training image at least
    assert choose_validation(np.arange(7) % 3, 3, 0.5, seed=0).sum() == 4
    assert choose_validation(np.zeros(1, dtype=np.int64), 1, 0.9, seed=0).sum() == 0


def test_fewer_samples_than_count_shrinks_the_file(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(path, random_samples(5, 2), ["a", "b"], count=9, val_fraction=0.2)
    info = dataset_info(path)
    # each class keeps one for validation
    assert (info.num_images, info.num_train, info.num_val) == (5, 3, 2)
    assert info.class_names == ("a", "b") and info.num_classes == 2 and info.image_size == 256


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(path, random_samples(3, 1), ["a"], count=3)
    before = path.read_bytes()

    def broken_samples():
        yield from random_samples(2, 1)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dataset(path, broken_samples(), ["a"], count=3)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["d.h5"]


@pytest.mark.parametrize("samples, message", [
    ([], "no images to write to"),
    ([(np.zeros((256, 256, 3), np.uint8), 5)], "has label 5, outside the 2 classes"),
    ([(np.zeros((200, 256, 3), np.uint8), 0)], r"expected uint8 \(256, 256, 3\)"),
    ([(np.zeros((256, 256, 3), np.uint8), 0)] * 3, "more images than the count=2"),
])
def test_write_dataset_rejects_bad_samples(tmp_path, samples, message):
    with pytest.raises(DataError, match=message):
        write_dataset(tmp_path / "d.h5", samples, ["a", "b"], count=2)
    assert os.listdir(tmp_path) == []


def test_open_missing_file(tmp_path):
    path = tmp_path / "nothing.h5"
    with pytest.raises(DataError, match=f"^no such dataset file: {path}$"):
        open_dataset(path)


def test_open_non_hdf5_file(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("just some text")
    with pytest.raises(DataError, match=f"^{path} is not a minidl dataset \\(not an HDF5 file\\)$"):
        open_dataset(path)


def test_open_hdf5_file_without_format(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros(3)
    with pytest.raises(DataError,
                       match=f"^{path} is not a minidl dataset \\(no 'minidl-dataset' format "
                             "mark\\)$"):
        open_dataset(path)


def test_open_dataset_missing_a_part(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(path, random_samples(2, 1), ["a"], count=2)
    with h5py.File(path, "a") as f:
        del f["pca_eigvecs"]
    with pytest.raises(DataError, match=r"is not a minidl dataset \(missing 'pca_eigvecs'\)$"):
        open_dataset(path)


def test_unwritable_destination(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="^cannot write .*a_file/d.h5"):
        write_dataset(tmp_path / "a_file" / "d.h5", random_samples(1, 1), ["a"], count=1)


def _replace(name, data=None, **create):
    def change(f):
        del f[name]
        f.create_dataset(name, data=data, **create)
    return change


def _set(name, index, value):
    def change(f):
        f[name][index] = value
    return change


def _instead(name, make):
    """name replaced by what make(f, name) puts there (a group, a link)."""
    def change(f):
        del f[name]
        make(f, name)
    return change


def _set_attr(key, value):
    def change(f):
        f.attrs[key] = value
    return change


@pytest.mark.parametrize("change, message", [
    # headers that claim more than any memory holds are refused before anything is read
    (lambda f: f["images"].resize(10 ** 12, axis=0),
     "is corrupt: 'images' is uint8 of shape (1000000000000, 256, 256, 3), "
     "expected uint8 of shape (0..100000000, 1..4096, 1..4096, 3)"),
    (_replace("class_names", shape=(10 ** 12,), dtype=h5py.string_dtype(), chunks=(1,)),
     "is corrupt: 'class_names' is strings of shape (1000000000000,), "
     "expected string of shape (1..4,)"),
    (_replace("labels", shape=(10 ** 12,), dtype=np.int64, chunks=(1,)),
     "is corrupt: 'labels' is int64 of shape (1000000000000,), expected integer of shape (4,)"),
    (_replace("images", np.zeros((4, 256, 200, 3), np.uint8)),
     "is corrupt: images are 256x200, not square"),
    (_replace("images", np.zeros((4, 256, 256, 3), np.float32)),
     "is corrupt: 'images' is float32 of shape (4, 256, 256, 3), "
     "expected uint8 of shape (0..100000000, 1..4096, 1..4096, 3)"),
    (_set("labels", 1, 2), "is corrupt: image 1 has label 2, outside the 2 classes (0..1)"),
    (_set("labels", 3, -1), "is corrupt: image 3 has label -1, outside the 2 classes (0..1)"),
    (_replace("labels", np.zeros(4)),
     "is corrupt: 'labels' is float64 of shape (4,), expected integer of shape (4,)"),
    (_replace("labels", np.zeros(3, np.int64)),
     "is corrupt: 'labels' is int64 of shape (3,), expected integer of shape (4,)"),
    (_replace("class_names", [1, 2]),
     "is corrupt: 'class_names' is int64 of shape (2,), expected string of shape (1..4,)"),
    (_replace("class_names", np.array([b"a", b"\xff"])),
     "is corrupt: 'class_names' is not UTF-8 text"),
    (_set("is_val", 0, 2), "is corrupt: 'is_val' holds values other than 0 and 1"),
    (_replace("mean_image", np.zeros((256, 256))),
     "is corrupt: 'mean_image' is float64 of shape (256, 256), "
     "expected floating of shape (256, 256, 3)"),
    (_replace("mean_image", np.zeros((256, 256, 3), np.int32)),
     "is corrupt: 'mean_image' is int32 of shape (256, 256, 3), "
     "expected floating of shape (256, 256, 3)"),
    (_set("mean_rgb", 1, np.nan), "is corrupt: 'mean_rgb' holds NaN or infinity"),
    (_replace("pca_eigvals", np.array(["1", "2", "3"], dtype=object), dtype=h5py.string_dtype()),
     "is corrupt: 'pca_eigvals' is strings of shape (3,), expected floating of shape (3,)"),
    (_replace("pca_eigvecs", np.eye(3)[0]),
     "is corrupt: 'pca_eigvecs' is float64 of shape (3,), expected floating of shape (3, 3)"),
    (_set("pca_eigvecs", (0, 0), np.inf), "is corrupt: 'pca_eigvecs' holds NaN or infinity"),
    (_replace("pca_eigvals", h5py.Empty("f4")),
     "is corrupt: 'pca_eigvals' is an empty dataspace, expected floating of shape (3,)"),
    (_set_attr("image_size", 128),
     "is corrupt: attribute 'image_size' is 128, expected a whole number in 256..256"),
    (_set_attr("version", "one"),
     "is corrupt: attribute 'version' is 'one', expected a whole number >= 1"),
    (_set_attr("version", 3), "is a version 3 dataset; this minidl reads version 2"),
    (_instead("mean_rgb", lambda f, name: f.create_group(name)),
     "is corrupt: 'mean_rgb' is not a dataset"),
    (_instead("labels",
              lambda f, name: f.__setitem__(name, h5py.ExternalLink("other.h5", "/labels"))),
     "is corrupt: 'labels' is a link, not stored in the file"),
])
def test_a_crafted_or_damaged_dataset_is_refused_in_one_line(tmp_path, change, message):
    path = tmp_path / "d.h5"
    write_dataset(path, random_samples(4, 2), ["a", "b"], count=4, val_fraction=0.25)
    with h5py.File(path, "a") as f:
        change(f)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))} {re.escape(message)}$"):
        dataset_info(path)


def test_a_truncated_dataset_is_refused_in_one_line(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(path, random_samples(2, 1), ["a"], count=2)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataError,
                       match=f"^{re.escape(str(path))} is not a readable HDF5 file \\(.*truncated "
                             "file"):
        open_dataset(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_reads_every_storage_alike(tmp_path, workers):
    """The training loader delivers the same batches from raw, gzip and jpeg files, up to JPEG's loss."""
    from minidl.data import Loader
    samples = smooth_samples(8, 2)
    batches = {}
    for storage in ("raw", "gzip", "jpeg"):
        path = tmp_path / f"{storage}.h5"
        write_dataset(path, samples, ["a", "b"], count=8, storage=storage)
        loader = Loader(path, split="all", batch_size=4, augment=True, seed=3, workers=workers)
        with contextlib.closing(loader.epoch_batches(0)) as epoch:
            batches[storage] = [(x.copy(), y.copy()) for x, y in epoch]
    for (raw_x, raw_y), (gzip_x, gzip_y), (jpeg_x, jpeg_y) in zip(*batches.values()):
        np.testing.assert_array_equal(raw_x, gzip_x)
        np.testing.assert_array_equal(raw_y, jpeg_y)
        assert np.abs(jpeg_x - raw_x).mean() < 1.0  # under one level of 0..255 on average: quality 90, smooth images
