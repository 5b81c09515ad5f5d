"""The tree's structure, checked from its source: three wings, layered, no import circles.

The framework (minidl/, but minidl/training/) never imports the application
(minidl.training, the CLI, the model files) or the emulator; nothing imports in a
circle, imports inside functions included; no function outside the tests runs
over 50 lines; and minidl's wheel holds the framework and the application, not
the emulator.
"""
import ast
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# top-level folder -> the package it installs as
PACKAGES = {"minidl": "minidl", "cli": "minidl_cli", "models": "minidl_models",
            "emulator/minidl_emulator": "minidl_emulator"}
APPLICATION = ("minidl.training", "minidl_cli", "minidl_models")
MAX_FUNCTION_LINES = 50


def modules():
    """{module name: source path} for every module of the project's packages."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package] + parts)] = path
    return found


def imports_of(name, path, known):
    """The project's modules that `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from minidl.core import Tensor` imports minidl.core
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def _parents(name):
    """A module's packages, whose __init__ runs when it is imported: an import of them is no cycle of ours."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def cycles(graph):
    """Strongly connected groups of two or more modules (Tarjan), ignoring imports of one's own packages."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node] - _parents(node):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_framework(name):
    return name.split(".")[0] == "minidl" and not name.startswith("minidl.training")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_framework_imports_neither_the_application_nor_the_emulator():
    wrong = {name: sorted(t for t in targets if t.startswith(APPLICATION + ("minidl_emulator",)))
             for name, targets in import_graph().items() if is_framework(name)}
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_the_application_does_not_import_the_emulator():
    wrong = {name: sorted(t for t in targets if t.startswith("minidl_emulator"))
             for name, targets in import_graph().items() if name.startswith(APPLICATION)}
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_the_checker_sees_cycles_and_late_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    known = {"minidl.core": None, "minidl.training.train": None}
    source = ROOT / "tests" / "_late_import_probe.py"
    try:
        source.write_text("def f():\n    from minidl.training.train import train\n")
        assert imports_of("minidl.core", source, known) == {"minidl.training.train"}
    finally:
        source.unlink()


def long_functions(paths):
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_50_lines_outside_the_tests():
    sources = list(modules().values()) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert long_functions(sources) == []


@pytest.mark.slow
def test_the_wheel_holds_the_framework_and_the_application_not_the_emulator(tmp_path):
    # pip's isolated build, as `pip install .` builds it (it fetches setuptools and wheel, as the install does)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel, = tmp_path.glob("minidl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("minidl-")}
    assert tops == {"minidl", "minidl_cli", "minidl_models"}
    for part in ("minidl/core.py", "minidl/training/train.py", "minidl/cpu/threads.py", "minidl_models/alexnet.py",
                 "minidl/optim.cu", "minidl/functions/conv.cu", "minidl/functions/window.cuh"):
        assert part in names
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "minidl").rglob("*")
               if path.suffix in (".py", ".cu", ".cuh")}
    assert sources <= set(names), sorted(sources - set(names))  # every module and kernel source ships
