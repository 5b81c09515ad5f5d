"""The metrics log (metrics.jsonl): rows as training goes, none lost or repeated across a kill and a resume;
the curves drawn from it; the ETA in the progress line."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from minidl.data import builtin_dataset
from minidl.training import train as train_module
from minidl.training.metrics import METRICS_FILE, Eta, MetricsLog, position, read_rows
from minidl.training.train import train
from minidl_cli.main import main

TINY_MODEL = '''
from minidl.layers import Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU

CONFIG = dict(input_size=19, batch_size=4, epochs=2, lr=0.01, momentum=0.9, weight_decay=0.0005, lr_drop_factor=10,
              lr_drops=3, plateau_patience=5, init="he", devices=("cpu",), input_scale=1 / 255)


class Tiny(Layer):
    def __init__(self, num_classes, device, seed):
        super().__init__(device=None)
        self.conv1 = Conv2d(3, 6, 5, stride=2, device=device, rng=seed)
        self.relu, self.pool, self.flat = ReLU(device=device), MaxPool2d(3, 2, device=device), Flatten(device=device)
        self.fc = Linear(6 * 3 * 3, num_classes, device=device, rng=seed + 1)
        self.input_device = self.output_device = self.conv1.device

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv1(x)))))


def build_model(num_classes, devices, init, seed):
    return Tiny(num_classes, devices[0], seed)
'''
# what is the same in two runs of the same steps (not the times)
SAME = ("kind", "step", "epoch", "batch", "loss", "top1", "top5", "lr", "train_loss", "train_top1")


def same_parts(rows):
    return [{key: row[key] for key in SAME if key in row} for row in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return builtin_dataset(str(tmp_path_factory.mktemp("builtin")), per_class=4)  # 30 train images: 7 steps of 4


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return str(path)


def test_rows_are_read_back_and_a_torn_last_line_is_left_out(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.append("interval", step=1, epoch=1, batch=1, loss=2.5)
    log.append("validation", step=1, epoch=1, loss=2.0, top1=0.5, top5=1.0)
    log.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"kind": "interval", "step": 2, "ep')  # killed mid-write
    rows = read_rows(str(tmp_path / METRICS_FILE))
    assert [r["kind"] for r in rows] == ["interval", "validation"] and rows[0]["loss"] == 2.5
    assert all(isinstance(r["time"], float) for r in rows)
    resumed = MetricsLog(str(tmp_path), resume_at=(1, 0))  # the torn line goes, so the next row is whole
    resumed.append("interval", step=2, epoch=2, batch=1)
    resumed.close()
    assert [r["step"] for r in read_rows(str(tmp_path / METRICS_FILE))] == [1, 1, 2]
    assert (tmp_path / METRICS_FILE).read_text().count("\n") == 3


def test_a_resumed_log_keeps_the_rows_up_to_the_checkpoint_and_a_new_one_starts_afresh(tmp_path):
    log = MetricsLog(str(tmp_path))
    for batch in (1, 2, 3):  # epoch 1 of 3 batches, validated, then a batch of epoch 2
        log.append("interval", step=batch, epoch=1, batch=batch)
    log.append("validation", step=3, epoch=1)
    log.append("interval", step=4, epoch=2, batch=1)
    log.close()
    assert [position(r) for r in log.rows] == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    kept = MetricsLog(str(tmp_path), resume_at=(0, 2))  # a checkpoint at epoch 0, batch 2
    kept.close()
    assert [r["step"] for r in read_rows(str(tmp_path / METRICS_FILE))] == [1, 2]
    MetricsLog(str(tmp_path)).close()
    assert read_rows(str(tmp_path / METRICS_FILE)) == []


def test_the_eta_counts_the_epochs_and_validations_left():
    eta = Eta(step=0)
    assert eta.remaining(0, 0, 10, 3, 2) == (None, None)
    eta.stepped(2, 9.0)  # the first interval, warm-up included: used only until another is timed
    eta.stepped(4, 2.0)
    eta.validated(3.0)
    epoch_left, run_left = eta.remaining(epoch=0, batch=4, batches=10, epochs=3, val_batches=2)
    assert epoch_left == pytest.approx(6 * 1.0) and run_left == pytest.approx(6 + 3 + 2 * (10 + 3))


def test_a_run_stopped_and_resumed_logs_the_rows_of_an_uninterrupted_one(data, tiny_model, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(train_module, "training_curves", lambda history, path: drawn.append(history))
    train(tiny_model, data=data, devices="cpu", out_dir=str(tmp_path / "a"), log_every=1)
    train(tiny_model, data=data, devices="cpu", out_dir=str(tmp_path / "b"), log_every=1, max_steps=5)
    train(tiny_model, data=data, devices="cpu", out_dir=str(tmp_path / "b"), log_every=1,
          resume=str(tmp_path / "b" / "last.h5"))
    a, b = (read_rows(str(tmp_path / run / METRICS_FILE)) for run in "ab")
    steps = max(r["step"] for r in a) // 2
    assert [r["kind"] for r in a].count("validation") == 2 and len(a) == 2 * (steps + 1)
    assert same_parts(b) == same_parts(a)
    intervals = [r for r in a if r["kind"] == "interval"]
    assert drawn[1]["interval_step"] == [r["step"] for r in intervals]  # the curves are drawn from the log
    assert drawn[1]["val_top1"] == [r["top1"] for r in a if r["kind"] == "validation"]
    assert {"step", "epoch", "loss", "top1", "images_per_s", "lr", "time", "seconds"} <= set(intervals[0])


def minidl_command(*args):
    return [sys.executable, "-c", "from minidl_cli.main import main; main()", *map(str, args)]


def test_a_sigkill_and_a_resume_lose_and_repeat_no_row(data, tiny_model, tmp_path):
    common = ["--data", data, "--devices", "cpu", "--log-every", "1", "--epochs", "8"]
    straight = subprocess.run(minidl_command("train", tiny_model, "--out", tmp_path / "a", *common),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "b"
    # a checkpoint after every step, so the kill may land between a row and its checkpoint
    process = subprocess.Popen(minidl_command("train", tiny_model, "--out", out, "--checkpoint-seconds", "0", *common),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(read_rows(str(out / METRICS_FILE))) < 20 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(minidl_command("train", tiny_model, "--resume", out / "last.h5", *common),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (read_rows(str(tmp_path / run / METRICS_FILE)) for run in "ab")
    assert len(a) == 8 * (max(r["step"] for r in a) // 8 + 1)
    assert same_parts(b) == same_parts(a)


def test_the_progress_line_shows_the_epochs_and_the_runs_eta(data, tiny_model, tmp_path):
    result = CliRunner().invoke(main, ["train", tiny_model, "--data", data, "--devices", "cpu", "--out",
                                       str(tmp_path), "--log-every", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    etas = re.findall(r"batch (\d)/7 .* ETA epoch (\d+):(\d\d), run (\d+):(\d\d)", result.output)
    assert len(etas) == 6, result.output  # every progress line
    assert f"metrics in {tmp_path}/{METRICS_FILE}" in result.output
    assert os.path.exists(tmp_path / "curves.png")
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])["kind"] == "interval"
