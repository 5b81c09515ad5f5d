"""minidl as a user installs it: the wheel, not the checkout, trains on (emulated) GPUs.

`pip install -e .` reads the kernels beside the checkout's modules, so it cannot show a kernel
source missing from the wheel; only an installed wheel can (a .cu file left out fails at its
first launch, the optimizer's at the first step).
"""
import os
import pathlib
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_the_installed_wheel_trains_a_step_on_emulated_gpus(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)])
    wheel, = (tmp_path / "dist").glob("minidl-*.whl")
    # the dependencies (NumPy, h5py, click...) from this interpreter's site-packages; minidl from the wheel only
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    # nothing of the checkout is visible but the emulator (not part of the wheel), and the folder is elsewhere
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MINIDL_"))}
    env.update(PYTHONPATH=str(ROOT / "emulator"), MINIDL_EMULATE_GPUS="2", PYTHONNOUSERSITE="1",
               MINIDL_CACHE=os.environ.get("MINIDL_CACHE") or str(pathlib.Path.home() / ".cache" / "minidl"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import minidl, minidl_models; print(minidl.__file__); print(minidl_models.__file__)"],
                 cwd=work, env=env).split()
    venv_root = str(tmp_path / "venv")
    assert all(path.startswith(venv_root) for path in where), where  # the installed copy, not the checkout's
    model_file = os.path.join(os.path.dirname(where[1]), "alexnet.py")
    output = _run([str(tmp_path / "venv" / "bin" / "minidl"), "bench", model_file, "--devices", "cuda:0,cuda:1",
                   "--batch-size", "2", "--steps", "1"], cwd=work, env=env)
    assert "devices cuda:0,cuda:1  batch 2" in output, output
