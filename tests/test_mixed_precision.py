"""Mixed precision (--precision fp16 / bf16, minidl.precision): 16-bit activations and GEMM inputs, float32
master weights, gradients and loss; the CPU computes 16-bit arrays in float32 and rounds (minidl.core)."""
import ml_dtypes
import numpy as np
import pytest

from minidl import Tensor
from minidl.functions import softmax_cross_entropy
from minidl.layers import LRN, Conv2d, Flatten, Linear, MaxPool2d, Sequential
from minidl.optim import MomentumSGD
from minidl.precision import DEFAULT_PRECISION, set_precision
from minidl.training.checkpoint import load_checkpoint
from minidl.training.train import train
from test_cli import dataset, image_dir, run, tiny_model  # noqa: F401 -- fixtures

DEVICES = ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)]
HALF = dict(fp16=np.dtype(np.float16), bf16=np.dtype(ml_dtypes.bfloat16))
# The largest difference of a 30-step loss curve from float32's, relative to max(loss, 0.1) (below 0.1 the
# loss is near its floor and its relative error grows without meaning). A 16-bit value carries a relative
# rounding error of up to 2^-11 (fp16) or 2^-8 (bf16); a step rounds a few tens of times along its longest
# path, and training compounds it (two runs' curves part like any two nearby trajectories). Measured over
# three seeds: at most 0.27% (fp16) and 3.1% (bf16) on the CPU, 2.0% and 3.2% on an emulated GPU (which
# rounds the saved activations too). The bounds are twice the largest.
TRACKS_WITHIN = dict(fp16=0.04, bf16=0.07)


@pytest.fixture
def precision_restored():
    yield
    set_precision(DEFAULT_PRECISION)


def curve(device, precision, seed, steps=30):
    """The losses of `steps` full-batch steps of a small network with each kind of layer; and the network."""
    set_precision(precision)
    rng = np.random.default_rng(seed)
    net = Sequential(Conv2d(3, 8, 3, pad=1, rng=1 + seed, device=device, activation="relu"), LRN(device=device),
                     MaxPool2d(3, 2, device=device), Flatten(device=device),
                     Linear(8 * 3 * 3, 16, rng=2 + seed, device=device, activation="relu"),
                     Linear(16, 3, rng=3 + seed, device=device))
    opt = MomentumSGD(net.params(), lr=0.05)
    x = Tensor(rng.uniform(-1, 1, (16, 3, 7, 7)).astype(np.float32), device=device)
    labels = Tensor(rng.integers(0, 3, 16).astype(np.int32), device=device)
    losses = []
    for _ in range(steps):
        logits = net(x)
        loss = softmax_cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.numpy()))
    return np.array(losses), net, logits, loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_small_network_in_16_bits_tracks_float32(device, precision, precision_restored):
    for seed in range(2):
        reference, _, _, _ = curve(device, "fp32", seed)
        half, net, logits, loss = curve(device, precision, seed)
        assert logits.dtype == HALF[precision] and loss.dtype == np.float32  # 16-bit activations, float32 loss
        assert all(p.dtype == np.float32 and p.grad.dtype == np.float32 for p in net.params())  # masters
        assert reference[-1] < 0.5 * reference[0]  # it learns, so the curves compared are not flat
        assert not np.array_equal(half, reference)  # the arithmetic was 16-bit
        gap = np.abs(half - reference) / np.maximum(reference, 0.1)
        assert gap.max() <= TRACKS_WITHIN[precision], (seed, gap.max())


def test_the_cpu_rounds_a_16_bit_result_once(precision_restored):
    """An operation on 16-bit arrays is computed in float32 and rounded once: relu(x W^T + b) of float16 is the
    float32 result rounded, not NumPy's float16 product rounded term by term."""
    rng = np.random.default_rng(1)
    x, W, b = (rng.uniform(-1, 1, s).astype(np.float16) for s in ((5, 40), (7, 40), (7,)))
    from minidl.functions import linear
    y = linear(Tensor(x), Tensor(W), Tensor(b), activation="relu")
    expected = np.maximum(x.astype(np.float32) @ W.astype(np.float32).T + b.astype(np.float32), 0).astype(np.float16)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y.numpy(), expected)


