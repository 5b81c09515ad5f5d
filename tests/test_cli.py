"""End-to-end: the minidl command on tiny generated data."""
import os
import re

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from minidl.checkpoint import EPOCH_KEYS, load_checkpoint
from minidl.train import train
from minidl_cli.main import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
ALEXNET = os.path.join(ROOT, "models", "alexnet.py")

TINY_MODEL = '''
"""A tiny model file: the same contract as models/alexnet.py."""
from minidl.layers import Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU

CONFIG = dict(input_size=19, batch_size=4, epochs=2, lr=0.01, plateau_patience=5, input_scale=1 / 255)


class Tiny(Layer):
    def __init__(self, num_classes, devices, seed):
        super().__init__(device=None)
        d = devices[0]
        self.conv1 = Conv2d(3, 6, 5, stride=2, device=d, rng=seed)
        self.relu, self.pool, self.flat = ReLU(device=d), MaxPool2d(3, 2, device=d), Flatten(device=d)
        self.fc = Linear(6 * 3 * 3, num_classes, device=d, rng=seed + 1)
        self.input_device = self.output_device = self.conv1.device

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv1(x)))))


def build_model(num_classes, devices, init, seed):
    return Tiny(num_classes, devices, seed)
'''


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circles", "squares", "stripes"]):
        os.makedirs(root / name)
        for i in range(8):
            h, w = rng.integers(200, 400, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-dependent colour: something to learn
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "circles" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def dataset(image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny.h5"
    code, output = run("prepare-data", image_dir, out, "--val-fraction", "0.25")
    assert code == 0, output
    return out


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return path


def test_prepare_data_skips_the_corrupt_file(dataset, image_dir):
    with h5py.File(dataset) as f:
        assert f["images"].shape == (24, 256, 256, 3)
        assert sorted(set(f["labels"][()].tolist())) == [0, 1, 2]
    code, output = run("prepare-data", image_dir, dataset.parent / "again.h5")
    assert code == 0 and "broken.jpg" in output and "24 images" in output


def test_train_resume_equals_uninterrupted_run(dataset, tiny_model, tmp_path):
    straight = train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path / "a", log_every=1)
    # stop in the middle of the first epoch, then resume from the checkpoint
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path / "b", max_steps=2)
    stopped = load_checkpoint(tmp_path / "b" / "last.h5")
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (0, 2, 2)
    code, output = run("train", tiny_model, "--resume", tmp_path / "b" / "last.h5", "--out", tmp_path / "b",
                       "--devices", "cpu")
    assert code == 0, output
    assert "resuming at epoch 1, batch 2" in output
    a, b = load_checkpoint(tmp_path / "a" / "last.h5"), load_checkpoint(tmp_path / "b" / "last.h5")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
        np.testing.assert_array_equal(a.momentum[name], b.momentum[name], err_msg=name)
    for key in EPOCH_KEYS:  # the interval losses depend on where each run logged
        np.testing.assert_allclose(a.history[key], b.history[key], rtol=1e-12, err_msg=key)
    assert len(straight["val_top1"]) == 2 and a["epoch"] == 2


def test_train_evaluate_visualize_alexnet(dataset, tmp_path):
    out = tmp_path / "run"
    code, output = run("train", ALEXNET, "--data", dataset, "--epochs", "1", "--batch-size", "6",
                       "--devices", "cpu,cpu", "--out", out, "--log-every", "1")
    assert code == 0, output
    assert "img/s" in output and "validation: loss" in output and "top-5" in output
    assert re.search(r"best validation top-1 \d+\.\d% \(this run: \d+ min \d+ s of training\)", output), output
    for name in ("last.h5", "best.h5", "curves.png"):
        assert (out / name).exists(), name
    code, output = run("evaluate", out / "last.h5", "--data", dataset, "--ten-crop", "--devices", "cpu")
    assert code == 0, output
    assert "10-crop: top-1" in output
    png = tmp_path / "filters.png"
    code, output = run("visualize-filters", out / "last.h5", "-o", png)
    assert code == 0, output
    assert "96 conv1 kernels" in output
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # the tiles differ


def test_summary_command():
    code, output = run("summary", ALEXNET, "--devices", "cpu")
    assert code == 0, output
    assert "60,965,224" in output and "cpu" in output


