"""benchmarks/vs_torch.py runs: its worker processes, rounds and report (minidl alone where PyTorch is absent)."""
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "vs_torch.py")


def vs_torch(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)


def test_vs_torch_reports_the_median_of_its_rounds():
    result = vs_torch("--batch-size", "2", "--steps", "3", "--rounds", "2", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert "median of 3 steps in 2 round(s)" in result.stdout
    assert "minidl fp32" in result.stdout and "GiB" in result.stdout


def test_vs_torch_refuses_bad_counts_in_one_line():
    result = vs_torch("--steps", "2", "--rounds", "3")
    assert result.returncode == 2 and "--rounds must be from 1 to --steps (2), got 3" in result.stderr
    result = vs_torch("--batch-size", "0")
    assert result.returncode == 2 and "--batch-size and --steps must be at least 1" in result.stderr
