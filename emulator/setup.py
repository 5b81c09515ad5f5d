from setuptools import setup

# The GPU emulator: CuPy's API on the CPU, for minidl's tests and CI. Installed by
# minidl's [test] extra; never part of minidl's own wheel.
setup(
    name="minidl-emulator",
    version="0.1.0",
    description="Emulated CUDA GPUs for minidl's tests: CuPy's API on the CPU, kernels through g++",
    python_requires=">=3.9",
    packages=["minidl_emulator", "minidl_emulator.cuda"],
    # include/: the emulator's cuda_fp16.h and cuda_bf16.h for g++
    package_data={"minidl_emulator": ["*.h", "include/*.h"]},
    install_requires=["numpy", "ml_dtypes"],
)
