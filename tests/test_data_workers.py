"""The loader's worker processes and device stage: the same batches whatever the workers and the device,
errors and deaths in one line, no worker or shared memory left behind."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from minidl.data.augment import Crops, crop_and_flip
from minidl.data.dataset import write_dataset
from minidl.data.loader import Loader, default_workers
from minidl.device import device
from minidl.errors import DataError, MinidlError
from minidl.functions import to_input
from minidl.functions.to_input import InputFeed, crops_to_input_cpu
from minidl.precision import DEFAULT_PRECISION, compute_dtype, set_precision

COUNT = 40


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Random images (so every crop, mirror and mean window shows), 3 classes, 8 validation images."""
    path = tmp_path_factory.mktemp("data") / "d.h5"
    rng = np.random.default_rng(0)
    samples = ((rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), n % 3) for n in range(COUNT))
    write_dataset(path, samples, ["zero", "one", "two"], count=COUNT, val_fraction=0.2)
    return path


def batches_of(loader, epoch=1, start=0):
    with device(loader.device or "cpu"):
        return [(x if isinstance(x, np.ndarray) else x.get(), y) for x, y in loader.epoch_batches(epoch, start)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == np.float32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


CASES = {"train": dict(batch_size=6, scale=1 / 255), "channel-mean": dict(batch_size=5, mean="channel", pca_sigma=0),
         "ten-crop": dict(split="val", augment=False, ten_crop=True, crop=200, batch_size=3),
         "shard": dict(batch_size=7, shard=(1, 3)), "val-shard": dict(split="all", augment=False, batch_size=7,
                                                                      shard=(2, 3))}


@pytest.mark.parametrize("case", CASES)
def test_workers_give_the_thread_s_batches(dataset, case):
    """Order, augmentation and resume: a pure function of (seed, epoch, batch), whatever the workers."""
    expected = batches_of(Loader(dataset, seed=4, **CASES[case]))
    for workers in (1, 3):
        loader = Loader(dataset, seed=4, workers=workers, **CASES[case])
        assert_same(batches_of(loader), expected)
        assert_same(batches_of(loader, start=2), expected[2:])


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_a_gpu_gets_the_cpu_s_batches_bit_for_bit(dataset, case):
    expected = batches_of(Loader(dataset, seed=4, **CASES[case]))
    for workers in (0, 2):
        assert_same(batches_of(Loader(dataset, seed=4, workers=workers, device="cuda:0", **CASES[case])), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_under_a_16_bit_precision_a_gpu_gets_the_cpu_s_batches_rounded_once(dataset, precision):
    """The GPU's InputFeed finishes the input in the compute dtype (to_input.cu rounds its float32 value once);
    the CPU's loader stays float32."""
    expected = batches_of(Loader(dataset, seed=4, **CASES["train"]))
    try:
        set_precision(precision)
        got = batches_of(Loader(dataset, seed=4, device="cuda:0", **CASES["train"]))
        assert [x.dtype for x, _ in batches_of(Loader(dataset, seed=4, **CASES["train"]))] == [np.float32] * len(got)
    finally:
        set_precision(DEFAULT_PRECISION)
    assert len(got) == len(expected)
    for (xa, ya), (xb, yb) in zip(got, expected):
        assert xa.dtype == compute_dtype_of(precision)
        np.testing.assert_array_equal(xa.view(np.uint16), xb.astype(xa.dtype).view(np.uint16))
        np.testing.assert_array_equal(ya, yb)


def compute_dtype_of(precision):
    try:
        set_precision(precision)
        return compute_dtype()
    finally:
        set_precision(DEFAULT_PRECISION)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(4))
def test_the_kernel_is_the_numpy_path_on_fresh_inputs(seed):
    rng = np.random.default_rng(seed)
    count, size = rng.integers(1, 6), rng.integers(8, 40)
    crop = rng.integers(1, size + 1)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    where = Crops(rng.integers(0, size - crop + 1, count), rng.integers(0, size - crop + 1, count),
                  rng.random(count) < 0.5)
    windows = crop_and_flip(images, crop, where._replace(flips=np.zeros(count, bool)))  # the device mirrors them
    mean = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    shift = None if seed % 2 else rng.normal(0, 20, (count, 3)).astype(np.float32)
    scale = float(rng.choice([1.0, 1 / 255, -0.3]))
    expected = crops_to_input_cpu(crop_and_flip(images, crop, where), mean, where, shift, scale)
    feed = InputFeed("cuda:1", mean, scale)
    for _ in range(2):  # the second call reuses the pinned buffer
        with device("cuda:1"):
            got = feed(windows, where, shift).get()
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(InputFeed("cpu", mean, scale)(windows, where, shift), expected)


def test_default_workers_leave_a_core_for_training():
    assert default_workers() == max(1, len(os.sched_getaffinity(0)) - 1)
    with pytest.raises(ValueError, match="workers must be"):
        Loader("unused.h5", batch_size=1, workers=-1)


def test_a_damaged_image_is_refused_in_one_line_by_a_worker(dataset, tmp_path):
    path = tmp_path / "copy.h5"
    path.write_bytes(dataset.read_bytes())
    with h5py.File(path, "r") as f:
        chunk = f["images"].id.get_chunk_info(5)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(np.random.default_rng(5).bytes(chunk.size))  # a run of one byte can pass a Fletcher checksum
    batches = Loader(path, split="all", batch_size=4, augment=False, workers=2).epoch_batches(0)
    next(batches)
    with pytest.raises(DataError, match=r" is damaged or truncated \(.*\)$"):
        next(batches)
        next(batches)


def test_a_killed_worker_ends_the_iteration_in_one_line(dataset):
    batches = Loader(dataset, split="all", batch_size=2, workers=2, prefetch=1).epoch_batches(0)
    next(batches)
    victim = batches.worker_pids[1]
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(MinidlError, match=rf"^data loader worker 2 of 2 \(pid {victim}\) died: killed by SIGKILL "
                                          r"\(out of memory\?\); the run stops here"):
        for _ in batches:
            pass
    assert time.monotonic() - start < 10
    assert not any(pid_alive(pid) for pid in batches.worker_pids)


def pid_alive(pid):
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def shm_names():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_closing_stops_the_workers_and_frees_the_shared_memory(dataset):
    before = shm_names()
    batches = Loader(dataset, batch_size=4, workers=2).epoch_batches(0)
    next(batches)
    pids, pool = batches.worker_pids, batches._made
    assert all(pid_alive(pid) for pid in pids)
    batches.close()
    assert pool._ring.closed and not any(pid_alive(pid) for pid in pids)
    assert shm_names() <= before
    for _ in Loader(dataset, batch_size=4, workers=2).epoch_batches(0):  # an epoch to its end
        pass
    assert shm_names() <= before


SCRIPT = """
import sys, time
from minidl.data.loader import Loader
batches = Loader(sys.argv[1], split="all", batch_size=1, workers=2, prefetch=1).epoch_batches(0)
next(batches)
print(*batches.worker_pids, flush=True)
try:
    for _ in batches:
        time.sleep(0.5)
finally:
    batches.close()
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_workers_end_with_their_parent(dataset, how):
    """Killed (no chance to clean up) or interrupted (Ctrl-C), the parent leaves no worker behind."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), str(dataset)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
    parent.send_signal(getattr(signal, how))
    _, err = parent.communicate(timeout=30)
    if how == "SIGINT":
        assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(pid) for pid in pids)


