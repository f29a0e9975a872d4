"""A non-editable install ships fastm2d/kernels/ as fastm2d.kernels and nothing as a bare top-level `kernels`; a checkout
imports the same package, and its top-level kernels/ (links, no __init__.py) never passes for another `kernels`."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_maps_kernels_under_the_package(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "wheel").glob("fastm2d-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastm2d/kernels/__init__.py" in names and "fastm2d/kernels/l2norm_mse.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = "import fastm2d, fastm2d.kernels as k; print(fastm2d.__file__); print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(target)) for line in out.stdout.split())


def test_a_checkout_that_pip_never_installed_imports_fastm2d_kernels(tmp_path):
    """The GPU machine runs the repository with PYTHONPATH=. : fastm2d.kernels is the checkout's, and the top-level
    kernels/ does not shadow the Hugging Face package `kernels` (transformers imports it; an __init__.py there once
    made transformers import our folder and fail)."""
    probe = ("import importlib.util, sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
             f"sys.path.insert(0, {str(ROOT)!r}); "
             "import fastm2d.kernels as k, fastm2d.model; print(k.__file__); print(k.REFERENCE.l2norm_mse.__module__); "
             "spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[:2] == [str(ROOT / "fastm2d" / "kernels" / "__init__.py"), "fastm2d.kernels.l2norm_mse"]
    assert not lines[2].startswith(str(ROOT / "kernels")), lines[2]  # HF's kernels, or nothing: never this folder
    shown = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert shown == {p.name for p in (ROOT / "fastm2d" / "kernels").glob("*.py")} - {"__init__.py"}
    assert all((ROOT / "kernels" / n).resolve() == (ROOT / "fastm2d" / "kernels" / n) for n in shown)


def _source_modules() -> set:
    """Every module of the source tree, named as installed."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastm2d").rglob("*.py")}


def _dependency_folders() -> list:
    """The folders this interpreter imports third-party packages (torch ...) from, wherever the README's commands
    were run: a virtual environment, conda, or the system interpreter. (`venv --system-site-packages` would give a
    new environment the BASE interpreter's packages, which has no torch when the tests themselves run in a venv.)"""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def _venv_seeing_these_dependencies(venv: Path):
    """A new, empty virtual environment that finds this interpreter's dependencies AFTER its own site-packages (a
    path file: their folders are appended to sys.path, their own .pth files, the editable finder of this
    checkout among them, are not run), so fastm2d can come only from what is installed into it."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "zz_dependencies_of_the_test_interpreter.pth").write_text("\n".join(_dependency_folders()) + "\n")
    return venv, str(py)


def test_the_wheel_venv_finds_torch_wherever_the_tests_run(tmp_path):
    """Run from inside a virtual environment (how most users run the README's commands), the fresh venv of the wheel
    test must still import the dependencies; fastm2d itself must not leak in from this checkout."""
    outer = tmp_path / "outer"  # the user's venv: the test interpreter's packages, reached as the user's would be
    _, outer_py = _venv_seeing_these_dependencies(outer)
    probe = ("import sys; sys.path.insert(0, {root!r}); sys.argv = ['t']; import tests.test_install as t, pathlib; "
             "venv, py = t._venv_seeing_these_dependencies(pathlib.Path({inner!r})); print(py)")
    made = subprocess.run([outer_py, "-c", probe.format(root=str(ROOT), inner=str(tmp_path / "inner"))],
                          capture_output=True, text=True, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    inner_py = made.stdout.split()[-1]
    out = subprocess.run([inner_py, "-c", "import torch, sys; import importlib.util as u; "
                          "print(u.find_spec('fastm2d') is None, sys.prefix)"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(tmp_path / "inner")]


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_holds_every_module_and_runs_every_command(tmp_path):
    """The wheel a user gets (not the editable install CI uses), installed into a new virtual environment:
    every module of the source tree is in it and imports from there, and `python -m fastm2d --help` and every
    subcommand's --help run (a hand-written package list once left fastm2d.eval out of every wheel)."""
    from fastm2d.cli import build_parser
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "wheel").glob("fastm2d-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    assert _source_modules() - shipped == set(), "modules missing from the wheel"
    assert "fastm2d/assets/audioset_class_labels_indices.csv" in zipfile.ZipFile(wheel).namelist()  # class names
    venv, py = _venv_seeing_these_dependencies(tmp_path / "venv")
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    modules = sorted(m[:-3].replace("/", ".").removesuffix(".__init__") for m in _source_modules()
                     if not m.endswith("__main__.py"))  # that one runs the command: the --help runs below cover it
    probe = ("import importlib, sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
             f"mods = [importlib.import_module(m) for m in {modules!r}]; "
             "print('\\n'.join(m.__file__ for m in mods)); import fastm2d; assert len(fastm2d.audioset_classes()) == 527")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(venv)) for line in out.stdout.split()), out.stdout
    commands = list(build_parser()._subparsers._group_actions[0].choices)
    assert {"pretrain", "linear-eval", "finetune", "report"} <= set(commands)
    for argv in [["--help"], *([c, "--help"] for c in commands)]:
        run = subprocess.run([py, "-m", "fastm2d", *argv], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0 and "usage: fastm2d" in run.stdout, (argv, run.stderr)
