"""prepare-data: an image folder -> a dataset file, with resizing, corrupt files and errors."""
import numpy as np
import pytest
from PIL import Image

from minidl.data.dataset import open_dataset
from minidl.data.prepare import prepare_image_folder, square_image
from minidl.errors import DataError

# (class, file name, width, height, mode): non-square sizes, up- and down-scaling, grey and RGBA
IMAGES = [
    ("cat", "a.png", 512, 256, "RGB"),
    ("cat", "b.jpg", 300, 450, "RGB"),
    ("cat", "c.png", 256, 256, "L"),
    ("dog", "a.png", 120, 80, "RGBA"),
    ("dog", "b.png", 256, 400, "RGB"),
    ("dog", "c.jpg", 640, 480, "RGB"),
    ("dog", "d.png", 333, 290, "RGB"),
    ("emu", "a.png", 260, 270, "RGB"),
]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls, name, width, height, mode in IMAGES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
        pixels = rng.integers(0, 256, (height, width) + channels, dtype=np.uint8)
        Image.fromarray(pixels).save(root / cls / name)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 these bytes are no image at all")
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_image_folder(image_folder, tmp_path, workers):
    out = tmp_path / "out" / "data.h5"
    calls = []
    result = prepare_image_folder(image_folder, out, workers=workers, val_fraction=0.25,
                                  progress=lambda done, total: calls.append((done, total)))
    assert result.written == 8
    assert result.class_counts == {"cat": 3, "dog": 4, "emu": 1}
    assert [path for path, _ in result.skipped] == [str(image_folder / "dog" / "broken.jpg")]
    assert calls[-1] == (9, 9)
    with open_dataset(out) as f:
        assert [n.decode() for n in f["class_names"][()]] == ["cat", "dog", "emu"]
        np.testing.assert_array_equal(f["labels"][()], [0, 0, 0, 1, 1, 1, 1, 2])
        images = f["images"][()]
        assert images.shape == (8, 256, 256, 3)
        # each stored image is the file put through the paper's preprocessing
        files = [image_folder / cls / name for cls, name, *_ in IMAGES]
        for stored, file in zip(images, files):
            with Image.open(file) as image:
                np.testing.assert_array_equal(stored, square_image(image))
        is_val = f["is_val"][()].astype(bool)
        assert is_val.sum() == 2
        train = images[~is_val].astype(np.float64)
        np.testing.assert_allclose(f["mean_image"][()], train.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(f["mean_rgb"][()], train.mean(axis=(0, 1, 2)), rtol=1e-6)
        pixels = train.reshape(-1, 3)
        centred = pixels - pixels.mean(axis=0)
        covariance = centred.T @ centred / len(pixels)
        np.testing.assert_allclose(f["pca_eigvals"][()], np.linalg.eigvalsh(covariance)[::-1], rtol=1e-5)
        # eigenvectors are defined up to sign (and nearly equal eigenvalues mix them): check they rebuild it
        eigvecs = f["pca_eigvecs"][()]
        np.testing.assert_allclose(eigvecs @ np.diag(f["pca_eigvals"][()]) @ eigvecs.T, covariance,
                                   atol=1e-5 * covariance.max())


def test_square_image_rescales_the_shorter_side_and_keeps_the_centre():
    rng = np.random.default_rng(1)
    landscape = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    np.testing.assert_array_equal(square_image(Image.fromarray(landscape)), landscape[:, 128:384])
    portrait = rng.integers(0, 256, (400, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(square_image(Image.fromarray(portrait)), portrait[72:328])
    # 1024x512: red | green (the central 512x512) | red; scaled by 1/2
    bands = np.zeros((512, 1024, 3), np.uint8)
    bands[:] = (255, 0, 0)
    bands[:, 256:768] = (0, 255, 0)
    out = square_image(Image.fromarray(bands))
    assert out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out[:, 8:-8], np.broadcast_to(np.uint8([0, 255, 0]), (256, 240, 3)))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"^no such image folder: {tmp_path / 'nope'}$"):
        prepare_image_folder(tmp_path / "nope", tmp_path / "d.h5")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="has no class subfolders"):
        prepare_image_folder(tmp_path, tmp_path / "d.h5")


def test_class_folders_without_files(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="has class subfolders but no files in them"):
        prepare_image_folder(tmp_path / "images", tmp_path / "d.h5")


def test_no_readable_image(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "images" / "cat" / "y.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images in .*: all 2 files failed to decode"):
        prepare_image_folder(tmp_path / "images", tmp_path / "d.h5", workers=1)
    assert not (tmp_path / "d.h5").exists()
