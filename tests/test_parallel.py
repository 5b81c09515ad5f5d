"""Data-parallel training under mpirun: two ranks against one process, replicas in step, a dead rank.

Each test starts `mpirun -n 2` (as root Open MPI wants --allow-run-as-root, and
two ranks on fewer cores --oversubscribe). The ranks run RANK_SCRIPT, which
trains through minidl.training.train.train and then saves its replica's weights, so a
test can compare the ranks with each other and with one process.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minidl.training.checkpoint import load_checkpoint
from minidl.device import gpu_count
from minidl.training.train import train
from test_cli import TINY_MODEL, dataset, image_dir, run  # noqa: F401 -- fixtures
from test_gpu_end_to_end import SMALL_ALEXNET

MPIRUN = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2"]

RANK_SCRIPT = '''
import json, os, sys, threading, time
import numpy as np
import minidl.training.train as T
from mpi4py import MPI

options = json.loads(sys.argv[1])
signal = options.pop("signal_rank1_after_checkpoint", None)
runs = []
made = T.Run.__init__
def remember(self, *args, **kwargs):
    made(self, *args, **kwargs)
    runs.append(self)
T.Run.__init__ = remember
rank = MPI.COMM_WORLD.Get_rank()
if signal and rank == 1:  # rank 1 killed (9) or frozen (19) once rank 0 has written a checkpoint
    def killer():
        while not os.path.exists(os.path.join(options["out_dir"], "last.h5")):
            time.sleep(0.02)
        os.kill(os.getpid(), signal)
    threading.Thread(target=killer, daemon=True).start()
T.train(data_parallel=True, **options)
weights = [p.numpy() for p in runs[0].model.params()]
np.savez(os.path.join(options["out_dir"], f"rank{rank}.npz"), *weights)
'''


def mpirun(tmp_path, options, timeout=120, env=None):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    return subprocess.run(MPIRUN + [sys.executable, str(script), json.dumps(options)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return str(path)


def weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def test_two_ranks_take_the_steps_of_one_process(tmp_path, tiny_model, dataset):
    """The heart of data parallelism: the same weights and losses as one process with the same global batch.

    The ranks shard each global batch of 8 and augment their rows as the single
    process does (Loader(shard=...)), so only the summation order differs. Three steps
    cross an epoch: the sharded validation must give the single process's figures.
    """
    common = dict(data=str(dataset), devices="cpu", batch_size=8, max_steps=3, log_every=1)
    one = train(tiny_model, out_dir=str(tmp_path / "one"), **common)
    done = mpirun(tmp_path, dict(model_path=tiny_model, out_dir=str(tmp_path / "two"), **common))
    assert done.returncode == 0, done.stdout + done.stderr
    two = load_checkpoint(str(tmp_path / "two" / "last.h5"))
    single = load_checkpoint(str(tmp_path / "one" / "last.h5"))
    assert two["step"] == single["step"] == 3
    for name, w in single.params.items():
        np.testing.assert_allclose(two.params[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(two.history["interval_loss"], one["interval_loss"], rtol=1e-5)
    np.testing.assert_allclose(two.history["val_loss"], one["val_loss"], rtol=1e-5)
    assert two.history["val_top1"] == one["val_top1"]
    # the replicas never drift: bit for bit the same weights on both ranks
    for a, b in zip(weights(tmp_path / "two" / "rank0.npz"), weights(tmp_path / "two" / "rank1.npz")):
        assert np.array_equal(a, b)
    # and each resumes its own checkpoint in step (the dead-rank test resumes two ranks' on one process)
    train(tiny_model, resume=str(tmp_path / "one" / "last.h5"), devices="cpu", max_steps=4,
          out_dir=str(tmp_path / "one"))
    done = mpirun(tmp_path, dict(model_path=tiny_model, resume=str(tmp_path / "two" / "last.h5"), devices="cpu",
                                 max_steps=4, out_dir=str(tmp_path / "two")))
    assert done.returncode == 0, done.stdout + done.stderr
    single, two = (load_checkpoint(str(tmp_path / run / "last.h5")) for run in ("one", "two"))
    assert two["step"] == single["step"] == 4
    for name, w in single.params.items():
        np.testing.assert_allclose(two.params[name], w, rtol=1e-5, atol=1e-6, err_msg=name)


# the tiny model with dropout 0.5 before its classifier, as AlexNet has before fc7 and fc8
TINY_DROPOUT_MODEL = (TINY_MODEL.replace("Conv2d, Flatten", "Conv2d, Dropout, Flatten")
                      .replace("        self.fc = Linear(",
                               "        self.drop = Dropout(0.5, device=d)\n        self.fc = Linear(")
                      .replace("self.fc(self.flat(self.pool(self.relu(self.conv1(x)))))",
                               "self.fc(self.drop(self.flat(self.pool(self.relu(self.conv1(x))))))"))


@pytest.mark.parametrize("text, devices", [(TINY_DROPOUT_MODEL, "cpu"), (SMALL_ALEXNET, "cpu,cpu")],
                         ids=["tiny", "alexnet"])
def test_two_ranks_with_dropout_take_the_steps_of_one_process(tmp_path, dataset, text, devices):
    """Dropout 0.5 (the tiny model's one layer; a small two-tower AlexNet's four, after fc6 and fc7): an
    element's mask is a function of (step, layer, global row), so each rank draws, for its rows, the masks one
    process draws for them; the weights and the loss history agree to float32 rounding."""
    assert TINY_DROPOUT_MODEL.count("Dropout") == 2 and "self.drop(" in TINY_DROPOUT_MODEL
    assert "dropout=0.5" in SMALL_ALEXNET
    model = tmp_path / "model.py"
    model.write_text(text)
    common = dict(data=str(dataset), devices=devices, batch_size=8, epochs=2, max_steps=3, log_every=1)
    one = train(str(model), out_dir=str(tmp_path / "one"), **common)
    done = mpirun(tmp_path, dict(model_path=str(model), out_dir=str(tmp_path / "two"), **common))
    assert done.returncode == 0, done.stdout + done.stderr
    two, single = (load_checkpoint(str(tmp_path / run / "last.h5")) for run in ("two", "one"))
    assert two["step"] == single["step"] == 3
    for name, w in single.params.items():
        np.testing.assert_allclose(two.params[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(two.momentum[name], single.momentum[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(two.history["interval_loss"], one["interval_loss"], rtol=1e-5)
    np.testing.assert_allclose(two.history["val_loss"], one["val_loss"], rtol=1e-5)
    assert two.history["val_top1"] == one["val_top1"]


@pytest.mark.gpu
@pytest.mark.parametrize("nccl", ["1", "0"], ids=["nccl", "mpi-without-nccl"])
def test_replicas_stay_identical_over_nccl_or_without_it(tmp_path, tiny_model, dataset, nccl):
    """On GPUs the gradients go through NCCL (the emulated one, over MPI, in CI), or, where CuPy has no NCCL
    (pip's cupy-cuda12x; MINIDL_EMULATE_NCCL=0 on emulated GPUs), through MPI on a host copy read back and
    written on the device's stream: 0 stream hazards either way, the replicas stay bit-identical, and the run
    still matches one process."""
    if gpu_count() < 2:
        pytest.skip("two ranks on one host need a GPU each")
    if nccl == "0" and not os.environ.get("MINIDL_EMULATE_GPUS"):
        pytest.skip("only the emulated GPUs can be without NCCL on demand")
    env = {**os.environ, "MINIDL_EMULATE_NCCL": nccl}
    found = subprocess.run([sys.executable, "-c", "from minidl.training.distributed import nccl_module; "
                            "print(nccl_module() is not None)"], capture_output=True, text=True, env=env)
    assert found.stdout.strip() == str(nccl == "1"), found.stdout + found.stderr  # the transport under test
    common = dict(data=str(dataset), devices="cuda:0", batch_size=8, max_steps=4, log_every=2)
    one = train(tiny_model, out_dir=str(tmp_path / "one"), **common)
    done = mpirun(tmp_path, dict(model_path=tiny_model, out_dir=str(tmp_path / "two"), **common), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stream hazard" not in done.stderr  # the emulator prints at exit any hazard a rank had and nobody took
    ranks = [weights(tmp_path / "two" / f"rank{r}.npz") for r in (0, 1)]
    for a, b in zip(*ranks):
        assert np.array_equal(a, b)
    two = load_checkpoint(str(tmp_path / "two" / "last.h5"))
    np.testing.assert_allclose(two.history["interval_loss"], one["interval_loss"], rtol=1e-5)


@pytest.mark.parametrize("signal, said", [(9, "prterun noticed that process rank 1"),  # Open MPI ends the job
                                           (19, "error: rank 0: no answer from the other ranks for 3 s")])
def test_a_dead_or_hung_rank_stops_the_job_and_the_checkpoint_resumes(tmp_path, tiny_model, dataset, signal, said):
    """A killed rank is reported by mpirun, which ends the job; a frozen one (SIGSTOP), which MPI cannot see,
    by the survivors' bounded wait. Either way the last checkpoint is whole, and resumes (here on one process)."""
    out = tmp_path / "run"
    start = time.monotonic()
    done = mpirun(tmp_path, dict(model_path=tiny_model, data=str(dataset), devices="cpu", batch_size=8, epochs=50,
                                 log_every=1, checkpoint_seconds=0, out_dir=str(out),
                                 signal_rank1_after_checkpoint=signal),
                  env={**os.environ, "MINIDL_PARALLEL_TIMEOUT": "3"})
    assert done.returncode != 0
    assert time.monotonic() - start < 60  # bounded: the survivor does not wait forever
    assert said in done.stdout + done.stderr, done.stdout + done.stderr
    assert not (out / "rank0.npz").exists()
    stopped = load_checkpoint(str(out / "last.h5"))["step"]
    history = train(tiny_model, resume=str(out / "last.h5"), devices="cpu", out_dir=str(out), max_steps=stopped + 1)
    assert history["interval_step"][-1] == stopped + 1


def test_the_global_batch_must_divide_among_the_ranks(tmp_path, tiny_model, dataset):
    done = subprocess.run(MPIRUN + [sys.executable, "-m", "minidl_cli.main", "train", tiny_model, "--data-parallel",
                                    "--data", str(dataset), "--devices", "cpu", "--batch-size", "7",
                                    "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error: --batch-size 7 (the global batch) does not divide among 2 ranks" in done.stderr


def run_ranks(tmp_path, script_text):
    """Run a script on two ranks; it writes what it found as JSON to argv[1] + ".RANK.json". Returns the
    finished mpirun and each rank's JSON."""
    script = tmp_path / "ranks.py"
    script.write_text(script_text)
    done = subprocess.run(MPIRUN + [sys.executable, str(script), str(tmp_path / "said")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, [json.loads((tmp_path / f"said.{rank}.json").read_text()) for rank in (0, 1)]


OVERLAP_SCRIPT = '''
import json, sys
import numpy as np
from minidl.core import Tensor
from minidl.layers import Layer, Linear, ReLU
from minidl.training.distributed import GradientBuckets, World


class Net(Layer):  # fc2 is used twice: its gradient arrives in two parts
    def __init__(self):
        super().__init__(device=None)
        self.fc1, self.fc2, self.fc3 = (Linear(i, o, device="cpu", rng=seed)
                                        for i, o, seed in ((6, 8, 1), (8, 8, 2), (8, 3, 3)))
        self.relu = ReLU(device="cpu")

    def forward(self, x):
        return self.fc3(self.relu(self.fc2(self.relu(self.fc2(self.relu(self.fc1(x)))))))


world = World()
overlapped, plain = Net(), Net()
events = []
buckets = GradientBuckets(overlapped.params(), world, bucket_bytes=1)  # one bucket per parameter
after = GradientBuckets(plain.params(), world, bucket_bytes=1, overlap=False)  # everything after backward
start = buckets._start
buckets._start = lambda k: (events.append(["start", k]), start(k))
steps = []
for step in range(4):
    if step == 3:  # closed: no hooks left, every bucket starts in average()
        buckets.close()
    x = np.random.default_rng([step, world.rank]).normal(size=(5, 6)).astype(np.float32)
    for model, b in ((overlapped, buckets), (plain, after)):
        model.zero_grad()
        ((model(Tensor(x)) ** 2).sum()).backward()
        if b is buckets:
            events.append(["backward returned"])
            local = [p.grad.numpy() for p in model.params()]
        b.average()
    every = world.comm.allgather(local)
    steps.append(dict(
        events=events[:], hooks=[len(layer.W.grad_hooks) for layer in (overlapped.fc1, overlapped.fc2, overlapped.fc3)],
        same=all(np.array_equal(p.grad.data, q.grad.data) for p, q in zip(overlapped.params(), plain.params())),
        mean=all(np.allclose(p.grad.data, (a + b) / 2, rtol=1e-6, atol=1e-7)
                 for p, a, b in zip(overlapped.params(), *every))))
    del events[:]
    for model in (overlapped, plain):  # a step, so the next one has other weights
        for p in model.params():
            p.data -= 0.1 * p.grad.data
with open(sys.argv[1] + f".{world.rank}.json", "w") as f:
    json.dump(steps, f)
'''


def test_buckets_start_during_backward_and_match_the_reduce_after_it(tmp_path):
    """The buckets' reduces start from the grad hooks, before backward returns, in the reverse parameter order
    on every rank; the means are bit for bit those of packing and reducing everything after backward. A
    weight used twice (Tensor.uses counts its uses in the forward) is packed once, after its second gradient,
    from the first step on; close() takes the hooks off, and the buckets then reduce after backward."""
    _, said = run_ranks(tmp_path, OVERLAP_SCRIPT)
    for steps in said:
        backward_done = ["backward returned"]
        # six buckets (fc1.W, fc1.b, fc2.W, fc2.b, fc3.W, fc3.b): all started during backward, last first
        for step in steps[:3]:
            assert step["events"] == [["start", k] for k in (5, 4, 3, 2, 1, 0)] + [backward_done]
        assert steps[3]["hooks"] == [0, 0, 0] and steps[0]["hooks"] == [1, 1, 1]
        assert steps[3]["events"] == [backward_done] + [["start", k] for k in (5, 4, 3, 2, 1, 0)]
        assert all(step["same"] and step["mean"] for step in steps), steps


NCCL_RULES_SCRIPT = '''
import json, sys
from mpi4py import MPI
from minidl.device import cupy
from minidl_emulator import cuda
from minidl_emulator.cuda import nccl

cp, rank = cupy(), MPI.COMM_WORLD.Get_rank()
said = {}


def attempt(name, call):
    try:
        call()
        said[name] = "ok"
    except Exception as e:
        said[name] = f"{type(e).__name__}: {e}"


def all_reduce(array, stream, count=None, into=None):
    into = array if into is None else into
    comm.allReduce(array.data.ptr, into.data.ptr, array.size if count is None else count, nccl.NCCL_FLOAT32,
                   nccl.NCCL_SUM, stream.ptr)


unique_id = MPI.COMM_WORLD.bcast(nccl.get_unique_id() if rank == 0 else None)
with cp.cuda.Device(0):
    comm = nccl.NcclCommunicator(2, unique_id, rank)
    mine, other = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    with other:
        flat = cp.arange(6, dtype=cp.float32) + rank  # packed on another stream ...
    mine.wait_event(other.record())  # ... and ordered before the reduce
    attempt("ordered", lambda: all_reduce(flat, mine))
    with other:
        attempt("read on another stream without waiting", lambda: flat * 2)
    mine.synchronize()
    said["sum"] = cp.asnumpy(flat).tolist()
    with mine:
        apart = cp.zeros(6, dtype=cp.float32)
    attempt("into another buffer, from an offset", lambda: all_reduce(flat[2:], mine, into=apart))
    mine.synchronize()
    said["apart"] = cp.asnumpy(apart).tolist()
    attempt("overlapping", lambda: all_reduce(flat[:4], mine, into=flat[2:]))
    attempt("empty", lambda: all_reduce(flat, mine, count=0))
    attempt("int32", lambda: comm.allReduce(flat.data.ptr, flat.data.ptr, 6, 2, nccl.NCCL_SUM, mine.ptr))
    with other:
        unordered = cp.ones(4, dtype=cp.float32)
    attempt("packed on another stream without waiting", lambda: all_reduce(unordered, mine))
    mine.wait_event(other.record())
    attempt("past the end", lambda: all_reduce(unordered, mine, count=5))
    attempt("a stream never made", lambda: comm.allReduce(unordered.data.ptr, unordered.data.ptr, 4,
                                                          nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 10 ** 9))
with cp.cuda.Device(1):
    elsewhere = cp.ones(4, dtype=cp.float32)
    attempt("a buffer on another GPU", lambda: all_reduce(elsewhere, cp.cuda.Stream.null))
    stream_elsewhere = cp.cuda.Stream(non_blocking=True)
    attempt("a stream of another GPU", lambda: all_reduce(unordered, stream_elsewhere))
with open(sys.argv[1] + f".{rank}.json", "w") as f:
    json.dump(said, f)
'''


@pytest.mark.skipif(not os.environ.get("MINIDL_EMULATE_GPUS"), reason="checks the GPU emulator: --emulate-gpus 2")
def test_the_emulated_nccl_is_checked_as_every_device_operation(tmp_path):
    """The emulated allReduce is one operation on its stream, reading and writing the buffers it is given by
    address: the hazard checker sees it, and memory or a stream that is not there is refused (on both ranks
    alike, before any message, so no rank waits for a collective the other abandoned)."""
    done, every = run_ranks(tmp_path, NCCL_RULES_SCRIPT)
    for said in every:
        assert said["ordered"] == "ok"
        assert said["sum"] == [2 * i + 1 for i in range(6)]  # (i + 0) + (i + 1)
        assert said["read on another stream without waiting"].startswith("StreamHazard:")
        assert "written by non-blocking stream" in said["read on another stream without waiting"]
        assert "in all_reduce" in said["read on another stream without waiting"]  # the writer: the reduce
        assert said["into another buffer, from an offset"] == "ok"
        assert said["apart"] == [2 * (2 * i + 1) for i in range(2, 6)] + [0, 0]  # the sums, summed again
        assert said["overlapping"] == "ValueError: NCCL allReduce's sendbuf and recvbuf overlap without being " \
                                      "the same buffer"
        assert said["empty"] == "ok"
        assert said["int32"] == "NotImplementedError: the emulated NCCL sums float32 and float64 only, not datatype 2"
        assert said["packed on another stream without waiting"].startswith("StreamHazard: NCCL allReduce on")
        assert said["past the end"].startswith("ValueError: NCCL allReduce's sendbuf is address 0x")
        assert "but 20 bytes from there run past the end of the 16-byte array made at" in said["past the end"]
        assert said["a stream never made"].startswith("CUDARuntimeError: cudaErrorInvalidResourceHandle")
        assert said["a buffer on another GPU"] == ("ValueError: NCCL allReduce's sendbuf is on emulated GPU 1, "
                                                   "the communicator on GPU 0")
        assert said["a stream of another GPU"] == ("ValueError: NCCL allReduce's stream is of emulated GPU 1, "
                                                   "the communicator on GPU 0")
    # the two hazards each rank caught are also printed when it exits: a swallowed one still shows
    assert done.stderr.count("minidl emulator: 2 stream hazard(s) in this process:") == 2, done.stderr


@pytest.mark.parametrize("value", ["nan", "-1", "0", "soon"])
def test_a_wait_limit_that_is_no_positive_number_is_refused(monkeypatch, value):
    from minidl.errors import MinidlError
    from minidl.training.distributed import TIMEOUT_ENV, wait_limit
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(MinidlError, match=f"^{TIMEOUT_ENV}='{value}': give seconds, e.g. 600$"):
        wait_limit()
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert wait_limit() == 2.5


class Node:
    """What rank_device_map reads of a World: this rank's place among the ranks on its host."""
    def __init__(self, local_rank, local_size):
        self.local_rank, self.local_size = local_rank, local_size


@pytest.mark.parametrize("local_rank, requested, gpus, expected", [
    (1, "cuda:0,cuda:1", 4, {0: 2, 1: 3, 2: 2, 3: 3}),  # two GPUs per rank: rank 1 gets GPUs 2 and 3
    (1, "cuda:0", 4, {0: 1, 1: 1, 2: 1, 3: 1}),  # one GPU per rank
    (0, None, 4, {0: 0, 1: 1, 2: 0, 3: 1}),  # by default the host's GPUs shared out evenly (at most two)
    (1, None, 2, {0: 1, 1: 1}),
    (0, "cpu", 4, {}), (0, "cuda:0", 0, {}),  # nothing to share out
])
def test_rank_device_map_returns_this_ranks_slice_and_changes_nothing(local_rank, requested, gpus, expected):
    from minidl.device import physical_index
    from minidl.training.distributed import rank_device_map
    before = [physical_index(i) for i in range(4)]
    assert rank_device_map(Node(local_rank, 2), requested, gpus) == expected
    assert [physical_index(i) for i in range(4)] == before  # pure: the caller applies the map


def test_rank_device_map_refuses_more_gpus_than_the_host_has():
    from minidl.errors import MinidlError
    from minidl.training.distributed import rank_device_map
    with pytest.raises(MinidlError, match="^2 ranks on this host with 2 GPU\\(s\\) each need 4 GPUs; it has 3: "):
        rank_device_map(Node(0, 2), "cuda:0,cuda:1", 3)


def _rank1_poisoned():
    from test_reliability import training_outputs_changed
    return training_outputs_changed(TINY_MODEL, "\nimport math\nfrom mpi4py import MPI\n",
                                    "y * math.nan if n == 3 and MPI.COMM_WORLD.Get_rank() == 1 else y")


@pytest.mark.parametrize("devices", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_one_ranks_bad_loss_is_judged_alike_on_every_rank(tmp_path, dataset, devices):
    """No rank reads its verdict back each step: a rank's NaN loss reaches the others through the summed
    gradients, so every rank skips that step (--skip-nonfinite), or stops there naming it."""
    if devices != "cpu" and gpu_count() < 2:
        pytest.skip("two ranks on one host need a GPU each")
    model = tmp_path / "poisoned.py"
    model.write_text(_rank1_poisoned())
    # two epochs of two batches: the third call is the second epoch's first batch
    common = dict(model_path=str(model), data=str(dataset), devices=devices, batch_size=8, log_every=2)
    done = mpirun(tmp_path, dict(out_dir=str(tmp_path / "skip"), skip_nonfinite=True, **common))
    assert done.returncode == 0 and "stream hazard" not in done.stderr, done.stdout + done.stderr
    ranks = [weights(tmp_path / "skip" / f"rank{r}.npz") for r in (0, 1)]
    for a, b in zip(*ranks):
        assert np.isfinite(a).all() and np.array_equal(a, b)
    assert load_checkpoint(str(tmp_path / "skip" / "last.h5"))["step"] == 3
    done = mpirun(tmp_path, dict(out_dir=str(tmp_path / "stop"), **common))
    assert done.returncode != 0
    assert "training stopped at epoch 2, batch 1: the loss of another rank's shard is not finite" in done.stderr
    assert "training stopped at epoch 2, batch 1: the loss is nan" in done.stderr


REDUCE_STREAM_SCRIPT = '''
import json, sys
import numpy as np
import minidl
from minidl.core import Tensor
from minidl.layers import Linear
from minidl.training.distributed import GradientBuckets, World, nccl_module

world = World()
dev = minidl.device("cuda:0")
nccl = nccl_module()
streams = []
plain = nccl.NcclCommunicator.allReduce
nccl.NcclCommunicator.allReduce = lambda self, *args: (streams.append(args[-1]), plain(self, *args))[1]
layer = Linear(6, 3, device=dev, rng=1)
with GradientBuckets(layer.params(), world) as buckets:
    for step in range(2):
        layer.zero_grad()
        x = Tensor(np.full((4, 6), world.rank + 1.0, np.float32), device=dev)
        (layer(x) ** 2).sum().backward()
        buckets.average()
        buckets.settle()
with open(sys.argv[1] + f".{world.rank}.json", "w") as f:
    json.dump(dict(streams=streams, compute=dev.stream.ptr, grad=layer.W.grad.numpy().tolist()), f)
'''


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("MINIDL_EMULATE_GPUS"), reason="the emulated NCCL: --emulate-gpus 2")
def test_the_sums_run_on_a_stream_of_their_own(tmp_path):
    """NCCL is enqueued on a reduce stream, not the compute stream, so it can overlap backward; the events
    around it leave no hazard (the emulator would raise), and both ranks get the same mean."""
    done, said = run_ranks(tmp_path, REDUCE_STREAM_SCRIPT)
    assert "stream hazard" not in done.stderr
    for rank in said:
        assert len(rank["streams"]) >= 2 and rank["compute"] not in rank["streams"]
    assert said[0]["grad"] == said[1]["grad"]