def run_cli(*args):
    from click.testing import CliRunner
    from minidl_cli.main import main
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_bench_data_reports_the_delivery(dataset, where):
    code, output = run_cli("bench-data", dataset, "--workers", "2", "--batch-size", "4", "--batches", "3",
                           "--devices", where)
    assert code == 0, output
    assert re.fullmatch(rf"3 batches of 4 \(227x227 crops\) to {where} with 2 worker\(s\): [\d,]+ images/s  "
                        r"[\d.]+ ms CPU per image  peak memory [\d.]+ [MG]iB \(this process\), [\d.]+ [MG]iB \(largest "
                        r"worker\)\n", output), output


def test_bench_data_refuses_in_one_line(dataset, tmp_path):
    code, output = run_cli("bench-data", dataset, "--devices", "cpu,cpu")
    assert code == 1 and output == "error: --devices cpu,cpu: bench-data delivers to one device, e.g. cpu or cuda:0\n"
    code, output = run_cli("bench-data", dataset, "--batch-size", "20")
    assert code == 1 and output.startswith("error: ") and "needs two batches of 20" in output
    code, output = run_cli("bench-data", tmp_path / "missing.h5")
    assert code == 1 and output.count("\n") == 1 and "missing.h5" in output


TINY_MODEL = '''
from minidl.layers import Flatten, Layer, Linear
CONFIG = dict(momentum=0.9, weight_decay=0.0005, lr_drop_factor=10, lr_drops=3, init="he", devices=("cpu",),
              input_size=19, batch_size=4, epochs=1, lr=0.01, plateau_patience=5, input_scale=1 / 255)


class Tiny(Layer):
    def __init__(self, num_classes, devices):
        super().__init__(device=None)
        self.flat, self.fc = Flatten(device=devices[0]), Linear(3 * 19 * 19, num_classes, device=devices[0], rng=0)
        self.input_device = self.output_device = self.fc.device

    def forward(self, x):
        return self.fc(self.flat(x))


def build_model(num_classes, devices, init, seed):
    return Tiny(num_classes, devices)
'''


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_training_reports_the_rates_of_the_data_and_of_the_steps(dataset, tmp_path, where):
    from minidl.training.train import train
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    events = []
    histories = [train(model, data=dataset, devices=(where,), out_dir=tmp_path / str(workers), log_every=2,
                       workers=workers, progress=events.append) for workers in (0, 2)]
    assert histories[0]["interval_loss"] == histories[1]["interval_loss"]  # the same batches, the same steps
    steps = [e for e in events if e["kind"] == "step"]
    assert steps and all(e["rates"]["data"] > 0 and e["rates"]["step"] > 0 for e in steps)


