"""End to end on GPUs: `minidl train` of a small two-tower AlexNet on cuda:0,cuda:1 takes the
same steps as on the CPU, and evaluate, visualize-filters and bench work from its checkpoint.

On emulated GPUs (`pytest --emulate-gpus 2`) the towers sit on two GPUs, so every crossing
is a copy between GPUs, checked for stream hazards."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from minidl.training.checkpoint import load_checkpoint
from test_cli import dataset, image_dir, run  # noqa: F401 -- the CLI runner and the 3-class dataset fixtures

ALEXNET = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "models", "alexnet.py"))

# the paper's table at a small scale: 35x35 input, 3x3 maps after the last pool; dropout 0.5,
# whose masks the CPU and the GPUs draw alike (a hash of seed, layer and row), so they take the same steps
SMALL_ALEXNET = f'''
from minidl.training.model_file import load_model_file

alexnet = load_model_file({ALEXNET!r}).module
CONFIG = dict(alexnet.CONFIG, input_size=35, batch_size=4, epochs=1, lr=0.01, dropout=0.5, input_scale=1 / 255)
NETWORK = [
    ("conv1", "conv", dict(out=8, ksize=3, stride=1, pad=0), "image", "relu lrn pool"),
    ("conv2", "conv", dict(out=12, ksize=3, pad=1), "own", "relu lrn pool"),
    ("conv3", "conv", dict(out=12, ksize=3, pad=1), "both", "relu"),
    ("conv4", "conv", dict(out=12, ksize=3, pad=1), "own", "relu"),
    ("conv5", "conv", dict(out=8, ksize=3, pad=1), "own", "relu pool flatten"),
    ("fc6", "fc", dict(out=16), "both", "relu dropout"),
    ("fc7", "fc", dict(out=16), "both", "relu dropout"),
]


def build_model(num_classes, devices, init, seed):
    return alexnet.AlexNet(num_classes, devices, init, seed, CONFIG["dropout"], network=NETWORK, pooled_size=3)
'''


def _losses(output):
    return [float(x) for x in re.findall(r"batch \d+/\d+  loss (\d+\.\d+)", output)]


def train_on_the_cpu_and_two_gpus(dataset, tmp_path, precision):
    """The small AlexNet trained by the CLI on cpu,cpu and on cuda:0,cuda:1: [(out folder, losses), ...]."""
    model = tmp_path / "small_alexnet.py"
    model.write_text(SMALL_ALEXNET)
    runs = []
    for devices in ("cpu,cpu", "cuda:0,cuda:1"):
        out = tmp_path / devices.replace(",", "_").replace(":", "")
        code, output = run("train", model, "--data", dataset, "--devices", devices, "--out", out, "--log-every", "1",
                           "--precision", precision)
        assert code == 0, output
        runs.append((out, _losses(output)))
    return runs


@pytest.mark.gpu
def test_train_on_two_gpus_equals_the_cpu_then_evaluate_visualize_bench(dataset, tmp_path):
    model = tmp_path / "small_alexnet.py"
    # exact FP32 GEMMs: TF32's agreement is tests/test_gemm.py's
    (cpu_out, cpu_losses), (gpu_out, gpu_losses) = train_on_the_cpu_and_two_gpus(dataset, tmp_path, "fp32")
    assert len(gpu_losses) == len(cpu_losses) >= 3
    np.testing.assert_allclose(gpu_losses, cpu_losses, atol=2e-4)  # printed to 4 decimals
    cpu_ckpt, gpu_ckpt = load_checkpoint(cpu_out / "last.h5"), load_checkpoint(gpu_out / "last.h5")
    assert gpu_ckpt.attrs["devices"] == '["cuda:0", "cuda:1"]'
    for name, weights in cpu_ckpt.params.items():
        np.testing.assert_allclose(gpu_ckpt.params[name], weights, rtol=1e-4, atol=1e-6, err_msg=name)

    code, output = run("evaluate", gpu_out / "last.h5", "--data", dataset, "--devices", "cuda:0,cuda:1",
                       "--ten-crop", "--model", model, "--precision", "fp32")
    assert code == 0 and "10-crop: top-1" in output, output
    code, cpu_output = run("evaluate", gpu_out / "last.h5", "--data", dataset, "--devices", "cpu", "--ten-crop",
                           "--model", model)
    assert code == 0 and cpu_output.split("loss")[1][:6] == output.split("loss")[1][:6], (output, cpu_output)

    png = tmp_path / "filters.png"
    code, output = run("visualize-filters", gpu_out / "last.h5", "-o", png)
    assert code == 0 and "16 conv1 kernels" in output, output
    assert Image.open(png).size[0] > 20

    code, output = run("bench", model, "--devices", "cuda:0,cuda:1", "--batch-size", "4", "--steps", "2")
    assert code == 0 and "ms/step" in output, output
    if os.environ.get("MINIDL_EMULATE_GPUS"):
        assert re.search(r"device operations per step \(emulated GPUs\): \d+ \(\d+ kernel", output), output


@pytest.mark.gpu
def test_the_precision_curves_benchmark_compares_each_precision_with_the_first(dataset, tmp_path, capsys):
    """benchmarks/precision_curves.py (the AlexNet curves of issue 28, figures in NOTES) on the small AlexNet: the
    same steps under each precision, each curve's gaps from fp32's, per interval and per window of mean losses."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("precision_curves", os.path.join(
        os.path.dirname(ALEXNET), "..", "benchmarks", "precision_curves.py"))
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    model = tmp_path / "small_alexnet.py"
    model.write_text(SMALL_ALEXNET)
    found = curves.curves(str(model), 8, "cuda:0,cuda:1", ["fp32", "bf16"], 2, str(dataset), batch_size=4, window=4)
    reference, bf16 = (np.array(found[p]["loss"]) for p in ("fp32", "bf16"))
    assert len(reference) == len(bf16) == 4
    windows = lambda x: x.reshape(2, 2).mean(axis=1)  # noqa: E731 -- 4 steps a window, 2 steps an interval
    np.testing.assert_allclose(found["bf16"]["window_gaps"],
                               np.abs(windows(bf16) - windows(reference)) / windows(reference))
    # the same steps, rounded otherwise: 8 steps of 4 images, bf16 keeping 8 bits (6.5% measured at most here)
    assert 0 < found["bf16"]["mean_gap"] <= found["bf16"]["largest_gap"] < 0.15
