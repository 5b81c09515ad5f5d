"""`cupy.RawModule` and `cupy.RawKernel` on emulated GPUs: the real .cu source, compiled by g++.

A launch checks each argument against the kernel's C parameter type (kernel_runner.marshal),
enqueues the kernel on the current stream (`const T*` a read, `T*` a read and write) and runs
every block and thread on the host. A table of pointers (`T* const*`) is a read of the table
and of every array it names, each of which must lie in live memory of the current device
(emulator/README.md, "Raw kernels").
"""
from minidl_emulator import cuda, kernel_runner
from minidl_emulator.cuda import operation
from minidl_emulator.xp import ndarray


class RawKernel:
    def __init__(self, code=None, name=None, options=(), *, _kernel=None):
        if _kernel is None:  # cupy.RawKernel(code, name): a module of one kernel
            _kernel = kernel_runner.compile_module(code, (name,), options).kernel(name)
        self._kernel = _kernel
        self.name = _kernel.name

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if shared_mem:
            raise NotImplementedError("the emulator runs threads one after another: no shared memory")
        values = kernel_runner.marshal(self._kernel, tuple(args), is_array=lambda a: isinstance(a, ndarray),
                                       array_dtype=lambda a: a.dtype, array_address=lambda a: a.data.ptr)
        reads, writes = [], []
        for i, (param, arg) in enumerate(zip(self._kernel.params, args)):
            if param.table:
                reads.append(arg)
                (reads if param.const else writes).extend(_arrays_named_by(arg, f"kernel {self.name} argument {i}"))
            elif param.pointer:
                (reads if param.const else writes).append(arg)
        operation("kernel", reads=reads, writes=writes, stream=stream, what=f"kernel {self.name}")
        self._kernel.run(_dims(grid), _dims(block), values)


def _arrays_named_by(table, what):
    """Emulated arrays standing for the whole allocations the addresses in `table` point into."""
    found = []
    for address in table._host.reshape(-1).tolist():
        allocation, _ = cuda.memory_at(address, 1, f"{what}: the table holds address")
        found.append(ndarray._view(allocation.host, allocation))
    return found


class RawModule:
    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            with open(path) as f:
                code = f.read()
        self._module = kernel_runner.compile_module(code, tuple(name_expressions or ()), options)

    def get_function(self, name):
        return RawKernel(_kernel=self._module.kernel(name))


def _dims(value):
    value = (value,) if isinstance(value, int) else tuple(value)
    return value + (1,) * (3 - len(value))