def test_resuming_at_the_end_of_an_epoch_starts_no_worker(dataset):
    loader = Loader(dataset, batch_size=4, workers=2)
    batches = loader.epoch_batches(0, start=len(loader))
    assert batches.worker_pids == [] and list(batches) == []


EMULATED = bool(os.environ.get("MINIDL_EMULATE_GPUS"))


@pytest.mark.gpu
@pytest.mark.skipif(not EMULATED, reason="reads the GPU emulator's ledger: run with --emulate-gpus 2")
@pytest.mark.parametrize("ends", ["at the epoch's end", "closed early"])
def test_a_gpu_uploads_each_batch_straight_from_the_workers_page_locked_slots(dataset, monkeypatch, ends):
    """No host copy into a pinned buffer at ImageNet rates: the workers' slots are page-locked for the epoch, each
    batch is one pinned copy out of its slot, the slot goes back to its worker only once that copy is done, and
    the slots are unregistered before they are unmapped."""
    from minidl_emulator import ledger
    from minidl_emulator.ledger import LEDGER
    from minidl.data.workers import WorkerPool

    events = []  # what happened, in order: a slot given back, an upload waited for
    released = WorkerPool.release
    monkeypatch.setattr(WorkerPool, "release", lambda pool: (events.append("slot back") if pool._held is not None
                                                            else None, released(pool))[1])
    monkeypatch.setattr(np, "copyto", lambda *a, **k: pytest.fail("a batch was copied on the host"))

    class CopyStillRunning:  # the copy engine not yet done: the slot must stay held until synchronize()
        done = False

        def synchronize(self):
            events.append("waited")

    loader = Loader(dataset, seed=4, workers=2, device="cuda:0", batch_size=6)
    expected = batches_of(Loader(dataset, seed=4, batch_size=6))
    mark = LEDGER.mark()
    with device("cuda:0"):
        batches = loader.epoch_batches(1)
        memory = batches._made.memory
        assert ledger.is_pinned(memory)
        got = []
        for x, y in batches:
            got.append((x.get(), y))
            loader._feed().last_upload = batches._uploading = CopyStillRunning()
            if ends == "closed early" and len(got) == 2:
                break
        batches.close()
    assert_same(got, expected[:len(got)])
    assert not ledger.is_pinned(memory)  # unregistered, then unmapped
    window_bytes = [len(x) * 227 * 227 * 3 for x, _ in got]
    uploads = [e for e in LEDGER.since(mark) if e.unit == "h2d" and e.nbytes % (227 * 227 * 3) == 0]
    assert [e.nbytes for e in uploads] == window_bytes and all(e.pinned for e in uploads)
    assert events[:2 * (len(got) - 1)] == ["waited", "slot back"] * (len(got) - 1)  # each slot back after its copy


