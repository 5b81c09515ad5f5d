"""The CPU paths split across cores: every index covered once, errors surfaced, and the
results of each threaded operation bit for bit the same whatever the number of cores;
independent calls (AlexNet's towers) side by side, one core each, in forward and backward."""
import os
import signal
import subprocess
import sys
import functools
import threading
import time
import types

import numpy as np
import pytest

import minidl
from minidl import Function, Tensor, no_grad
from minidl.cpu import threads as cpu_threads
from minidl.functions import conv2d, local_response_norm, max_pool2d, softmax_cross_entropy
from minidl.layers import Branches, Layer, seed_dropout
from minidl.optim import MomentumSGD


@pytest.fixture
def cores(monkeypatch):
    """cores(n): run as if on n cores; with n > 1 also in small cache blocks, to split the work every way."""
    block_items = cpu_threads.CACHE_BLOCK_ITEMS

    def use(count):
        monkeypatch.setattr(cpu_threads, "core_count", lambda: count)
        monkeypatch.setattr(cpu_threads, "CACHE_BLOCK_ITEMS", block_items if count == 1 else 2000)
    return use


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [0, 1, 4, 7, 100])
@pytest.mark.parametrize("blocks", [False, True])
def test_every_index_is_covered_once(cores, count, length, blocks):
    cores(count)
    array = np.broadcast_to(np.float32(0), (length, 1000))
    seen = np.zeros(length, dtype=int)
    parts = []

    def work(part):
        parts.append(part)
        seen[part] += 1
    cpu_threads.in_parallel(work, array, blocks=blocks)
    assert (seen == 1).all()
    assert all(p.stop > p.start for p in parts)
    if blocks:
        rows_per_block = max(1, cpu_threads.CACHE_BLOCK_ITEMS // 1000)
        assert all(p.stop - p.start <= rows_per_block for p in parts)
        assert len(parts) >= length // rows_per_block
    else:
        assert len(parts) == min(count, length)


def test_a_0d_array_is_one_call_with_an_ellipsis(cores):
    cores(2)
    parts = []
    cpu_threads.in_parallel(parts.append, np.zeros(()))
    assert parts == [...]


def test_the_shares_run_at_the_same_time(cores):
    cores(3)
    all_running = threading.Barrier(3, timeout=10)  # broken, and the test failed, unless 3 threads meet here
    cpu_threads.in_parallel(lambda part: all_running.wait(), np.zeros(3))


@pytest.mark.parametrize("failing_index", [0, 5])  # the caller's own share, and another thread's
def test_an_error_in_any_share_is_raised_after_all_shares_end(cores, failing_index):
    cores(2)
    finished = []

    def work(part):
        if failing_index in range(part.start, part.stop):
            raise ValueError("share failed")
        time.sleep(0.2)  # still running when the other share fails: in_parallel must wait for it
        finished.append(part)
    with pytest.raises(ValueError, match="share failed"):
        cpu_threads.in_parallel(work, np.zeros(10))
    assert len(finished) == 1


def run_with_cores(cores, count, fn):
    cores(count)
    return fn()


def conv_step(x, W, b, gy, stride, pad, groups):
    xt, Wt, bt = (Tensor(a, requires_grad=True) for a in (x, W, b))
    y = conv2d(xt, Wt, bt, stride=stride, pad=pad, groups=groups)
    y.backward(Tensor(gy))
    return y.data, xt.grad.data, Wt.grad.data, bt.grad.data


def unary_step(fn, x, gy):
    xt = Tensor(x, requires_grad=True)
    y = fn(xt)
    y.backward(Tensor(gy))
    return y.data, xt.grad.data


@pytest.mark.parametrize("op", ["conv stride 1", "conv stride 4", "lrn", "pool", "pool padded"])
def test_threaded_operations_do_not_depend_on_the_core_count(cores, op):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 6, 13, 13)).astype(np.float32)  # batch 5: uneven shares for 2 and 3 cores
    if op.startswith("conv"):
        stride, pad = (1, 1) if op == "conv stride 1" else (4, 0)
        W = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
        b = rng.standard_normal(8).astype(np.float32)
        oh = (13 + 2 * pad - 3) // stride + 1
        gy = rng.standard_normal((5, 8, oh, oh)).astype(np.float32)
        fn = lambda: conv_step(x, W, b, gy, stride, pad, 2)  # noqa: E731
    else:
        forward = {"lrn": lambda t: local_response_norm(t, 5, 2.0, 1e-2, 0.75),
                   "pool": lambda t: max_pool2d(t, 3, 2),
                   "pool padded": lambda t: max_pool2d(t, 3, 2, pad=1)}[op]
        gy = rng.standard_normal(forward(Tensor(x)).shape).astype(np.float32)
        fn = lambda: unary_step(forward, x, gy)  # noqa: E731
    one = run_with_cores(cores, 1, fn)
    for count in (2, 3):
        for single, split in zip(one, run_with_cores(cores, count, fn)):
            np.testing.assert_array_equal(single, split)


