"""Ending a command early: Ctrl-C or an error, at any moment, ends it at once, in one line.

The loader reads the dataset in a background thread. Left running when the
interpreter shuts down, it is ended wherever it stands, perhaps inside h5py
holding h5py's lock, and the shutdown then waits for that lock forever: the
command printed its error line and hung. These tests end commands at random
moments, many times over, in subprocesses (the hang is in the interpreter's
shutdown, which only a real process has); the others check what Ctrl-C says
and exits with in train, prepare-data and a data-parallel job.
"""
import glob
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from minidl.training.train import train
from minidl_cli.main import friendly_errors
from test_cli import TINY_MODEL, dataset, image_dir, tiny_model  # noqa: F401 -- fixtures

RUNS = int(os.environ.get("MINIDL_INTERRUPT_RUNS", "100"))  # a hang was seen in 1 of 22 Ctrl-Cs
AT_ONCE = 6  # subprocesses running together: most of each is Python's start-up, which waits on the cores
EXIT_SECONDS = 5

# `minidl COMMAND ...`, writing "started" to stderr once the command runs (inside friendly_errors): the
# random moments fall in the command, not in Python's start-up and imports, where no handler is in place yet
LAUNCHER = '''
import sys
from minidl_cli.main import friendly_errors, main, program
command = main.commands[sys.argv[1]]
original = command.callback.__wrapped__
def started(*args, **kwargs):
    sys.stderr.write("started\\n")
    sys.stderr.flush()
    return original(*args, **kwargs)
command.callback = friendly_errors(started)
sys.argv[0] = "minidl"
program()  # as the `minidl` program runs main, its exit bounded
'''


