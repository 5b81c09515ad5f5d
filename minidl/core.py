"""The autograd engine: Tensor, Function and reverse-mode backward.

A Tensor wraps an ndarray (NumPy or CuPy) and remembers the Function that made it. A Function
computes on raw arrays, `forward(*arrays)` and `backward(*output_grads)`, with the inputs' device
current. Calling a Function records the graph only when a gradient is wanted: the function keeps its
inputs and its outputs by weak reference, so the graph dies with the last tensor that uses it.
`Tensor.backward()` walks the graph newest generation first, as DeZero does, so every gradient is
complete before the function that made it runs. A generation's functions never feed each other: the
CPU wing (minidl.cpu.threads) may run them side by side, each on up its chain of functions.
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import threading
import weakref
from typing import Any, Callable, ContextManager, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import ml_dtypes
import numpy as np

from minidl.cpu import threads as cpu_threads
from minidl.device import Device, device as as_device, device_of_array, is_array
from minidl.errors import MinidlError

Array = Any  # a NumPy or CuPy ndarray
T = TypeVar("T")

_state = threading.local()
_counting_uses = threading.Lock()


def grad_enabled() -> bool:
    """Whether calling a Function records the graph, in this thread."""
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def grad_mode(enabled: bool) -> Iterator[None]:
    """Build a graph inside the block or not (per thread)."""
    previous = grad_enabled()
    _state.grad_enabled = enabled
    try:
        yield
    finally:
        _state.grad_enabled = previous


def no_grad() -> ContextManager[None]:
    """Build no graph inside the block (per thread): for evaluation and updates."""
    return grad_mode(False)


def in_this_grad_mode(call: Callable[[], T]) -> Callable[[], T]:
    """`call`, to run in this thread's present grad mode from whichever thread runs it."""
    enabled = grad_enabled()

    def run():
        with grad_mode(enabled):
            return call()
    return run


# 16-bit floats: NumPy's float16 and ml_dtypes' bfloat16. On the CPU a Function computes them in float32 and
# rounds each output once, as the GPU kernels accumulate in float: NumPy would round after every operation
# (float16), and has next to no bfloat16 arithmetic. Storage for testing, not a speed-up on a CPU.
HALF_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _as_array(data, dev):
    """An ndarray on `dev` from an array, a list or a scalar (floats become float32)."""
    if is_array(data):
        array = data
    elif isinstance(data, np.generic):
        array = np.asarray(data)  # NumPy scalars (what 0-d arithmetic returns) keep their dtype
    else:
        array = np.asarray(data)
        if array.dtype == np.float64:
            array = array.astype(np.float32)  # like PyTorch: Python floats are float32
    if array.dtype == object or (array.dtype.kind not in "biuf" and array.dtype not in HALF_DTYPES):
        raise MinidlError(f"a Tensor holds numbers, not dtype {array.dtype}")
    if dev.is_cuda:
        with dev:
            return dev.xp.asarray(array)
    if not isinstance(array, np.ndarray):
        with device_of_array(array):  # read on the array's own device and stream
            array = array.get()
    return array


