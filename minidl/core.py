"""The autograd engine: Tensor, Function and reverse-mode backward.

A Tensor wraps an ndarray (NumPy or CuPy) and remembers the Function that made
it. A Function computes on raw arrays: `forward(*arrays)` and
`backward(*output_grads)`, both run with the inputs' device current. Calling a
Function records the graph only when a gradient is wanted: the function keeps
its inputs (strong references) and its outputs by weak reference, so the graph
dies with the last tensor that uses it, without the garbage collector.

`Tensor.backward()` walks the graph newest generation first (a function's
generation is one more than its newest input's), so every output gradient is
complete, summed over all its uses, before the function that made it runs.
Functions of one generation never feed each other, so they run as one wave,
each going on up its chain of functions until the graph forks or joins; the
gradients they leave there are summed in the wave's order, whichever finished
first. On the CPU, branches that mirror each other (AlexNet's two towers: the
same functions on arrays of the same shapes) run side by side, a core each.
"""
import contextlib
import functools
import heapq
import threading
import weakref

import numpy as np

from minidl.cpu import threads as cpu_threads
from minidl.device import device as as_device, device_of_array, is_array
from minidl.errors import MinidlError

_state = threading.local()
_counting_uses = threading.Lock()


def grad_enabled():
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def grad_mode(enabled):
    """Build a graph inside the block or not (per thread)."""
    previous = grad_enabled()
    _state.grad_enabled = enabled
    try:
        yield
    finally:
        _state.grad_enabled = previous


def no_grad():
    """Build no graph inside the block (per thread): for evaluation and updates."""
    return grad_mode(False)


def side_by_side(calls, devices):
    """Results of independent calls, run at once, one core each, when all their `devices` are the CPU.

    For a model's parallel branches (AlexNet's towers): cpu_threads.side_by_side,
    with each call in the caller's grad mode. On GPUs the calls run in turn:
    they only queue work on the devices' streams.
    """
    if any(d.is_cuda for d in devices):
        return [call() for call in calls]
    enabled = grad_enabled()

    def in_callers_mode(call):
        with grad_mode(enabled):
            return call()
    return cpu_threads.side_by_side([functools.partial(in_callers_mode, call) for call in calls])


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
    if array.dtype == object or array.dtype.kind not in "biuf":
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

    def __init__(self, data, requires_grad=False, device=None):
        if isinstance(data, Tensor):
            data = data.data
        dev = as_device(device) if device is not None else (
            device_of_array(data) if is_array(data) else as_device("cpu"))
        self.data = _as_array(data, dev)
        self.device = dev
        self.requires_grad = requires_grad
        self.grad = None
        self.creator = None
        self.generation = 0

    # --- what the tensor is
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = str(self.numpy()).replace("\n", "\n       ")
        return f"Tensor({body}, device='{self.device}'{', requires_grad=True' if self.requires_grad else ''})"

    def numpy(self):
        """A host (NumPy) copy of the data, once the device's stream has produced it."""
        if not self.device.is_cuda:
            return self.data.copy()
        with self.device:
            return self.data.get()

    def item(self):
        return self.numpy().item()

    def detach(self):
        return Tensor(self.data, device=self.device)

    # --- autograd
    def set_creator(self, function):
        self.creator = function
        self.generation = function.generation + 1

    def backward(self, grad=None, retain_grad=False):
        """Accumulate d(self)/d(leaf) into every leaf's .grad.

        Intermediate gradients are freed as soon as they are used unless
        `retain_grad`; each function's saved arrays are freed after its backward.
        """
        if grad is None:
            if self.size != 1:
                raise MinidlError(
                    f"backward of a tensor of shape {self.shape} needs a gradient argument "
                    "(only a scalar's gradient defaults to 1)")
            with self.device:
                grad = self.device.xp.ones_like(self.data)
        else:
            if isinstance(grad, Tensor) and grad.device is not self.device:
                raise MinidlError(f"gradient on {grad.device} for a tensor on {self.device}")
            grad = grad.data if isinstance(grad, Tensor) else _as_array(grad, self.device)
            if grad.shape != self.shape:
                raise MinidlError(f"gradient of shape {grad.shape} for a tensor of shape {self.shape}")
        with self.device:
            self._accumulate(grad)
        if self.creator is None:
            return

        heap, queued = [], set()
        # tensors holding a gradient their creator has not consumed yet; kept alive
        # here because the function that used them may already have released them
        pending = {}

        def enqueue(function):
            if id(function) not in queued:
                queued.add(id(function))
                # id breaks ties so heapq never compares two Functions
                heapq.heappush(heap, (-function.generation, id(function), function))

        enqueue(self.creator)
        while heap:
            wave = [heapq.heappop(heap)[2]]  # the newest generation: none of these feeds another
            while heap and heap[0][0] == -wave[0].generation:
                wave.append(heapq.heappop(heap)[2])
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
            # each runs on up its own chain (_backward_chain), mirrored branches side by side on the
            # CPU; the gradients they leave for tensors with other uses are summed here, in the wave's order
            chains = [functools.partial(_backward_chain, function, output_grads, retain_grad)
                      for function, output_grads in starts]
            left = (side_by_side(chains, [function.device for function, _ in starts]) if _mirrored(starts)
                    else [chain() for chain in chains])
            for x, gx in (pair for pairs in left for pair in pairs):
                with x.device:  # on the inputs' device and stream
                    x._accumulate(gx)
                if x.creator is not None:
                    pending[id(x)] = x
                    enqueue(x.creator)

    # Callables hook(tensor), run each time backward has added a gradient into this tensor's .grad
    # (once per use of the tensor in the graph). A class-level empty tuple: a tensor without hooks
    # pays one truth test. Parameters get a list (minidl.layers.Parameter); data parallelism uses
    # them to start reducing a bucket of gradients while the backward pass goes on.
    grad_hooks = ()

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

    def zero_grad(self):
        self.grad = None

    # Operators (+, *, @, [...]) and methods such as to, astype, sum and reshape are the
    # functions of minidl.functions, installed there (install_tensor_methods): the
    # functions import this module, never the reverse.


