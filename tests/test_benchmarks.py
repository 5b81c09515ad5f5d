"""benchmarks/vs_torch.py: its ABBA schedule, its worker processes and its report (minidl alone where PyTorch is absent)."""
import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "vs_torch.py")


def vs_torch(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env)


def load_script():
    spec = importlib.util.spec_from_file_location("vs_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schedule_alternates_abba_and_shares_the_steps():
    order = load_script().schedule(["PyTorch", "minidl"], steps=10, rounds=4)
    assert [f for f, _ in order] == ["PyTorch", "minidl", "minidl", "PyTorch"] * 2
    assert [n for _, n in order] == [3, 3, 3, 3, 2, 2, 2, 2]
    assert load_script().schedule(["minidl"], steps=3, rounds=2) == [("minidl", 2), ("minidl", 1)]


def test_vs_torch_pools_the_steps_of_its_rounds():
    result = vs_torch("--batch-size", "2", "--steps", "3", "--rounds", "2", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert "median of each one's steps over 2 rounds" in result.stdout
    assert any(line.startswith("minidl fp32") and line.split()[2] == "3" for line in result.stdout.splitlines())


def test_vs_torch_refuses_bad_counts_in_one_line():
    result = vs_torch("--steps", "2", "--rounds", "4")
    assert result.returncode == 2 and "--rounds must be even and at most --steps (2), got 4" in result.stderr
    result = vs_torch("--batch-size", "0")
    assert result.returncode == 2 and "argument --batch-size: must be at least 1, got 0" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="needs a machine where CuPy is absent")
def test_a_worker_that_fails_ends_the_run_with_its_status():
    env = {k: v for k, v in os.environ.items() if k != "MINIDL_EMULATE_GPUS"}  # no emulated GPUs: cuda fails
    result = vs_torch("--device", "cuda", "--steps", "2", "--rounds", "2", env=env)
    assert result.returncode == 1
    # the first worker to fail: minidl's (no CuPy) or, where PyTorch is installed without CUDA, PyTorch's
    assert "process exited with status 1 (its error is above)" in result.stderr.splitlines()[-1]