class Tensor:
    """An ndarray with a gradient and the Function that created it."""

    __array_priority__ = 200  # so numpy_array * tensor calls Tensor.__rmul__

    def __init__(self, data: Union[Tensor, Array, float, Sequence], requires_grad: bool = False,
                 device: Union[Device, str, None] = None):
        if isinstance(data, Tensor):
            data = data.data
        dev = as_device(device) if device is not None else (
            device_of_array(data) if is_array(data) else as_device("cpu"))
        self.data = _as_array(data, dev)
        self.device = dev
        self.requires_grad = requires_grad
        self.grad: Optional[Tensor] = None
        self.creator: Optional[Function] = None
        self.generation = 0

    # --- what the tensor is
    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        body = str(self.numpy()).replace("\n", "\n       ")
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({body}, device='{self.device}'{grad})"

    def numpy(self) -> np.ndarray:
        """A host (NumPy) copy of the data, once the device's stream has produced it."""
        if not self.device.is_cuda:
            return self.data.copy()
        with self.device:
            return self.data.get()

    def item(self) -> Union[int, float, bool]:
        return self.numpy().item()

    def detach(self) -> Tensor:
        return Tensor(self.data, device=self.device)

    # --- autograd
    def set_creator(self, function: Function) -> None:
        self.creator = function
        self.generation = function.generation + 1

    def backward(self, grad: Union[Tensor, Array, float, None] = None, retain_grad: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's .grad.

        `grad` defaults to 1 for a scalar. Intermediate gradients are freed as
        soon as they are used unless `retain_grad`; each function's saved
        arrays are freed after its backward.
        """
        grad = self._seed_gradient(grad)
        with self.device:
            self._accumulate(grad)
        if self.creator is not None:
            _backward_graph(self.creator, retain_grad)

    def _seed_gradient(self, grad):
        """backward's `grad` as an array of this tensor's shape on its device."""
        if grad is None:
            if self.size != 1:
                raise MinidlError(
                    f"backward of a tensor of shape {self.shape} needs a gradient argument "
                    "(only a scalar's gradient defaults to 1)")
            with self.device:
                return self.device.xp.ones_like(self.data)
        if isinstance(grad, Tensor) and grad.device is not self.device:
            raise MinidlError(f"gradient on {grad.device} for a tensor on {self.device}")
        grad = grad.data if isinstance(grad, Tensor) else _as_array(grad, self.device)
        if grad.shape != self.shape:
            raise MinidlError(f"gradient of shape {grad.shape} for a tensor of shape {self.shape}")
        return grad

    # Callables hook(tensor), run each time backward has added a gradient into this tensor's .grad
    # (once per use of the tensor in the graph). A class-level empty tuple: a tensor without hooks
    # pays one truth test. Parameters get a list (minidl.layers.Parameter); data parallelism uses
    # them to start reducing a bucket of gradients while the backward pass goes on.
    grad_hooks: Sequence[Callable[[Tensor], None]] = ()

    # How many recorded functions take this tensor as an input (a class-level 0 until one does).
    uses = 0

    def _accumulate(self, grad):
        if self.grad is None:
            self.grad = Tensor(grad, device=self.device)
        else:
            self.grad = Tensor(self.grad.data + grad, device=self.device)
        if self.grad_hooks:
            for hook in self.grad_hooks:
                hook(self)

    def zero_grad(self) -> None:
        self.grad = None

    # Operators (+, *, @, [...]) and methods such as to, astype, sum and reshape are the
    # functions of minidl.functions, installed there (install_tensor_methods): the
    # functions import this module, never the reverse.


def _backward_graph(creator, retain_grad):
    """Backward from `creator`: DeZero's loop, newest generation first, a generation (a wave) at a time.

    Each function of a wave runs on up its chain (_backward_chain); the
    gradients the chains leave are summed here in the wave's order, whichever
    finished first, and their creators join the queue.
    """
    heap, queued = [], set()
    # tensors holding a gradient their creator has not consumed yet; kept alive
    # here because the function that used them may already have released them
    pending = {}

    def enqueue(function):
        if id(function) not in queued:
            queued.add(id(function))
            # id breaks ties so heapq never compares two Functions
            heapq.heappush(heap, (-function.generation, id(function), function))

    enqueue(creator)
    while heap:
        starts = _wave_starts(_pop_generation(heap), pending)
        for x, gx in (pair for pairs in _run_wave(starts, retain_grad) for pair in pairs):
            with x.device:  # on the inputs' device and stream
                x._accumulate(gx)
            if x.creator is not None:
                pending[id(x)] = x
                enqueue(x.creator)


def _pop_generation(heap):
    """The functions of the newest generation in the heap: none of them feeds another."""
    wave = [heapq.heappop(heap)[2]]
    while heap and heap[0][0] == -wave[0].generation:
        wave.append(heapq.heappop(heap)[2])
    return wave


def _wave_starts(wave, pending):
    """[(function, its output gradients)] for the wave's functions that got any gradient."""
    starts = []
    for function in wave:
        _check_not_released(function)
        outputs = [ref() for ref in function.outputs]
        for y in outputs:
            if y is not None:
                pending.pop(id(y), None)
        output_grads = [None if y is None or y.grad is None else y.grad.data for y in outputs]
        if any(g is not None for g in output_grads):
            starts.append((function, output_grads))
    return starts


def _run_wave(starts, retain_grad):
    """Each start's chain, in the wave's order: the gradients each left, [[(input, gradient)]].

    On the CPU the chains go to the CPU wing, which runs them side by side, a
    core each, when they mirror each other: one kind of function on inputs of
    the same shapes. GPU work stays in this thread: it only queues kernels.
    """
    chains = [functools.partial(_backward_chain, function, output_grads, retain_grad)
              for function, output_grads in starts]
    functions = [function for function, _ in starts]
    if not functions or any(function.device.is_cuda for function in functions):
        return [chain() for chain in chains]
    kinds = [(type(function), [x.shape for x in function.inputs]) for function in functions]
    return cpu_threads.side_by_side_if_alike([in_this_grad_mode(chain) for chain in chains], kinds,
                                             sum(x.size for x in functions[0].inputs))


def _check_not_released(function):
    if function.released:
        raise MinidlError("backward through the same graph twice: its saved arrays "
                          "were freed by the first backward; run the forward again")


def _backward_chain(function, output_grads, retain_grad):
    """Run function's backward, then on up its chain; the gradients left for the caller, [(input, gradient)].

    The chain goes on, here, to the creator of the function's one input that
    has a creator, when that input's gradient is complete (_chain_next). It
    stops where the graph forks or joins, at tensors with hooks and on GPUs:
    those gradients are left to the caller, which sums them in a fixed order
    and runs what they lead to in the next wave. So chains never write the
    same tensor.
    """
    left = []
    while True:
        pairs = _input_gradients(function, output_grads)
        follow = _chain_next(function, pairs)
        for x, gx in pairs:
            if x is follow:
                x._accumulate(gx)  # nothing else reaches x: no other chain writes it
            else:
                left.append((x, gx))
        _release(function, retain_grad)
        if follow is None:
            return left
        function, output_grads = follow.creator, [follow.grad.data]


def _input_gradients(function, output_grads):
    """[(input, gradient)] from function's backward for the inputs that need one, each in its input's dtype."""
    _check_not_released(function)
    if function.widened is not None:
        output_grads = _widen(output_grads)  # rounded back to each input's dtype below
    with function.device:
        input_grads = function.backward(*output_grads)
    if not isinstance(input_grads, tuple):
        input_grads = (input_grads,)
    pairs = []
    for x, gx in zip(function.inputs, input_grads):
        if gx is None or not x.requires_grad:
            continue
        if gx.shape != x.shape:
            raise AssertionError(f"{type(function).__name__}.backward gave a gradient of "
                                 f"shape {gx.shape} for an input of shape {x.shape}")
        if gx.dtype != x.dtype and x.dtype.kind == "f":
            with function.device:
                gx = gx.astype(x.dtype)  # a gradient has its tensor's dtype, as in PyTorch
        pairs.append((x, gx))
    return pairs


def _widen(arrays):
    """16-bit host arrays as float32 (others as they are)."""
    return [a.astype(np.float32) if a is not None and a.dtype in HALF_DTYPES else a for a in arrays]


def _chain_next(function, pairs):
    """The input a chain goes on to after `function`, or None.

    It is the function's one input that has a creator (the others are leaves,
    such as weights), when its gradient is complete now (_complete_after) and
    no gradient of this function has hooks: the caller runs those as soon as
    the gradient is in (data parallelism's reduces).
    """
    made = [x for x, _ in pairs if x.creator is not None]
    if len(made) != 1 or any(x.grad_hooks for x, _ in pairs) or not _complete_after(made[0], function):
        return None
    return made[0]


def _complete_after(x, function):
    """Whether x's gradient is complete once `function`, its one use, has run: x is its creator's one output,
    has no hooks (they run in the caller), and both functions are on the CPU (GPU work stays in the caller's thread)."""
    return (x.uses == 1 and len(x.creator.outputs) == 1 and not x.grad_hooks
            and not function.device.is_cuda and not x.creator.device.is_cuda)


def _release(function, retain_grad):
    """Free what function's backward needed and, unless `retain_grad`, its outputs' gradients."""
    if not retain_grad:
        for ref in function.outputs:
            y = ref()
            if y is not None:
                y.grad = None
    function.release()


def as_tensor(value: Union[Tensor, Array, float], like: Tensor) -> Tensor:
    """A Tensor from a Tensor, an array or a scalar; scalars take `like`'s device and dtype."""
    if isinstance(value, Tensor):
        return value
    if is_array(value):
        return Tensor(value)
    # a scalar takes `like`'s dtype, except a float next to integers (2 * 0.5 is not 0)
    dtype = like.dtype if like.dtype.kind == "f" or np.asarray(value).dtype.kind in "biu" else np.float32
    # made on like's device and stream, where the function that uses it runs: on the GPU's
    # legacy default stream it would race with the device's own non-blocking stream
    return Tensor(np.asarray(value, dtype=dtype), device=like.device)


class Function:
    """One differentiable operation on arrays.

    `forward(*arrays) -> array or tuple` computes the outputs and `backward(*output_grads) -> grad
    or tuple of grads` the input gradients (None for an input that needs none; `self.needs_grad[i]`
    says which do). By default they run `forward_cpu` or `forward_gpu` (`backward_cpu` or
    `backward_gpu`) by the inputs' device: the CPU/GPU choice is made here, in one place. An
    operation whose one array-module path (`xp = self.device.xp`) serves both devices overrides
    `forward` and `backward` instead. Arrays backward needs are kept with `self.save(...)` and read
    from `self.saved`, freed once the backward has run.
    """

    device: Optional[Device] = None  # set per call: the device whose arrays this function computes on
    saved: Optional[Tuple[Array, ...]] = None
    released = False
    # On the CPU, 16-bit inputs are computed in float32 (HALF_DTYPES); `widened` is their dtype, for backward.
    # False for operations exact in any dtype (a cast, a copy); keeps_float32: float32 outputs stay so (a loss).
    widens_half, keeps_float32, widened = True, False, None

    def __call__(self, *inputs: Union[Tensor, Array, float]) -> Union[Tensor, List[Tensor]]:
        inputs = [as_tensor(x, like=_first_tensor(inputs)) for x in inputs]
        self.device = self._device_of(inputs)
        arrays = [x.data for x in inputs]
        if self.widens_half and not self.device.is_cuda:
            self.widened = next((a.dtype for a in arrays if a.dtype in HALF_DTYPES), None)
            if self.widened is not None:
                arrays = _widen(arrays)
        with self.device:
            outputs = self.forward(*arrays)
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        if self.widened is not None and not self.keeps_float32:
            outputs = [y.astype(self.widened) if y.dtype == np.float32 else y for y in outputs]
        outputs = [Tensor(y, device=d) for y, d in zip(outputs, self.output_devices(len(outputs)))]
        if grad_enabled() and any(x.requires_grad for x in inputs):
            self.needs_grad = [x.requires_grad for x in inputs]
            self.generation = max(x.generation for x in inputs)
            for y in outputs:
                y.requires_grad = True
                y.set_creator(self)
            with _counting_uses:  # functions recorded side by side may share an input
                for x in inputs:
                    x.uses += 1  # lets backward know when x's gradient is complete (_backward_chain)
            self.inputs = inputs
            self.outputs = [weakref.ref(y) for y in outputs]
        else:
            self.saved = None  # nothing will call backward: free what forward saved
        return outputs[0] if single else outputs

    def _device_of(self, inputs):
        devices = {x.device for x in inputs}
        if len(devices) > 1:
            names = " and ".join(sorted(str(d) for d in devices))
            raise MinidlError(f"{type(self).__name__} got inputs on different devices ({names}); "
                              "move one with minidl.functions.copy(x, device)")
        return inputs[0].device

    def output_device(self) -> Device:
        return self.device

    def output_devices(self, count: int) -> List[Device]:
        """Each output's device: output_device() for all, except where a function's outputs are on several
        (transfer.Exchange)."""
        return [self.output_device()] * count

    def save(self, *arrays: Array) -> None:
        self.saved = arrays

    def release(self) -> None:
        """Drop what backward needed; called once backward has run."""
        self.saved = None
        self.inputs = ()
        self.outputs = ()
        self.released = True

    def forward(self, *xs: Array) -> Union[Array, Tuple[Array, ...]]:
        return self.forward_gpu(*xs) if self.device.is_cuda else self.forward_cpu(*xs)

    def backward(self, *gys: Array) -> Union[Array, None, Tuple[Optional[Array], ...]]:
        return self.backward_gpu(*gys) if self.device.is_cuda else self.backward_cpu(*gys)

    def forward_cpu(self, *xs):
        raise NotImplementedError(f"{type(self).__name__} has no forward_cpu (nor forward)")

    def forward_gpu(self, *xs):
        raise NotImplementedError(f"{type(self).__name__} has no forward_gpu (nor forward)")

    def backward_cpu(self, *gys):
        raise NotImplementedError(f"{type(self).__name__} has no backward_cpu (nor backward)")

    def backward_gpu(self, *gys):
        raise NotImplementedError(f"{type(self).__name__} has no backward_gpu (nor backward)")


def _first_tensor(values):
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise MinidlError("a function needs at least one Tensor argument")
