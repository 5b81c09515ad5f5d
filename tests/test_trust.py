"""A checkpoint names its model, it never chooses code; a resumed run checks its inputs; one run per --out.

Model files are code and come only from the command line (or are the built-in
AlexNet); a checkpoint's model_file attribute is a name, never imported. A resume
checks the dataset by content (a link to it is fine, a file replaced at its path
is not) and the model file by its source's hash. Two runs never write one --out.
"""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from minidl.training.checkpoint import load_checkpoint, save_checkpoint
from minidl.errors import MinidlError
from minidl.training.lock import lock_folder
from minidl.training.model_file import BUILTIN_MODEL, builtin_sha256, load_model_file
from minidl.optim import MomentumSGD, PlateauSchedule
from minidl.training.train import train
from test_cli import ROOT, TINY_MODEL, dataset, image_dir, run  # noqa: F401 -- fixtures

# what a crafted checkpoint would have minidl run: it leaves a marker file behind
EVIL = '''
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "marker"), "w").write("ran")
''' + TINY_MODEL


def one_line_error(code, output, message):
    lines = output.strip().splitlines()
    assert code != 0 and lines and lines[-1].startswith("error: ") and message in lines[-1], output
    assert "Traceback" not in output


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return path


@pytest.fixture
def tiny_run(tmp_path, tiny, dataset):
    """A tiny model trained one step on its own copy of the dataset: (out folder, dataset copy)."""
    data = tmp_path / "data.h5"
    shutil.copy(dataset, data)
    out = tmp_path / "run"
    train(tiny, data=data, devices=("cpu", "cpu"), out_dir=out, max_steps=1)
    return out, data


def test_a_checkpoint_never_runs_the_model_file_it_names(tmp_path, tiny_run, image_dir, monkeypatch):
    out, data = tiny_run
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL)
    crafted = tmp_path / "crafted.h5"
    shutil.copy(out / "last.h5", crafted)
    monkeypatch.chdir(tmp_path)  # a relative name would resolve here
    for name in (str(evil), "evil.py"):
        with h5py.File(crafted, "r+") as f:
            f.attrs["model_file"], f.attrs["model_source"] = name, EVIL
            f.attrs.pop("model_sha256", None)  # an older checkpoint's layout: the hash is taken from the source
        for args in (["evaluate", crafted, "--data", data, "--devices", "cpu"],
                     ["predict", crafted, image_dir / "circles" / "0.jpg", "-o", tmp_path / "p.png"],
                     ["retrieve", crafted, "--data", data, "-o", tmp_path / "n.png"],
                     ["train", "--resume", crafted, "--out", tmp_path / "again"]):
            code, output = run(*args)
            one_line_error(code, output, "was trained with the model file 'evil.py'")
            assert "not the built-in AlexNet: give that file " in output
            assert not (tmp_path / "marker").exists(), args
    assert not [m for m in sys.modules if "evil" in m]
    # a checkpoint claiming the built-in AlexNet's hash gets the built-in AlexNet, never the file it names
    with h5py.File(crafted, "r+") as f:
        f.attrs["model_sha256"] = builtin_sha256()
    code, output = run("evaluate", crafted, "--data", data, "--devices", "cpu")
    one_line_error(code, output, "does not fit this model")
    assert not (tmp_path / "marker").exists() and not [m for m in sys.modules if "evil" in m]


def test_a_checkpoint_of_the_built_in_alexnet_needs_no_model_file(tmp_path, dataset, monkeypatch):
    # found beside the installed minidl package, whatever the current folder
    assert os.path.samefile(BUILTIN_MODEL, os.path.join(ROOT, "models", "alexnet.py"))
    monkeypatch.chdir(tmp_path)
    alexnet = load_model_file(BUILTIN_MODEL)
    model = alexnet.build(3, ["cpu", "cpu"])
    checkpoint = tmp_path / "alexnet.h5"
    config = dict(alexnet.config)
    save_checkpoint(checkpoint, model=model, optimizer=MomentumSGD(model.params()), schedule=PlateauSchedule(0.01),
                    meta=dict(model_file="somewhere/else/alexnet.py", model_source=alexnet.source,
                              model_sha256=alexnet.sha256, config=config, class_names=["a", "b", "c"],
                              num_classes=3, devices=["cpu", "cpu"], data="", seed=0, epoch=0, batch=0, step=0),
                    history={}, epoch_totals=dict(loss_sum=0.0, correct=0, seen=0))
    code, output = run("evaluate", checkpoint, "--data", dataset, "--devices", "cpu")
    assert code == 0 and "6 val images, centre crop: top-1" in output, output