def _check_not_released(function):
    if function.released:
        raise MinidlError("backward through the same graph twice: its saved arrays "
                          "were freed by the first backward; run the forward again")


# Below this many elements in the inputs of a wave's functions a thread handoff (tens of microseconds)
# costs more than running the branches in turn
MIRRORED_MIN_ITEMS = 1 << 15


def _mirrored(starts):
    """Whether a wave's functions start branches worth a core each: two or more, on the CPU, alike (one kind
    of function, inputs of the same shapes: AlexNet's towers), and not tiny. Branches unlike each other
    would give a long one a single core beside a short one."""
    functions = [function for function, _ in starts]
    first = functions[0] if functions else None
    return (len(functions) >= 2 and not any(f.device.is_cuda for f in functions)
            and all(type(f) is type(first) and [x.shape for x in f.inputs] == [x.shape for x in first.inputs]
                    for f in functions)
            and sum(x.size for x in first.inputs) >= MIRRORED_MIN_ITEMS)


def _complete_after(x, function):
    """Whether x's gradient is complete once `function`, its one use, has run: x is its creator's one output,
    has no hooks (they run in the caller), and both functions are on the CPU (GPU work stays in the caller's thread)."""
    return (x.uses == 1 and len(x.creator.outputs) == 1 and not x.grad_hooks
            and not function.device.is_cuda and not x.creator.device.is_cuda)


def _backward_chain(function, output_grads, retain_grad):
    """Run function's backward, then on up its chain; the gradients left for the caller, [(input, gradient)].

    The chain goes on, here, to the creator of the function's one input that
    has a creator (the others leaves, such as weights) when that input had no
    other use and is its creator's one output: its gradient is complete now.
    It stops where the graph forks or joins, at tensors with hooks and on
    GPUs: those gradients are left to the caller, which sums them in a fixed
    order and runs what they lead to in the next wave, side by side. So
    chains never write the same tensor.
    """
    left = []
    while True:
        _check_not_released(function)
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
        made = [x for x, _ in pairs if x.creator is not None]
        follow = made[0] if len(made) == 1 and _complete_after(made[0], function) else None
        if any(x.grad_hooks for x, _ in pairs):
            follow = None  # the caller runs the hooks as soon as the gradient is in (data parallelism's reduces)
        for x, gx in pairs:
            if x is follow:
                x._accumulate(gx)  # nothing else reaches x: no other chain writes it
            else:
                left.append((x, gx))
        if not retain_grad:
            for ref in function.outputs:
                y = ref()
                if y is not None:
                    y.grad = None
        function.release()
        if follow is None:
            return left
        function, output_grads = follow.creator, [follow.grad.data]


def as_tensor(value, like):
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

    `forward(*arrays) -> array or tuple` computes the outputs and
    `backward(*output_grads) -> grad or tuple of grads` the input gradients (None
    for an input that needs none; `self.needs_grad[i]` says which do). The
    CPU/GPU choice is made here, in one place: by default `forward` runs
    `forward_cpu` or `forward_gpu` by the device of the inputs, and `backward`
    likewise `backward_cpu` or `backward_gpu`. An operation whose one
    array-module path (`xp = self.device.xp`) serves both devices overrides
    `forward` and `backward` instead. Arrays needed by backward are kept with
    `self.save(...)` and read from `self.saved`, so they are freed as soon as
    the backward has run.
    """

    device = None  # set per call: the device whose arrays this function computes on
    saved = None
    released = False

    def __call__(self, *inputs):
        inputs = [as_tensor(x, like=_first_tensor(inputs)) for x in inputs]
        self.device = self._device_of(inputs)
        with self.device:
            outputs = self.forward(*[x.data for x in inputs])
        single = not isinstance(outputs, tuple)
        outputs = [Tensor(y, device=self.output_device()) for y in ((outputs,) if single else outputs)]
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

    def output_device(self):
        return self.device

    def save(self, *arrays):
        self.saved = arrays

    def release(self):
        """Drop what backward needed; called once backward has run."""
        self.saved = None
        self.inputs = ()
        self.outputs = ()
        self.released = True

    def forward(self, *xs):
        return self.forward_gpu(*xs) if self.device.is_cuda else self.forward_cpu(*xs)

    def backward(self, *gys):
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