def test_optimizer_update_does_not_depend_on_the_core_count(cores):
    shapes = [(100, 70), (3, 4, 5, 5), (7,), ()]

    def two_steps():
        rng = np.random.default_rng(8)
        params = [Tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True) for s in shapes]
        optimizer = MomentumSGD(params, lr=0.1)
        for _ in range(2):
            for p in params:
                p.grad = Tensor(rng.standard_normal(p.shape).astype(np.float32))
            optimizer.step()
        return [p.data for p in params]
    one = run_with_cores(cores, 1, two_steps)
    three = run_with_cores(cores, 3, two_steps)
    for single, split in zip(one, three):
        np.testing.assert_array_equal(single, split)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_a_pool_of_its_own(cores):
    cores(2)
    cpu_threads.in_parallel(lambda part: None, np.zeros(2))  # the parent's pool now has a thread
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool thread does not exist here
        signal.alarm(10)  # a hang ends the child, and the test fails, instead of hanging the test run
        seen = np.zeros(2)

        def mark(part):
            seen[part] = 1
        cpu_threads.in_parallel(mark, seen)
        os._exit(0 if seen.all() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_command_shortens_openblas_spinning_unless_the_user_set_it_and_importing_minidl_does_not():
    def timeout_seen(module, **env):
        code = f"import {module}, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
        env = {**{k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}, **env}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    assert timeout_seen("minidl_cli") == "4"
    assert timeout_seen("minidl_cli", OPENBLAS_THREAD_TIMEOUT="20") == "20"
    assert timeout_seen("minidl") == "None"  # the library sets nothing process-wide


def test_a_bigger_pool_replaces_the_old_one_which_is_shut_down(cores):
    count = cpu_threads._pool_threads + 2  # more threads than the pool has (earlier tests may have grown it)
    cores(count)
    cpu_threads.in_parallel(lambda part: None, np.zeros(count))
    old = cpu_threads._pool
    cores(count + 1)
    cpu_threads.in_parallel(lambda part: None, np.zeros(count + 1))
    assert cpu_threads._pool is not old and cpu_threads._pool_threads == count
    assert old._shutdown  # its threads end rather than idle for the life of the process


# --- side_by_side: independent calls, each whole on one core

def test_side_by_side_runs_the_calls_at_once_each_on_one_core(cores):
    cores(2)
    blas = cpu_threads.blas_threads()
    threads_before = blas[0]() if blas else None
    both_running = threading.Barrier(2, timeout=10)  # broken, and the test failed, unless both calls meet
    seen = []

    def call(name):
        both_running.wait()
        parts = []
        cpu_threads.in_parallel(parts.append, np.zeros(10))
        seen.append((name, parts, blas[0]() if blas else None, threading.get_ident()))
        return name
    if blas is None:  # a BLAS whose threads cannot be set: the calls run in turn, and would never meet
        assert cpu_threads.side_by_side([lambda: "a", lambda: "b"]) == ["a", "b"]
        return
    assert cpu_threads.side_by_side([functools.partial(call, "a"), functools.partial(call, "b")]) == ["a", "b"]
    assert sorted(s[:3] for s in seen) == [("a", [slice(0, 10)], 1), ("b", [slice(0, 10)], 1)]  # one core each
    assert len({s[3] for s in seen}) == 2
    assert blas[0]() == threads_before  # BLAS has its threads back
    parts = []
    cpu_threads.in_parallel(parts.append, np.zeros(10))
    assert len(parts) == 2  # and in_parallel splits again


@pytest.mark.parametrize("failing", [0, 1])  # the caller's own call, and the other thread's
def test_side_by_side_raises_an_error_once_all_calls_end(cores, failing):
    cores(2)
    blas = cpu_threads.blas_threads()
    threads_before = blas[0]() if blas else None
    finished = []

    def fail():
        raise ValueError("call failed")

    def slow():
        time.sleep(0.2)  # still running when the other fails: side_by_side must wait for it
        finished.append(True)
    calls = [slow, slow]
    calls[failing] = fail
    with pytest.raises(ValueError, match="call failed"):
        cpu_threads.side_by_side(calls)
    assert finished == [True]
    if blas:
        assert blas[0]() == threads_before


def test_side_by_side_from_two_threads_at_once_leaves_the_blas_as_it_was(cores):
    cores(2)
    blas = cpu_threads.blas_threads()
    before = blas[0]() if blas else None
    results, errors = [], []

    def user(k):
        try:
            for _ in range(20):
                results.append(tuple(cpu_threads.side_by_side([lambda: k, lambda: k + 1])))
        except Exception as error:  # noqa: BLE001 -- reported below
            errors.append(error)
    users = [threading.Thread(target=user, args=(k,)) for k in (0, 10)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join()
    assert not errors and sorted(results) == [(0, 1)] * 20 + [(10, 11)] * 20
    if blas:
        assert blas[0]() == before


def test_side_by_side_runs_in_turn_on_one_core_without_blas_control_and_when_nested(cores, monkeypatch):
    def thread_of_each(count):
        return cpu_threads.side_by_side([threading.get_ident] * count)
    cores(1)
    assert set(thread_of_each(2)) == {threading.get_ident()}
    cores(2)
    monkeypatch.setattr(cpu_threads, "_blas", [None])  # a BLAS that cannot be held to one thread
    assert set(thread_of_each(2)) == {threading.get_ident()}
    monkeypatch.undo()
    cores(2)
    if cpu_threads.blas_threads() is not None:
        inner = cpu_threads.side_by_side([lambda: set(thread_of_each(2))] * 2)
        assert all(len(threads) == 1 for threads in inner)  # a call's own calls stay on its core


# --- in_slabs: cache-sized pieces shared out among the cores, every product on one BLAS thread

@pytest.mark.parametrize("count, slabs", [(1, 5), (2, 5), (4, 3), (4, 1), (3, 7)])
def test_in_slabs_runs_each_slab_once_in_order_on_one_blas_thread(cores, count, slabs):
    cores(count)
    blas = cpu_threads.blas_threads()
    before = blas[0]() if blas else None
    shares = min(count, slabs)
    firsts = {slabs * i // shares for i in range(shares)}  # each share's first slab
    # broken, and the test failed, unless every share has begun at once (with a BLAS that can be held)
    all_begun = threading.Barrier(shares if blas else 1, timeout=10)
    seen = []  # (slab, the BLAS's threads meanwhile): list.append is atomic

    def work(slab):
        if slab in firsts:
            all_begun.wait()
        seen.append((slab, blas[0]() if blas else None))
    cpu_threads.in_slabs(work, list(range(slabs)))
    assert sorted(slab for slab, _ in seen) == list(range(slabs))
    for first, end in zip(sorted(firsts), sorted(firsts)[1:] + [slabs]):  # each share in order
        assert [slab for slab, _ in seen if first <= slab < end] == list(range(first, end))
    if blas:
        assert {threads for _, threads in seen} == {1}  # also for one slab, and with fewer slabs than cores
        assert blas[0]() == before


def test_in_slabs_inside_side_by_side_runs_in_the_calls_thread(cores):
    cores(2)
    if cpu_threads.blas_threads() is None:
        pytest.skip("this BLAS's threads cannot be set, so side_by_side runs in turn here")

    def call():
        threads = set()
        cpu_threads.in_slabs(lambda slab: threads.add(threading.get_ident()), [0, 1, 2])
        return threads == {threading.get_ident()}
    assert cpu_threads.side_by_side([call, call]) == [True, True]


def test_in_slabs_of_nothing_does_nothing(cores):
    cores(2)
    cpu_threads.in_slabs(lambda slab: pytest.fail("no slab to run"), [])


class Scale(Layer):
    """x times a number, noting the thread it ran in."""

    def __init__(self, factor, device="cpu"):
        super().__init__(device)
        self.factor, self.threads = factor, []

    def forward(self, x):
        self.threads.append(threading.get_ident())
        return x * self.factor


def test_branches_build_a_graph_only_in_the_callers_grad_mode(cores):
    cores(2)
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    branches = Branches(Scale(2), Scale(3))
    with no_grad():
        assert all(y.creator is None for y in branches([x, x]))
    ys = branches([x, x])
    assert all(y.creator is not None for y in ys)
    np.testing.assert_array_equal(ys[1].data, np.full(3, 3, dtype=np.float32))


def test_branches_run_side_by_side_on_the_cpu_and_in_turn_on_gpus(cores):
    cores(2)
    if cpu_threads.blas_threads() is None:
        pytest.skip("this BLAS's threads cannot be set, so branches run in turn here")
    x = Tensor(np.ones(3, dtype=np.float32))
    branches = Branches(Scale(2), Scale(3))
    branches([x, x])
    assert len({thread for branch in branches for thread in branch.threads}) == 2
    on_gpu = Scale(2)
    on_gpu.device = types.SimpleNamespace(is_cuda=True)  # only its kind is read
    branches = Branches(on_gpu, Scale(3))
    assert branches.map(lambda branch: threading.get_ident()) == [threading.get_ident()] * 2


def test_branches_refuse_one_input_too_few():
    with pytest.raises(minidl.MinidlError, match="2 branches got 1 inputs"):
        Branches(Scale(2), Scale(3))([Tensor(np.ones(3, dtype=np.float32))])


class Meet(Function):
    """Identity whose backward waits for another's: the test fails unless both backwards run at once."""

    def __init__(self, barrier):
        self.barrier = barrier

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        self.barrier.wait()
        return gy


def tiny_branches_side_by_side(cores, monkeypatch):
    """Two cores, and the backward's branches side by side however small (the tests' are)."""
    monkeypatch.setattr(cpu_threads, "ALIKE_MIN_ITEMS", 0)
    cores(2)
    if cpu_threads.blas_threads() is None:
        pytest.skip("this BLAS's threads cannot be set, so branches run in turn here")


def test_backward_runs_a_generation_side_by_side(cores, monkeypatch):
    tiny_branches_side_by_side(cores, monkeypatch)
    x = Tensor(np.arange(4, dtype=np.float32), requires_grad=True)
    both = threading.Barrier(2, timeout=10)
    (Meet(both)(x) * 2 + Meet(both)(x) * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(4, 5, dtype=np.float32))


def count_side_by_side(monkeypatch):
    """The number of calls of each cpu_threads.side_by_side the backward makes, as a list filled as it runs."""
    calls = []
    real = cpu_threads.side_by_side

    def counting(functions):
        calls.append(len(functions))
        return real(functions)
    monkeypatch.setattr(cpu_threads, "side_by_side", counting)
    return calls


def test_backward_runs_each_branch_as_one_chain_and_the_branches_side_by_side(cores, monkeypatch):
    tiny_branches_side_by_side(cores, monkeypatch)
    calls = count_side_by_side(monkeypatch)
    x = Tensor(np.arange(4, dtype=np.float32), requires_grad=True)
    both = threading.Barrier(2, timeout=10)
    branches = [Meet(both)(x) * 2, Meet(both)(x) * 3]
    for i, branch in enumerate(branches):
        for _ in range(3):  # a chain of functions of one input each
            branch = branch.reshape(2, 2).reshape(4)
        branches[i] = branch
    (branches[0] + branches[1]).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(4, 5, dtype=np.float32))
    assert calls == [2]  # the sum and the add (the fork) in turn, then each branch whole, at once


def test_alexnet_towers_side_by_side_give_the_bits_of_the_towers_in_turn(cores, monkeypatch):
    """Forward and backward, at a size where the BLAS runs every product on one thread either way (at
    AlexNet's size its thread count changes the rounding of long sums, as it does between machines)."""
    from test_alexnet import SMALL_NETWORK, alexnet
    monkeypatch.setattr(cpu_threads, "ALIKE_MIN_ITEMS", 0)  # the backward's towers side by side too, though small

    def step():
        model = alexnet.AlexNet(4, ("cpu", "cpu"), seed=3, network=SMALL_NETWORK, pooled_size=1)
        seed_dropout(model, 0)
        x = Tensor(np.random.default_rng(3).standard_normal((4, 3, 19, 19)).astype(np.float32))
        loss = softmax_cross_entropy(model(x), np.array([0, 1, 2, 3]))
        loss.backward()
        return [loss.data] + [p.grad.data for p in model.params()]
    one = run_with_cores(cores, 1, step)
    for single, split in zip(one, run_with_cores(cores, 2, step)):
        np.testing.assert_array_equal(single, split)


def test_summary_lists_layers_in_model_order_though_the_towers_run_side_by_side(cores):
    from minidl.layers import summary
    from test_alexnet import SMALL_NETWORK, alexnet
    cores(2)
    net = alexnet.AlexNet(4, ("cpu", "cpu"), network=SMALL_NETWORK, pooled_size=1)
    leaves = [name for name, layer in net.named_layers() if not layer._layers]
    for _ in range(5):  # the towers' hooks fire in any order; the table's order must not follow them
        rows = summary(net, (1, 3, 19, 19)).splitlines()[2:2 + len(leaves)]
        assert [row.split()[0] for row in rows] == leaves


def test_the_command_sets_openblas_spinning_before_numpy_loads():
    """OpenBLAS reads its spinning time once, as NumPy loads it; spinning workers would take the core
    that the other tower needs (side_by_side holds the BLAS to one thread, not its idle workers)."""
    code = ("import os, sys\n"
            "seen = []\n"
            "class Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numpy' and not seen:\n"
            "            seen.append(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
            "sys.meta_path.insert(0, Watch())\n"
            "import minidl_cli.main\n"
            "print(seen)\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['4']"


def test_side_by_side_runs_in_turn_with_more_cores_than_calls_and_inside_in_parallel(cores):
    cores(3)  # two calls on three cores: each operation split over all three instead
    assert set(cpu_threads.side_by_side([threading.get_ident] * 2)) == {threading.get_ident()}
    cores(2)
    seen = []

    def work(part):  # a side_by_side inside in_parallel's work: in turn, in work's thread (no deadlock)
        seen.append(set(cpu_threads.side_by_side([threading.get_ident] * 2)) == {threading.get_ident()})
    cpu_threads.in_parallel(work, np.zeros(2))
    assert seen == [True, True]


def test_backward_runs_unlike_or_tiny_branches_in_turn(cores, monkeypatch):
    cores(2)
    calls = count_side_by_side(monkeypatch)
    x = Tensor(np.ones((200, 200), dtype=np.float32), requires_grad=True)
    (x.reshape(40000) * 2).sum().backward()  # one branch
    ((x * 2).sum() + (x * 3).sum()).backward()  # two alike, 40000 elements each: side by side
    ((x[:10] * 2).sum() + (x * 3).sum()).backward()  # unlike: a long branch would get one core
    ((x[:10] * 2).sum() + (x[10:20] * 3).sum()).backward()  # alike but tiny
    assert calls == [2]


class Record(Function):
    """Identity that notes when its backward runs."""

    def __init__(self, events, name):
        self.events, self.name = events, name

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        self.events.append(self.name)
        return gy


def test_a_chain_stops_where_a_gradient_has_hooks_so_they_run_at_once(cores):
    cores(2)
    events = []
    weights = [Tensor(np.ones((3, 3), dtype=np.float32), requires_grad=True) for _ in range(2)]
    for i, w in enumerate(weights):
        w.grad_hooks = [lambda t, i=i: events.append(f"hook {i}")]
    h = Tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    for i, w in enumerate(weights):
        h = Record(events, f"backward {i}")(h @ w)
    h.sum().backward()
    assert events == ["backward 1", "hook 1", "backward 0", "hook 0"]