@pytest.mark.gpu
@pytest.mark.skipif(not EMULATED, reason="checks the GPU emulator's runtime: run with --emulate-gpus 2")
def test_the_emulated_runtime_refuses_what_cuda_refuses_of_host_registration():
    from minidl.device import cupy
    runtime = cupy().cuda.runtime
    host = np.zeros(4096, np.uint8)
    start = host.__array_interface__["data"][0]
    runtime.hostRegister(start, host.nbytes, 1)
    try:
        with pytest.raises(runtime.CUDARuntimeError, match="AlreadyRegistered"):
            runtime.hostRegister(start + 1024, 100, 1)
    finally:
        runtime.hostUnregister(start)
    with pytest.raises(runtime.CUDARuntimeError, match="NotRegistered"):
        runtime.hostUnregister(start)


@pytest.mark.gpu
def test_where_the_slots_cannot_be_page_locked_each_batch_is_copied_into_a_pinned_buffer(dataset, monkeypatch):
    expected = batches_of(Loader(dataset, seed=4, batch_size=6))
    monkeypatch.setattr(InputFeed, "register", lambda feed, host: False)  # e.g. the driver's locked-memory limit
    loader = Loader(dataset, seed=4, workers=2, device="cuda:0", batch_size=6)
    assert_same(batches_of(loader), expected)
    assert loader._feed()._pinned[0] is not None  # the staging buffer was used


@pytest.mark.parametrize("staged", [False, True])
def test_the_loader_scaling_benchmark_runs_the_gpu_path_s_cpu_side(dataset, staged):
    """benchmarks/loader_scaling.py: the real Loader, WorkerPool and Batches with a stand-in device; one line per
    worker count, with its images/s, CPU per image and speed-up over the first."""
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "loader_scaling.py")
    command = [sys.executable, script, str(dataset), "--workers", "1", "2", "--repeats", "1", "--batches", "4",
               "--batch-size", "4"] + (["--staged"] if staged else [])
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split(" worker")[0] for line in lines] == ["1", "2"]
    assert all(re.search(r"images/s \(runs: .*\), CPU \d+\.\d{3} ms per image, \d+\.\d\dx 1 worker", line)
               for line in lines)
    assert lines[0].split(", ")[-1].startswith("1.00x") and (" (staged on the host)" in lines[1]) == staged