@pytest.mark.parametrize("make_args, message", [
    (lambda d, m, t: ["train", t / "nope.py", "--data", d], "no such model file"),
    (lambda d, m, t: ["train", t / "empty.py", "--data", d], "defines no model"),
    (lambda d, m, t: ["train", m, "--data", t / "nope.h5"], "no such dataset file"),
    (lambda d, m, t: ["train", m, "--data", t / "text.h5"], "not an HDF5 file"),
    (lambda d, m, t: ["train", m, "--data", t / "other.h5"], "not a minidl dataset"),
    (lambda d, m, t: ["train", m, "--data", d, "--devices", "tpu:0"], "unknown device"),
    (lambda d, m, t: ["train", t / "huge.py", "--data", d], "crop"),
    (lambda d, m, t: ["evaluate", t / "nope.h5", "--data", d], "no such checkpoint"),
    (lambda d, m, t: ["evaluate", t / "text.h5", "--data", d], "not a minidl checkpoint"),
    (lambda d, m, t: ["visualize-filters", t / "other.h5"], "not a minidl checkpoint"),
])
def test_bad_input_gives_one_line(dataset, tiny_model, tmp_path, make_args, message):
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "text.h5").write_text("hello")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    (tmp_path / "huge.py").write_text(TINY_MODEL.replace("input_size=19", "input_size=300"))
    code, output = run(*make_args(dataset, tiny_model, tmp_path))
    assert code != 0
    lines = output.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1], output
    assert "Traceback" not in output


@pytest.mark.parametrize("args, option", [
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--resume", "last.h5", "--epochs", "-3"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--log-every", "0"], "--log-every"),
    (["evaluate", "last.h5", "--data", "d.h5", "--batch-size", "0"], "--batch-size"),
    (["bench", "m.py", "--steps", "0"], "--steps"),
    (["prepare-data", "images", "out.h5", "--workers", "0"], "--workers"),
])
def test_numbers_out_of_range_are_refused_before_any_work(args, option):
    code, output = run(*args)
    assert code == 2 and f"Invalid value for '{option}'" in output and "Traceback" not in output, output


def test_truncated_checkpoint_and_labels_beyond_classes(dataset, tiny_model, tmp_path):
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    ckpt = tmp_path / "last.h5"
    data = ckpt.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    code, output = run("evaluate", tmp_path / "cut.h5", "--data", dataset)
    assert code != 0 and "error:" in output and "Traceback" not in output
    # a model with 3 classes evaluated on a dataset with 4 classes
    bigger = tmp_path / "bigger.h5"
    with h5py.File(dataset) as src, h5py.File(bigger, "w") as dst:
        for key in src:
            src.copy(key, dst)
        dst.attrs.update(src.attrs)
        labels = dst["labels"][()]
        labels[0] = 3
        dst["labels"][...] = labels
        del dst["class_names"]
        dst["class_names"] = np.array(["a", "b", "c", "d"], dtype=h5py.string_dtype())
    code, output = run("evaluate", ckpt, "--data", bigger, "--split", "all", "--model", tiny_model)
    assert code != 0 and "labels beyond the model's classes" in output


def test_resume_refuses_what_would_make_another_run(dataset, image_dir, tiny_model, tmp_path):
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    last = tmp_path / "last.h5"
    other = tmp_path / "other.h5"  # the same images, another validation split: another dataset
    assert run("prepare-data", image_dir, other, "--val-fraction", "0.25", "--seed", "1")[0] == 0
    for option, message in ((["--batch-size", "8"], "--batch-size 8 differs from the resumed run's (4)"),
                            (["--init", "paper"], "--init paper differs from the resumed run's (he)"),
                            (["--seed", "5"], "--seed 5 differs from the resumed run's (0)"),
                            (["--data", other], f"{other} is not the dataset {last} was trained on")):
        code, output = run("train", tiny_model, "--resume", last, "--out", tmp_path, *option)
        lines = output.strip().splitlines()
        assert code != 0 and lines[-1].startswith("error: ") and message in lines[-1], output
        assert "Traceback" not in output
    # what may change: the number of epochs, and where it runs
    code, output = run("train", tiny_model, "--resume", last, "--out", tmp_path, "--epochs", "1", "--batch-size", "4",
                       "--devices", "cpu")
    assert code == 0 and "resuming at epoch 1, batch 1" in output and "1 epochs" in output, output


@pytest.mark.gpu
def test_resume_runs_on_the_devices_it_was_trained_on(dataset, tiny_model, tmp_path):
    train(tiny_model, data=dataset, devices=("cuda:0", "cuda:0"), out_dir=tmp_path, max_steps=1)
    code, output = run("train", tiny_model, "--resume", tmp_path / "last.h5", "--out", tmp_path, "--epochs", "1")
    assert code == 0 and "on cuda:0, cuda:0" in output, output