def test_checkpoints_stay_float32_and_a_run_resumes_in_another_precision(dataset, image_dir, tiny_model, tmp_path,
                                                                         precision_restored):
    """fp16 turns loss scaling on; the checkpoint's weights and velocities are float32 and finite; the run resumes
    under bf16 (keeping its loss scale), and evaluate and predict take any precision."""
    train(tiny_model, data=dataset, devices="cpu", out_dir=tmp_path / "run", max_steps=2, precision="fp16")
    checkpoint = load_checkpoint(str(tmp_path / "run" / "last.h5"))
    assert checkpoint.loss_scale is not None and checkpoint.loss_scale["scale"] == 2.0 ** 16
    for name, w in checkpoint.params.items():
        assert w.dtype == np.float32 and np.isfinite(w).all(), name
        assert checkpoint.momentum[name].dtype == np.float32, name
    code, output = run("train", tiny_model, "--resume", tmp_path / "run" / "last.h5", "--out", tmp_path / "run",
                       "--precision", "bf16", "--epochs", "1")
    assert code == 0, output
    resumed = load_checkpoint(str(tmp_path / "run" / "last.h5"))
    assert resumed["step"] > 2 and resumed.loss_scale is not None
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in resumed.params.values())
    for precision in ("fp16", "bf16", "fp32"):
        code, output = run("evaluate", tmp_path / "run" / "last.h5", "--data", dataset, "--model", tiny_model,
                           "--precision", precision)
        assert code == 0 and "top-1" in output, output
        code, output = run("predict", tmp_path / "run" / "last.h5", image_dir / "squares", "--model", tiny_model,
                           "-o", tmp_path / f"{precision}.png", "--precision", precision)
        assert code == 0 and "wrote" in output, output


def test_a_bad_precision_gets_one_line(tiny_model, tmp_path):
    code, output = run("train", tiny_model, "--precision", "fp8", "--out", tmp_path / "run")
    assert code != 0 and "fp8" in output and "fp16" in output and "Traceback" not in output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_optimizer_writes_each_weights_16_bit_copy_in_its_update(device, precision):
    """A weight's 16-bit cast is kept (Parameter.cast); on a GPU the momentum kernel writes it with the weight in
    the same pass, so the next forward casts nothing, and the copy is the new weight rounded, bit for bit; a
    skipped step leaves both alone. On the CPU, and after any other write (a loaded checkpoint), the copy is
    stale and the next cast makes a new one."""
    from minidl.layers import Parameter
    dtype = HALF[precision]
    rng = np.random.default_rng(4)
    p = Parameter(rng.standard_normal((3, 50)).astype(np.float32), device=device)
    opt = MomentumSGD([p], lr=0.1)
    first = p.cast(dtype)
    assert first.dtype == dtype and p.current_cast() is first.data
    for halt in (0.0, np.nan):
        p.grad = Tensor(rng.standard_normal((3, 50)).astype(np.float32), device=device)
        before = p.numpy().copy()
        opt.step({p.device: Tensor(np.array([halt], np.float32), device=device).data})
        if device == "cpu":
            assert p.current_cast() is None  # the CPU updated it in the first step: it casts again when used
            continue
        kept = p.current_cast()
        assert kept is not None
        with p.device:
            np.testing.assert_array_equal(kept.get(), p.numpy().astype(dtype))
        assert np.array_equal(p.numpy(), before) == (halt != 0.0)
    if device != "cpu":
        from minidl_emulator.cuda import work
        done = dict(work)
        again = p.cast(dtype)
        assert again.data is p.current_cast() and {k: work[k] - done.get(k, 0) for k in work if k != "bytes"
                                                    and work[k] != done.get(k, 0)} == {}  # no operation
    p.written()  # what loading a checkpoint does
    assert p.current_cast() is None


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_minidl_train_and_evaluate_in_16_bits_on_a_gpu(dataset, tiny_model, tmp_path, precision, precision_restored):
    """The trainer's whole step on a GPU in 16 bits (the uint8 input finished in 16 bits by to_input.cu, the loss
    float32, fp16 with loss scaling): its interval losses within TRACKS_WITHIN of an fp32 run's, its checkpoint
    float32 and finite; evaluate in the same precision."""
    common = dict(data=dataset, devices="cuda:0", max_steps=4, log_every=1, epochs=1)
    reference = train(tiny_model, out_dir=tmp_path / "fp32", precision="fp32", **common)["interval_loss"]
    half = train(tiny_model, out_dir=tmp_path / precision, precision=precision, **common)["interval_loss"]
    assert len(half) == len(reference) >= 3
    gap = np.abs(np.array(half) - reference) / np.maximum(reference, 0.1)
    assert gap.max() <= TRACKS_WITHIN[precision], gap
    checkpoint = load_checkpoint(str(tmp_path / precision / "last.h5"))
    assert (checkpoint.loss_scale is not None) == (precision == "fp16")
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in checkpoint.params.values())
    code, output = run("evaluate", tmp_path / precision / "last.h5", "--data", dataset, "--model", tiny_model,
                       "--devices", "cuda:0", "--precision", precision)
    assert code == 0 and "top-1" in output, output
