"""End-to-end: the minidl command on tiny generated data."""
import errno
import os
import re

import click
import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from minidl.training.checkpoint import EPOCH_KEYS, load_checkpoint
from minidl.errors import MinidlError
from minidl.training.train import train
from minidl_cli.main import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
ALEXNET = os.path.join(ROOT, "models", "alexnet.py")

TINY_MODEL = '''
"""A tiny model file: the same contract as models/alexnet.py."""
from minidl.layers import Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU

CONFIG = dict(momentum=0.9, weight_decay=0.0005, lr_drop_factor=10, lr_drops=3, init="he",
              devices=("cuda:0", "cuda:1"))
CONFIG.update(input_size=19, batch_size=4, epochs=2, lr=0.01, plateau_patience=5, input_scale=1 / 255)


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


# --- issue 24: what was accepted and then refused, or failed late with a traceback


def one_line_error(code, output, *words):
    """The command failed with one `error:` line holding every word, and no traceback."""
    last = output.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: ") and "Traceback" not in output, output
    for word in words:
        assert str(word) in last, output


@pytest.mark.parametrize("entry", ["epochs=2.0", "lr_drop_factor=0", "lr_drops=-1", "plateau_patience=-3",
                                   "batch_size='abc'", "lr='abc'", "input_scale=float('nan')"])
def test_a_recipe_the_checkpoint_reader_would_refuse_is_refused_before_the_first_step(dataset, tmp_path, entry):
    model = tmp_path / "recipe.py"
    model.write_text(TINY_MODEL + f"\nCONFIG.update({entry})\n")
    for args in (["train", model, "--data", dataset, "--devices", "cpu", "--out", tmp_path / "o"],
                 ["summary", model, "--devices", "cpu"], ["bench", model, "--devices", "cpu", "--steps", "1"]):
        code, output = run(*args)
        one_line_error(code, output, model, f"config entry '{entry.split('=')[0]}'")
    assert not (tmp_path / "o").exists()


def test_a_resumed_recipe_is_checked_by_the_same_rules(dataset, tiny_model, tmp_path):
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    with pytest.raises(MinidlError, match=r"last.h5: config entry 'epochs' is 2.5, expected a whole number"):
        train(tiny_model, resume=tmp_path / "last.h5", devices="cpu", out_dir=tmp_path, epochs=2.5)


@pytest.mark.parametrize("body, message", [
    (TINY_MODEL + "\ndef build_model(num_classes, devices, init, seed):\n    return None\n",
     "build_model returned NoneType"),
    (TINY_MODEL + "\nCONFIG['devices'] = 5\n", "config entry 'devices' is 5, expected a list of 1 to 64 device"),
    (TINY_MODEL + "\nimport numpy as np\ndef build_model(num_classes, devices, init, seed):\n"
     "    return np.empty(2 ** 50)  # 8 PiB\n", "not enough memory for the model's parameters"),
    (TINY_MODEL + "\ndel CONFIG\n", "defines no CONFIG dict"),
    (TINY_MODEL + "\ndel CONFIG['lr'], CONFIG['momentum']\n", "CONFIG lacks lr, momentum"),
    (TINY_MODEL.replace("self.input_device = self.output_device = self.conv1.device", "pass"),
     "has no input_device or output_device"),
])
def test_a_model_file_whose_build_model_gives_no_usable_model(dataset, tmp_path, body, message):
    model = tmp_path / "bad.py"
    model.write_text(body)
    for args in (["train", model, "--data", dataset, "--devices", "cpu", "--out", tmp_path / "o", "--batch-size", 4],
                 ["summary", model, "--devices", "cpu"], ["bench", model, "--devices", "cpu", "--steps", "1"]):
        code, output = run(*args)
        one_line_error(code, output, model, message)


def test_a_checkpoint_naming_fewer_devices_than_the_model_has_parts(dataset, tmp_path):
    two_towers = tmp_path / "two.py"  # needs its second device, as AlexNet's second tower does
    two_towers.write_text(TINY_MODEL.replace("d = devices[0]", "d = devices[1]"))
    train(two_towers, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    with h5py.File(tmp_path / "last.h5", "a") as f:
        f.attrs["devices"] = '["cpu"]'
    code, output = run("evaluate", tmp_path / "last.h5", "--data", dataset, "--model", two_towers)
    assert code == 0 and "top-1" in output, output


def test_predict_refuses_a_model_with_more_outputs_than_class_names(dataset, image_dir, tmp_path):
    wider = tmp_path / "wider.py"  # ignores num_classes
    wider.write_text(TINY_MODEL.replace("return Tiny(num_classes,", "return Tiny(num_classes + 2,"))
    train(wider, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    code, output = run("predict", tmp_path / "last.h5", image_dir / "circles" / "0.jpg", "-o", tmp_path / "p.png",
                       "--model", wider)
    one_line_error(code, output, wider, "5 outputs", "3 classes")


def test_training_refuses_a_dataset_without_validation_images(dataset, tiny_model, tmp_path):
    no_val = tmp_path / "no-val.h5"
    with h5py.File(dataset) as src, h5py.File(no_val, "w") as dst:
        for key in src:
            src.copy(key, dst)
        dst.attrs.update(src.attrs)
        dst["is_val"][...] = 0
    code, output = run("train", tiny_model, "--data", no_val, "--devices", "cpu", "--out", tmp_path / "o")
    one_line_error(code, output, "has no validation images")
    assert not (tmp_path / "o" / "last.h5").exists()


@pytest.mark.parametrize("args, option", [
    (["train", "--seed", 2 ** 70], "--seed"),
    (["train", "--seed", 2 ** 63], "--seed"),
    (["train", "--checkpoint-seconds", "nan"], "--checkpoint-seconds"),
    (["prepare-data", "images", "out.h5", "--seed", 2 ** 70], "--seed"),
    (["prepare-data", "images", "out.h5", "--val-fraction", "0"], "--val-fraction"),
    (["prepare-data", "images", "out.h5", "--val-fraction", "nan"], "--val-fraction"),
    (["prepare-data", "images", "out.h5", "--val-fraction", "1"], "--val-fraction"),
    (["summary", "m.py", "--classes", 10 ** 12], "--classes"),
])
def test_more_numbers_out_of_range_are_refused_before_any_work(args, option):
    code, output = run(*args)
    assert code == 2 and f"Invalid value for '{option}'" in output and "Traceback" not in output, output


def test_the_largest_seed_is_one_a_checkpoint_keeps(dataset, tiny_model, tmp_path):
    code, output = run("train", tiny_model, "--data", dataset, "--devices", "cpu", "--out", tmp_path, "--epochs", "1",
                       "--seed", 2 ** 63 - 1)
    assert code == 0, output
    assert load_checkpoint(tmp_path / "last.h5")["seed"] == 2 ** 63 - 1


def test_devices_naming_no_device_are_refused(dataset, tiny_model, tmp_path):
    for devices in (",", " , "):
        code, output = run("train", tiny_model, "--data", dataset, "--devices", devices, "--out", tmp_path)
        one_line_error(code, output, "no device in")


def test_bench_refuses_a_batch_larger_than_the_memory_before_allocating_it(tiny_model):
    code, output = run("bench", tiny_model, "--devices", "cpu", "--batch-size", 10 ** 8)
    one_line_error(code, output, "a batch of 100000000 needs about", "use --batch-size")


def full_disk(monkeypatch):
    """Every atomic write fails as on a full disk, after its temporary was written."""
    import minidl.atomic

    def no_space(path, flags):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(minidl.atomic, "_fsync", no_space)


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(dataset, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=out, max_steps=1)
    before = (out / "last.h5").read_bytes()
    full_disk(monkeypatch)
    code, output = run("train", tiny_model, "--resume", out / "last.h5", "--out", out, "--devices", "cpu")
    one_line_error(code, output, f"cannot write {out / 'last.h5'}: No space left on device")
    assert (out / "last.h5").read_bytes() == before
    assert sorted(os.listdir(out)) == [".lock", "last.h5", "metrics.jsonl"]  # no temporary left


def test_a_full_disk_in_the_other_writers_is_one_line(dataset, image_dir, tiny_model, tmp_path, monkeypatch):
    tmp_path = tmp_path / "run"
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    checkpoint = tmp_path / "last.h5"
    old = tmp_path / "old.h5"
    old.write_bytes(b"a dataset")
    full_disk(monkeypatch)
    for args, target in ((["visualize-filters", checkpoint, "-o", tmp_path / "f.png"], tmp_path / "f.png"),
                         (["predict", checkpoint, image_dir / "circles" / "0.jpg", "-o", tmp_path / "p.jpg", "--model", tiny_model],
                          tmp_path / "p.jpg"),
                         (["prepare-data", image_dir, old, "--overwrite", "--workers", "1"], old)):
        code, output = run(*args)
        one_line_error(code, output, f"cannot write {target}: No space left on device")
    assert old.read_bytes() == b"a dataset"
    assert sorted(os.listdir(tmp_path)) == [".lock", "last.h5", "metrics.jsonl", "old.h5"]


def test_pictures_are_refused_before_the_work_where_they_cannot_be_written(tiny_model, dataset, image_dir, tmp_path):
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    checkpoint = tmp_path / "last.h5"
    picture = image_dir / "circles" / "0.jpg"
    for output, message in ((tmp_path, "it is a folder"), (tmp_path / "nope" / "f.png", "is not a writable folder"),
                            (tmp_path / "f.gif", "a picture's name ends in .png, .jpg, .jpeg")):
        for args in (["visualize-filters", checkpoint], ["predict", checkpoint, picture],
                     ["retrieve", checkpoint, "--data", dataset]):
            code, text = run(*args, "-o", output)
            one_line_error(code, text, message)
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("suffix, kind", [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".png", "PNG")])
def test_a_picture_has_the_format_its_name_says(tiny_model, dataset, image_dir, tmp_path, suffix, kind):
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    for args in (["visualize-filters", tmp_path / "last.h5"],
                 ["predict", tmp_path / "last.h5", image_dir / "circles" / "0.jpg", "--model", tiny_model]):
        out = tmp_path / f"{args[0]}{suffix}"
        code, output = run(*args, "-o", out)
        assert code == 0, output
        with Image.open(out) as image:
            assert image.format == kind


def test_a_decompression_bomb_is_refused_in_one_line(tiny_model, dataset, tmp_path, monkeypatch):
    train(tiny_model, data=dataset, devices=("cpu", "cpu"), out_dir=tmp_path, max_steps=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000 pixels, refuses above 2000
    for side in (40, 300):  # 1600 pixels: Pillow's DecompressionBombWarning; 90,000: its DecompressionBombError
        bomb = tmp_path / f"bomb{side}.png"
        Image.new("RGB", (side, side)).save(bomb)
        for args in (["predict", tmp_path / "last.h5", bomb, "-o", tmp_path / "p.png"],
                     ["retrieve", tmp_path / "last.h5", "--data", dataset, "--query", bomb, "-k", "1",
                      "-o", tmp_path / "n.png"]):
            code, output = run(*args, "--model", tiny_model)
            one_line_error(code, output, bomb, "DecompressionBomb")


def test_prepare_data_refuses_an_existing_out_and_notes_empty_class_folders(image_dir, tmp_path):
    out = tmp_path / "d.h5"
    out.write_bytes(b"precious")
    code, output = run("prepare-data", image_dir, out, "--workers", "1")
    one_line_error(code, output, "d.h5 exists", "--overwrite")
    code, output = run("prepare-data", image_dir, tmp_path, "--workers", "1")
    one_line_error(code, output, "it is a folder")
    assert out.read_bytes() == b"precious"
    empty = image_dir / "zebras"
    empty.mkdir()
    try:
        code, output = run("prepare-data", image_dir, out, "--workers", "1", "--overwrite")
    finally:
        empty.rmdir()
    assert code == 0 and "24 images in 3 classes" in output and "without files: 'zebras'" in output, output


def test_the_readme_table_and_the_help_name_every_option():
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(?:\[mpirun -n N\] )?minidl ([a-z-]+) .*$",
                                                            f.read(), re.M)}
    assert set(rows) == set(main.commands)
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no --help text"
                assert any(f"{opt} " in rows[name] or f"{opt}]" in rows[name] for opt in param.opts), \
                    f"the README's row of {name} leaves out {param.opts[-1]}"


def test_a_real_failed_write_through_h5py_is_one_line(image_dir, tmp_path):
    import resource
    import signal
    import subprocess
    import sys

    def small_files():  # in the child: writes past 100 kB fail (EFBIG), as writes on a full disk do (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    out = tmp_path / "d.h5"
    out.write_bytes(b"the old dataset")
    done = subprocess.run([sys.executable, "-m", "minidl_cli.main", "prepare-data", image_dir, out, "--workers", "1",
                           "--overwrite"], preexec_fn=small_files, capture_output=True, text=True, timeout=120)
    # the one line, exit 1 (h5py would crash the exit freeing a file whose write failed: the process ends without
    # freeing it), the old file and no temporary
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last == f"error: cannot write {out}: File too large", done.stderr
    assert "Traceback" not in done.stderr and out.read_bytes() == b"the old dataset"
    assert os.listdir(tmp_path) == ["d.h5"]


def test_a_model_too_large_for_the_memory_is_refused_before_its_parameters_are_drawn(monkeypatch):
    """ModelFile.build charges every parameter drawn against the host's available memory: AlexNet with
    10^6 classes (16 GB of fc8) is refused before fc8 is drawn, on any machine too small for it."""
    import minidl.training.model_file
    monkeypatch.setattr(minidl.training.model_file, "available_memory", lambda dev: 2 ** 30)
    code, output = run("summary", ALEXNET, "--devices", "cpu", "--classes", 10 ** 6)
    assert code == 1 and output.strip().splitlines()[-1] == (
        f"error: {os.path.abspath(ALEXNET)}: not enough memory for the model's parameters with 1,000,000 classes "
        "(1.0 GiB available)"), output
