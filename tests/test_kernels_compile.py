"""Every CUDA source compiles with nvcc for sm_80 and sm_90, so a kernel that does not
compile fails CI even on a machine without a GPU (skipped where nvcc is missing)."""
import shutil
import subprocess

import pytest

from minidl.kernels import include_options, kernel_sources

NVCC = shutil.which("nvcc")


def test_there_are_kernels():
    names = {source.rsplit("/", 1)[-1] for source in kernel_sources()}
    assert {"conv.cu", "lrn.cu", "pooling.cu"} <= names


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("source", kernel_sources(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_kernel_compiles(source, tmp_path):
    for arch in ("sm_80", "sm_90"):
        result = subprocess.run([NVCC, "-c", "-std=c++14", *include_options(source), f"-arch={arch}",
                                 "-o", str(tmp_path / f"{arch}.o"), source], capture_output=True, text=True)
        assert result.returncode == 0, f"nvcc -arch={arch} {source}:\n{result.stderr}"