def test_a_custom_model_file_must_be_given(tiny_run, tiny):
    out, data = tiny_run
    code, output = run("evaluate", out / "last.h5", "--data", data, "--devices", "cpu")
    one_line_error(code, output, f"{out / 'last.h5'} was trained with the model file 'tiny.py' (sha256 ")
    assert "give that file with --model FILE" in output
    code, output = run("evaluate", out / "last.h5", "--data", data, "--devices", "cpu", "--model", tiny)
    assert code == 0 and "val images, centre crop: top-1" in output, output
    # train names its positional argument
    code, output = run("train", "--resume", out / "last.h5", "--out", out)
    one_line_error(code, output, "not the built-in AlexNet: give that file as MODEL_FILE")


def test_resume_takes_a_link_to_the_same_dataset(tmp_path, tiny_run, tiny):
    out, data = tiny_run
    link = tmp_path / "link.h5"
    link.symlink_to(data)
    code, output = run("train", tiny, "--resume", out / "last.h5", "--out", out, "--data", link, "--epochs", "1",
                       "--devices", "cpu")
    assert code == 0 and "resuming at epoch 1, batch 1" in output, output


def test_resume_refuses_a_dataset_replaced_at_its_path(tiny_run, tiny):
    out, data = tiny_run
    other = data.parent / "other.h5"
    shutil.copy(data, other)
    with h5py.File(other, "r+") as f:  # the same images, other labels
        f["labels"][...] = np.roll(f["labels"][()], 1)
    os.replace(other, data)  # at the same path
    code, output = run("train", tiny, "--resume", out / "last.h5", "--out", out, "--devices", "cpu")
    one_line_error(code, output, f"{data} is not the dataset {out / 'last.h5'} was trained on")


def test_resume_refuses_an_edited_model_file_unless_allowed(tiny_run, tiny):
    out, _ = tiny_run
    tiny.write_text(TINY_MODEL + "\n# edited\n")
    args = ["train", tiny, "--resume", out / "last.h5", "--out", out, "--devices", "cpu", "--epochs", "1"]
    code, output = run(*args)
    one_line_error(code, output, f"{tiny} is not the model file {out / 'last.h5'} was trained with")
    assert "pass --allow-model-change to go on with this one" in output
    code, output = run(*args, "--allow-model-change")
    assert code == 0 and "resuming at epoch 1, batch 1" in output, output
    assert load_checkpoint(out / "last.h5").model_sha256 == load_model_file(tiny).sha256  # it records what ran


def test_a_second_run_on_a_locked_out_is_refused(tmp_path, tiny, dataset, monkeypatch):
    out = tmp_path / "run"
    held = lock_folder(out)
    try:
        code, output = run("train", tiny, "--data", dataset, "--devices", "cpu", "--out", out)
        one_line_error(code, output, f"{out} is in use by another training run (pid {os.getpid()})")
        assert not (out / "last.h5").exists()
    finally:
        held.release()
    train(tiny, data=dataset, devices=("cpu", "cpu"), out_dir=out, max_steps=1)  # free again
    lock_folder(out).release()  # and the run let it go when it ended
    full = shutil.disk_usage(out)._replace(free=2 ** 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    with pytest.raises(MinidlError, match="MiB free"):  # refused after it took the lock: let go too
        train(tiny, data=dataset, devices=("cpu", "cpu"), out_dir=out, max_steps=1)
    lock_folder(out).release()
    with pytest.raises(MinidlError, match="cannot write checkpoints"):  # not a folder: one line, no lock taken
        lock_folder(out / "last.h5")


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minidl.training.lock import lock_folder; "
                               "lock = lock_folder(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(MinidlError, match=f"in use by another training run \\(pid {holder.pid}\\)"):
            lock_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_folder(tmp_path).release()  # kill -9 dropped the lock with the process


def test_a_network_is_refused_before_it_outgrows_the_checkpoint_it_is_built_for():
    """Restored builds under the checkpoint's count of values: a crafted num_classes (with a small matrix
    of as many rows to pass the reader) is refused before the layer is drawn, not after gigabytes."""
    import tracemalloc

    from minidl.layers import Linear
    from minidl.layers.init import parameter_budget
    tracemalloc.start()
    try:
        with pytest.raises(MinidlError, match="outgrew"), \
                parameter_budget(4096 * 10 + 10, lambda: MinidlError("outgrew")):
            Linear(4096, 10, device="cpu")  # within the budget
            Linear(4096, 100_000, device="cpu")  # 1.6 GB, were it drawn
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 ** 20
    Linear(4096, 100, device="cpu")  # no budget outside the block
