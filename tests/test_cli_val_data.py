"""The minidl command: prepare-data's storages, progress and labels file, and train --val-data."""
import os

import numpy as np
import pytest
from PIL import Image

from minidl.data.dataset import dataset_info
from minidl.training.checkpoint import load_checkpoint
from test_cli import TINY_MODEL, run


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A class-folder training set and a flat validation folder with its labels file (FILENAME LABEL)."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    lines = []
    for c, name in enumerate(["blue", "green", "red"]):
        os.makedirs(root / "train" / name)
        for i in range(6):
            pixels = rng.integers(0, 256, (260, 300, 3), dtype=np.uint8)
            pixels[..., 2 - c] = 255
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
        os.makedirs(root / "val", exist_ok=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (280, 256, 3), dtype=np.uint8)
            pixels[..., 2 - c] = 255
            Image.fromarray(pixels).save(root / "val" / f"{name}{i}.png")
            lines.append(f"{name}{i}.png {name}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    code, output = run("prepare-data", root / "train", root / "train.h5", "--workers", "2")
    assert code == 0, output
    return root


def test_prepare_data_reports_progress_with_a_rate_off_a_terminal(folders, tmp_path):
    code, output = run("prepare-data", folders / "train", tmp_path / "j.h5", "--storage", "jpeg", "--workers", "1")
    assert code == 0, output
    assert "decoding images: 18/18 (100%)" in output and "/s" in output and "finishing: 1/1" in output
    assert dataset_info(tmp_path / "j.h5").num_images == 18


def test_prepare_data_labels_then_train_with_val_data(folders, tmp_path):
    val = tmp_path / "val.h5"
    code, output = run("prepare-data", folders / "val", val, "--labels", folders / "labels.txt",
                       "--classes-from", folders / "train.h5", "--workers", "1")
    assert code == 0 and "6 images in 3 classes" in output, output
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    code, output = run("train", model, "--data", folders / "train.h5", "--val-data", val, "--devices", "cpu",
                       "--epochs", "1", "--out", tmp_path / "run")
    assert code == 0, output
    assert "training on" in output and "18 train / 6 val images" in output, output  # all of train.h5 trains
    checkpoint = load_checkpoint(tmp_path / "run" / "last.h5")
    assert checkpoint["val_data"] == os.path.abspath(val)
    # resumed, it validates on the same file without being told; another one is refused
    code, output = run("train", model, "--resume", tmp_path / "run" / "last.h5", "--epochs", "2", "--devices", "cpu")
    assert code == 0 and "18 train / 6 val images" in output, output


def test_val_data_of_other_classes_is_refused_in_one_line(folders, tmp_path):
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        os.makedirs(other / name)
        for i in range(2):
            Image.new("RGB", (256, 256), (i * 100, 0, 0)).save(other / name / f"{i}.png")
    assert run("prepare-data", other, tmp_path / "other.h5", "--workers", "1")[0] == 0
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    code, output = run("train", model, "--data", folders / "train.h5", "--val-data", tmp_path / "other.h5",
                       "--devices", "cpu", "--out", tmp_path / "run")
    assert code == 1 and output.count("\n") == 1, output
    assert "does not have the classes of" in output and "--classes-from" in output


@pytest.mark.parametrize("args, message", [
    (["--labels", "labels.txt"], "a labels file needs the training dataset whose classes it names"),
    (["--labels", "missing.txt", "--classes-from", "train.h5"], "cannot read the labels file"),
    (["--classes-from", "nothing.h5", "--labels", "labels.txt"], "no such dataset file"),
])
def test_prepare_data_bad_labels_options_in_one_line(folders, tmp_path, args, message):
    args = [folders / a if a.endswith((".txt", ".h5")) else a for a in args]
    code, output = run("prepare-data", folders / "val", tmp_path / "v.h5", *args)
    assert code == 1 and output.count("\n") == 1 and message in output, output
