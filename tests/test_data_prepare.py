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
                                  progress=lambda *call: calls.append(call))
    assert result.written == 8
    assert result.class_counts == {"cat": 3, "dog": 4, "emu": 1}
    assert [path for path, _ in result.skipped] == [str(image_folder / "dog" / "broken.jpg")]
    decoding = [call for call in calls if call[0] == "decoding images"]
    assert decoding[0] == ("decoding images", 0, 9) and decoding[-1] == ("decoding images", 9, 9)
    assert calls[-2:] == [("finishing", 0, 1), ("finishing", 1, 1)]
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
        np.testing.assert_allclose(f["pca_eigvals"][()], np.linalg.eigvalsh(covariance)[::-1],
                                   rtol=1e-5)
        # eigenvectors are defined up to sign (and nearly equal eigenvalues mix them): check they
        # rebuild it
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
    np.testing.assert_array_equal(out[:, 8:-8],
                                  np.broadcast_to(np.uint8([0, 255, 0]), (256, 240, 3)))


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


# --- issue 24: refused before the work, not after it


def test_an_existing_out_is_refused_unless_overwrite(image_folder, tmp_path):
    out = tmp_path / "data.h5"
    out.write_bytes(b"precious")
    with pytest.raises(DataError,
                       match="data.h5 exists: give another name, or --overwrite to replace it"):
        prepare_image_folder(image_folder, out, workers=1)
    assert out.read_bytes() == b"precious"
    assert prepare_image_folder(image_folder, out, workers=1, overwrite=True).written == 8
    with pytest.raises(DataError, match="it is a folder"):
        prepare_image_folder(image_folder, tmp_path, workers=1, overwrite=True)


def test_out_is_never_one_of_its_own_images(image_folder):
    image = image_folder / "cat" / "a.png"
    before = image.read_bytes()
    for out in (image, image_folder / "cat" / ".." / "cat" / "a.png"):
        with pytest.raises(DataError, match="is one of the images in"):
            prepare_image_folder(image_folder, out, workers=1, overwrite=True)
    assert image.read_bytes() == before


def test_stale_temporaries_of_a_killed_run_are_removed(image_folder, tmp_path):
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer exists
    stale = tmp_path / f".data.h5.{dead.pid}.abc.h5.tmp"
    stale.write_bytes(b"half a dataset")
    prepare_image_folder(image_folder, tmp_path / "data.h5", workers=1)
    assert not stale.exists()


def test_an_empty_class_folder_is_no_class(image_folder, tmp_path):
    (image_folder / "aardvark").mkdir()
    result = prepare_image_folder(image_folder, tmp_path / "d.h5", workers=1)
    assert result.empty_folders == ["aardvark"]
    assert list(result.class_counts) == ["cat", "dog", "emu"]
    with open_dataset(tmp_path / "d.h5") as f:
        assert [n.decode() for n in f["class_names"][()]] == ["cat", "dog", "emu"]


@pytest.mark.parametrize("name, message", [
    (b"caf\xe9", r"class folder 'caf\\udce9' in .*: its name is not UTF-8"),
    (b"new\nline", r"class folder 'new\\nline' in .*: its name holds control"),
    (b"tab\t", r"its name holds control characters")])
def test_a_class_folder_name_no_picture_can_show_is_refused_before_decoding(
        image_folder, tmp_path, name, message, monkeypatch):
    import os
    os.mkdir(os.path.join(os.fsencode(image_folder), name))
    with open(os.path.join(os.fsencode(image_folder), name, b"x.png"), "wb") as f:
        f.write((image_folder / "cat" / "a.png").read_bytes())
    import minidl.data.prepare
    monkeypatch.setattr(minidl.data.prepare, "decode_file",
                        lambda path: pytest.fail("decoded before refusing"))
    with pytest.raises(DataError, match=message):
        prepare_image_folder(image_folder, tmp_path / "d.h5", workers=1)


def test_every_class_of_two_images_gets_a_validation_image(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls, count in (("big", 30), ("pair", 2), ("single", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    prepare_image_folder(root, tmp_path / "d.h5", workers=1, val_fraction=0.05)
    with open_dataset(tmp_path / "d.h5") as f:
        labels, is_val = f["labels"][()], f["is_val"][()].astype(bool)
    # 5% of 2 rounds to none, yet the pair keeps one to validate on and one to train on; a single
    # image trains
    assert np.bincount(labels[is_val], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[~is_val], minlength=3).tolist() == [28, 1, 1]


def test_no_class_of_two_images_is_refused_before_decoding(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        (tmp_path / "images" / cls / "x.jpg").write_bytes(b"one file")
    with pytest.raises(DataError, match="has two images: each class needs one to validate on"):
        prepare_image_folder(tmp_path / "images", tmp_path / "d.h5", workers=1)


@pytest.mark.parametrize("fraction", [0, 1, float("nan")])
def test_val_fraction_is_between_0_and_1(image_folder, tmp_path, fraction):
    with pytest.raises(DataError, match="val_fraction must be between 0 and 1"):
        prepare_image_folder(image_folder, tmp_path / "d.h5", workers=1, val_fraction=fraction)
