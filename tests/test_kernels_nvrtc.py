"""Every CUDA source compiles with NVRTC exactly as cupy.RawModule compiles it, and every
name expression minidl launches resolves to its kernel, on a machine with no GPU and no
CuPy (NVRTC from the nvidia-cuda-nvrtc-cu12 wheel of the `test` extra; skipped without it)."""
import importlib
import os
import pkgutil

import pytest

import minidl.functions
from minidl import kernels
from minidl_emulator import nvrtc_check
from minidl_emulator.nvrtc_check import NvrtcCompileError, NvrtcUnavailable, compile_like_cupy

try:
    LIBNVRTC = nvrtc_check.find_libnvrtc()
except NvrtcUnavailable as e:
    pytestmark = pytest.mark.skip(reason=str(e))

# -arch=sm_XX is CuPy's default (a cubin); -arch=compute_XX its CUPY_COMPILE_WITH_PTX=1 path
ARCHS = ("sm_80", "sm_90", "compute_80", "compute_90")
# the Itanium mangling of each type a KernelFile may declare (__half and __nv_bfloat16: class names)
MANGLED_TYPE = {"float": "f", "double": "d", "__half": "6__half", "__nv_bfloat16": "13__nv_bfloat16"}


def launched_kernels():
    """{.cu path: its KernelFile} from every module that launches kernels (its CU): functions, optim and
    loss_scale."""
    found = {}
    names = [f"minidl.functions.{info.name}"
             for info in pkgutil.iter_modules(minidl.functions.__path__)]
    for name in names + ["minidl.optim", "minidl.loss_scale"]:
        module = importlib.import_module(name)
        if isinstance(getattr(module, "CU", None), kernels.KernelFile):
            found[module.CU.path] = module.CU
    return found


def test_every_source_is_launched_and_every_launcher_has_a_source():
    launched = launched_kernels()
    assert {"conv.cu", "lrn.cu", "pooling.cu", "activation.cu", "dropout.cu", "loss.cu",
            "optim.cu", "loss_scale.cu"} <= {
        os.path.basename(p) for p in launched}
    assert set(launched) == {os.path.abspath(p) for p in kernels.kernel_sources()}
    # issue 28: minidl's own layer kernels (and Winograd's tile copies) also run on float16 and bfloat16; the
    # input's kernel writes float32, float16 or bfloat16; the rest stay float and double
    by_name = {os.path.basename(p): cu for p, cu in launched.items()}
    for name in ("conv.cu", "lrn.cu", "pooling.cu", "activation.cu", "dropout.cu", "loss.cu", "winograd.cu"):
        assert by_name[name].types == kernels.HALF_TYPES, name
    for name in ("optim.cu", "loss_scale.cu"):
        assert by_name[name].types == kernels.FLOAT_TYPES, name
    assert [str(t) for t in by_name["to_input.cu"].types] == ["float32", "float16", "bfloat16"]


def test_options_are_cupys():
    # cupy/_core/core.pyx assemble_cupy_compiler_options, cupy/cuda/compiler.py
    # _compile_with_cache_cuda and _compile_using_nvrtc_no_warning (without the -I paths)
    assert nvrtc_check.cupy_options("sm_90") == (
        "--std=c++14", "-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")
    # and minidl's own options are those plus the -I that compile_like_cupy's callers pass
    source = kernels.kernel_sources()[0]
    expected = nvrtc_check.CUPY_USER_OPTIONS + kernels.include_options(source)
    assert kernels.compile_options(source) == expected


def test_a_shared_header_is_not_found_without_its_include_folder():
    source = next(s for s in kernels.kernel_sources() if os.path.basename(s) == "conv.cu")
    with pytest.raises(NvrtcCompileError, match=r'cannot open source file "(half|window)\.cuh"'):
        compile_like_cupy(source, launched_kernels()[source].name_expressions())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", kernels.kernel_sources(), ids=os.path.basename)
def test_kernel_compiles_like_cupy(source, arch):
    cu = launched_kernels()[os.path.abspath(source)]
    expressions = cu.name_expressions()
    # the source's folder on the include path, as kernels._module gives it to RawModule (window.cuh)
    lowered = compile_like_cupy(source, expressions, arch=arch,
                                extra_options=kernels.include_options(source))
    assert set(lowered) == set(expressions)
    for n in cu.names:
        for t in (kernels.cuda_type(d) for d in cu.types):
            code = MANGLED_TYPE[t]
            # the Itanium mangling of a template instance n<T>: _Z <len(n)> n I <T> E ...
            mangled = f"_Z{len(n)}{n}I{code}E"
            assert lowered[f"{n}<{t}>"].startswith(mangled), (source, arch, lowered)


def test_a_broken_source_raises_with_the_nvrtc_log(tmp_path):
    source = tmp_path / "broken.cu"
    source.write_text("template <typename T>\n"
                      "__global__ void k(T* x) { x[0] = undefined_thing; }\n")
    with pytest.raises(NvrtcCompileError) as raised:
        compile_like_cupy(str(source), ("k<float>",), arch="sm_90")
    message = str(raised.value)
    assert "broken.cu" in message and "undefined_thing" in message and "error" in message


def test_a_name_expression_without_a_kernel_raises(tmp_path):
    source = tmp_path / "one.cu"
    source.write_text("template <typename T>\n__global__ void k(T* x) { x[0] = T(1); }\n")
    assert compile_like_cupy(str(source), ("k<double>",))["k<double>"].startswith("_Z1kIdE")
    with pytest.raises(NvrtcCompileError, match="no_such_kernel"):
        compile_like_cupy(str(source), ("no_such_kernel<float>",))