def wait_for(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Command:
    """One `minidl` subprocess, its output in files (a pipe left unread could block it)."""

    def __init__(self, folder, args, env=None):
        folder.mkdir()
        self.out, self.err = folder / "stdout", folder / "stderr"
        launcher = folder.parent / "launcher.py"
        if not launcher.exists():
            launcher.write_text(LAUNCHER)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen([sys.executable, str(launcher)] + [str(a) for a in args], stdout=out,
                                            stderr=err, env={**os.environ, **(env or {})})

    def stderr(self):
        return self.err.read_text()

    def ended(self):
        return self.process.poll() is not None

    def wait_to_end(self, seconds):
        """True if it ended within `seconds`; otherwise it is killed, and False."""
        if wait_for(self.ended, seconds):
            return True
        self.process.kill()
        self.process.wait()
        return False


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("trained")
    model = folder / "tiny.py"
    model.write_text(TINY_MODEL)
    train(str(model), data=str(dataset), devices="cpu", out_dir=str(folder), max_steps=1)
    return folder / "last.h5", model


def interrupt_once(tmp_path, i, kind, command, delay, dataset, checkpoint):  # noqa: F811
    """Run one command, end it (SIGINT after `delay` s, or an error injected at its first convolution);
    returns a list of what went wrong, empty if nothing."""
    ckpt, model = checkpoint
    out = tmp_path / f"out{i}"
    args = {"evaluate": ["evaluate", ckpt, "--data", dataset, "--model", model, "--split", "all", "--batch-size", 1],
            "train": ["train", model, "--data", dataset, "--devices", "cpu", "--epochs", 1, "--batch-size", 2,
                      "--log-every", 1, "--checkpoint-seconds", 0, "--out", out]}[command]
    run = Command(tmp_path / f"run{i}", args, env={"MINIDL_CONV_ALGORITHM": "bogus"} if kind == "error" else None)
    what = f"{command} {kind}" + (f" after {delay:.2f} s" if kind == "sigint" else "")
    if not wait_for(lambda: "started" in run.stderr() or run.ended(), 120):
        run.wait_to_end(0)
        return [f"{what}: never started"]
    if kind == "sigint" and not wait_for(run.ended, delay):
        run.process.send_signal(signal.SIGINT)
    else:
        wait_for(lambda: "error:" in run.stderr() or run.ended(), 120)
    if not run.wait_to_end(EXIT_SECONDS):
        return [f"{what}: still running {EXIT_SECONDS} s after the {kind} (killed); stderr: {run.stderr()!r}"]
    code, stderr = run.process.returncode, run.stderr()
    problems = []
    if "Traceback" in stderr:
        problems.append(f"{what}: a traceback: {stderr!r}")
    # 0: it finished before the signal; -SIGINT: the signal came as Python was exiting, which then ends
    # itself with it (a shell shows 130)
    expected = {"sigint": (130, 0, -signal.SIGINT), "error": (1,)}[kind]
    if code not in expected:
        problems.append(f"{what}: exit status {code}, not {expected}: {stderr!r}")
    if code == 130 and command == "train" and (out / "last.h5").exists() and "--resume" not in stderr:
        problems.append(f"{what}: a checkpoint was written, but no --resume line: {stderr!r}")
    return problems


@pytest.mark.slow  # about a minute on two cores (MINIDL_INTERRUPT_RUNS=100 runs)
def test_commands_ended_at_random_moments_exit_at_once_in_one_line(tmp_path, dataset, checkpoint):  # noqa: F811
    """Half evaluate, half train; of each, 4 in 5 get a SIGINT at a random moment of the command, and 1 in 5
    an error (an unknown MINIDL_CONV_ALGORITHM) at its first step, with the loader's thread reading ahead.
    Each must end within 5 s: exit 130 (0 if it finished first), or 1 with its error line; no traceback."""
    # how long each command runs uninterrupted: the SIGINTs fall anywhere in that
    durations = {}
    for command in ("evaluate", "train"):
        start = time.monotonic()
        assert interrupt_once(tmp_path, f"-{command}", "sigint", command, 600, dataset, checkpoint) == []
        durations[command] = time.monotonic() - start
    rng = random.Random(24)
    plan = [(i, "error" if i % 5 == 4 else "sigint", command, rng.uniform(0, durations[command]))
            for i, command in zip(range(RUNS), itertools.cycle(("evaluate", "train")))]
    with ThreadPoolExecutor(AT_ONCE) as pool:
        found = pool.map(lambda p: interrupt_once(tmp_path, *p, dataset, checkpoint), plan)
        problems = [problem for run_problems in found for problem in run_problems]
    assert not problems, f"{len(problems)} of {RUNS} runs:\n" + "\n".join(problems)


def test_ctrl_c_in_train_after_a_checkpoint_exits_130_with_the_resume_line(tmp_path, dataset, tiny_model):  # noqa: F811
    out = tmp_path / "run"
    run = Command(tmp_path / "train", ["train", tiny_model, "--data", dataset, "--devices", "cpu", "--epochs", 1000,
                                       "--log-every", 1, "--checkpoint-seconds", 0, "--out", out])
    assert wait_for(lambda: (out / "last.h5").exists() or run.ended(), 120), run.stderr()
    run.process.send_signal(signal.SIGINT)
    assert run.wait_to_end(EXIT_SECONDS)
    assert run.process.returncode == 130
    assert run.stderr().endswith(f"\ninterrupted; continue with: minidl train {tiny_model} --resume {out / 'last.h5'} "
                                 f"--out {out}\n"), run.stderr()


def test_ctrl_c_in_prepare_data_ends_every_worker_in_one_line(tmp_path):
    """Ctrl-C reaches every process of the terminal's group, the workers as well as the parent. Whether a
    worker's traceback gets out before the parent ends the pool is a race: so the workers get the signal
    first, alone, and must ignore it; then the whole group gets it, as from a terminal."""
    picture = tmp_path / "picture.jpg"
    Image.effect_noise((300, 300), 60).convert("RGB").save(picture)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(1000):  # enough decoding to be interrupted in the middle of it
            os.link(picture, tmp_path / "images" / name / f"{i}.jpg")
    out = tmp_path / "data" / "d.h5"
    out.parent.mkdir()
    with open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "minidl_cli.main", "prepare-data", tmp_path / "images", out,
                                    "--workers", "2"], stdout=subprocess.DEVNULL, stderr=err,
                                   start_new_session=True)  # its own group, to signal as a terminal does
    stderr = (tmp_path / "stderr").read_text
    assert wait_for(lambda: "decoding images: " in stderr() or process.poll() is not None, 120), stderr()
    workers = children(process.pid)
    assert len(workers) >= 2  # the two workers (and Python's resource tracker)
    for worker in workers:
        os.kill(worker, signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None and all(alive(worker) for worker in workers), stderr()
    os.killpg(process.pid, signal.SIGINT)
    assert wait_for(lambda: process.poll() is not None, EXIT_SECONDS), stderr()
    assert wait_for(lambda: not alive(-process.pid), EXIT_SECONDS), "a worker outlived the command"
    assert process.returncode == 130
    lines = stderr().splitlines()
    assert all(line.startswith("decoding images: ") for line in lines[:-2]) and lines[-2:] == [
        "", "interrupted; what was written is kept: the same command continues from it"], stderr()
    assert [p.name for p in out.parent.iterdir()] == [".d.h5.partial"]  # no dataset: what it wrote, to resume


def children(pid):
    """The processes whose parent is `pid` (from /proc: Linux)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # after the name: state, then parent
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if parent == pid:
            found.append(int(stat.split("/")[2]))
    return found


def alive(pid):
    """Whether process `pid` (or, negative, any process of group -pid) exists, if only as a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_ctrl_c_that_lands_in_a_destructor_still_ends_the_command():
    """Python only prints an exception raised in a __del__ or a weakref callback (freeing a graph or a
    matplotlib figure runs many): a Ctrl-C landing there must still stop the command."""
    class Freed:
        def __del__(self):
            raise KeyboardInterrupt  # as the SIGINT handler does when the signal comes during a __del__

    @friendly_errors
    def command():
        Freed()
        time.sleep(10)  # the interrupt, delivered again, ends this
        return "went on"

    start = time.monotonic()
    with pytest.raises(SystemExit) as ended:
        command()
    assert ended.value.code == 130 and time.monotonic() - start < 5


def test_an_error_in_a_data_parallel_run_is_said_once(tmp_path, tiny_model):  # noqa: F811
    """Every rank fails alike: rank 0 says it and ends the job; the other rank, waiting before it speaks, is
    ended first. (Each rank used to print the line, then wait for the others in MPI's finalisation.)"""
    from test_parallel import MPIRUN
    done = subprocess.run(MPIRUN + [sys.executable, "-m", "minidl_cli.main", "train", tiny_model, "--data-parallel",
                                    "--data", tmp_path / "missing.h5", "--devices", "cpu", "--out", tmp_path / "run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert said == [f"error: no such dataset file: {tmp_path / 'missing.h5'}"], done.stdout + done.stderr


def test_a_ctrl_c_wrapped_by_python_in_a_runtime_error_is_still_an_interrupt():
    """A Ctrl-C while a class is created (importing matplotlib, say) reaches the command as a RuntimeError
    from its __set_name__, caused by the KeyboardInterrupt."""
    class Named:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    @friendly_errors
    def command():
        type("Owner", (), {"attribute": Named()})

    with pytest.raises(SystemExit) as ended:
        command()
    assert ended.value.code == 130


@pytest.mark.parametrize("ending, status", [("raise KeyboardInterrupt", 130),
                                            ("raise MinidlError('bad input')", 1)])
def test_an_exit_that_hangs_after_ctrl_c_or_an_error_still_ends_with_its_status(ending, status):
    """A cleanup that never returns (here an atexit handler) cannot keep a stopped command alive: it
    ends within EXIT_GRACE_SECONDS with the status it was exiting with, its line said."""
    script = ("import atexit, time\n"
              "from minidl.errors import MinidlError\n"
              "from minidl_cli.main import friendly_errors, main, program\n"
              "atexit.register(time.sleep, 600)\n"
              f"@main.command()\n@friendly_errors\ndef hang():\n    {ending}\n"
              "import sys; sys.argv = ['minidl', 'hang']\n"
              "program()\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert time.monotonic() - start < 20  # the grace and Python's start-up; the hang itself is 600 s
    assert "Traceback" not in done.stderr and done.stderr.strip(), done.stderr