@pytest.mark.gpu
@pytest.mark.skipif(not EMULATED, reason="reads the GPU emulator's ledger: run with --emulate-gpus 2")
@pytest.mark.parametrize("seed", range(3))
def test_the_places_lighting_and_labels_go_up_with_the_crops_in_one_copy(seed):
    """InputFeed with labels: the same input as without, the labels on the device as int32, and one pinned copy a
    call for all of it (crops staged; a room after crops in registered memory; else crops then the rest)."""
    from minidl_emulator.ledger import LEDGER
    rng = np.random.default_rng(seed)
    count, size, crop = int(rng.integers(1, 6)), 21, int(rng.integers(5, 21))  # odd byte counts: the alignment
    windows = rng.integers(0, 256, (count, crop, crop, 3), dtype=np.uint8)
    where = Crops(rng.integers(0, size - crop + 1, count), rng.integers(0, size - crop + 1, count),
                  rng.random(count) < 0.5)
    mean = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    shift, labels = rng.normal(0, 20, (count, 3)).astype(np.float32), rng.integers(0, 1000, count)
    feed = InputFeed("cuda:1", mean, 1 / 255)
    slot = np.zeros(windows.nbytes + to_input.trailer_bytes(count) + 5, np.uint8)
    slot[:windows.nbytes] = windows.reshape(-1)
    in_slot = slot[:windows.nbytes].reshape(windows.shape)
    with device("cuda:1"):
        expected = feed(windows, where, shift).get()
        assert feed.register(slot)
        try:
            for crops, room, copies in [(windows, None, 1), (in_slot, slot, 1), (in_slot, None, 2)]:
                mark = LEDGER.mark()
                x, y = feed(crops, where, shift, labels, room=room)
                uploads = [e for e in LEDGER.since(mark) if e.unit == "h2d"]
                assert len(uploads) == copies and uploads[0].pinned
                np.testing.assert_array_equal(x.get(), expected)
                assert y.dtype == np.int32 and np.array_equal(y.get(), labels)
        finally:
            feed.unregister(slot)
    x, y = InputFeed("cpu", mean, 1 / 255)(windows, where, shift, labels)
    np.testing.assert_array_equal(x, expected)
    assert y.dtype == np.int32 and np.array_equal(y, labels)


@pytest.mark.gpu
@pytest.mark.skipif(not EMULATED, reason="reads the GPU emulator's ledger: run with --emulate-gpus 2")
@pytest.mark.parametrize("locked", [True, False])
def test_a_gpu_trainer_s_batches_bring_their_labels_in_the_batch_s_one_copy(dataset, monkeypatch, locked):
    """epoch_batches(labels_on_device=True): the CPU's batches, the labels int32 on the loader's GPU, and one
    host-to-device copy a batch, out of the page-locked slot or the pinned buffer."""
    from minidl_emulator.ledger import LEDGER
    if not locked:
        monkeypatch.setattr(InputFeed, "register", lambda feed, host: False)
    expected = batches_of(Loader(dataset, seed=4, batch_size=6))
    loader = Loader(dataset, seed=4, workers=2, device="cuda:0", batch_size=6)
    mark = LEDGER.mark()
    with device("cuda:0"):
        got = [(x.get(), y.get()) for x, y in loader.epoch_batches(1, labels_on_device=True)]
    assert_same(got, expected)
    assert all(y.dtype == np.int32 for _, y in got)
    mean_bytes = loader._feed().mean.nbytes  # (uploaded once)
    uploads = [e for e in LEDGER.since(mark) if e.unit == "h2d" and e.nbytes != mean_bytes]
    assert len(uploads) == len(got) and all(e.pinned for e in uploads)


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_labels_that_do_not_match_the_crops_are_refused_in_one_line(where):
    windows = np.zeros((3, 4, 4, 3), np.uint8)
    crops = Crops(np.zeros(3, int), np.zeros(3, int), np.zeros(3, bool))
    with device(where), pytest.raises(MinidlError, match=r"^2 labels for 3 crops: want one label per crop$"):
        InputFeed(where, np.zeros((4, 4, 3), np.float32), 1.0)(windows, crops, None, np.array([0, 1]))
