"""docs/architecture.md's layers, enforced: pyproject.toml's import-linter contracts pass on the package, fail on a
copy with one upward import planted, and the commands that use a model never load the training stack."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter", reason="the layer contracts need import-linter (the test extra)")
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml")], capture_output=True,
                          text=True, cwd=package_parent, env={"PYTHONPATH": str(package_parent), "PATH": ""})


def _contracts() -> list:
    import tomllib
    return [c["name"] for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]]


def _says(stdout: str, name: str, verdict: str) -> bool:
    """lint-imports wraps long contract names at its width (sometimes with no space before the verdict)."""
    return "".join((name + verdict).split()) in "".join(stdout.split())


def test_the_import_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"{len(_contracts())} kept, 0 broken" in r.stdout and len(_contracts()) == 4


# One planted import per contract (file, line): each breaks the contract it is planted against.
PLANTED = {
    "Layers: nothing imports upward": ("model/vit.py", "from ..eval import probe"),
    "Using a model: the interfaces and exports on the runtime, one way to batch files":
        ("transfer/batching.py", "from . import runtime"),
    "Using a model (features, tags, zero-shot, exports, corpus embedding) never loads the training stack":
        ("transfer/runtime.py", "from ..train import trainer"),
    "No import cycle anywhere: the modules of each package build on one another in one direction":
        ("data/store.py", "from . import stats"),  # stats reads stores: a circle, as data/ had one of five
}


@pytest.mark.parametrize("contract", sorted(PLANTED))
def test_a_planted_import_breaks_each_contract(tmp_path, contract):
    assert set(PLANTED) == set(_contracts())  # a new contract gets its planted violation here
    shutil.copytree(ROOT / "fastm2d", tmp_path / "fastm2d", ignore=shutil.ignore_patterns("__pycache__"))
    file, line = PLANTED[contract]
    with open(tmp_path / "fastm2d" / file, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    r = _lint(tmp_path)
    assert r.returncode != 0 and _says(r.stdout, contract, "BROKEN"), r.stdout[-3000:]


@pytest.mark.parametrize("command", ["embed", "tag"])
def test_embed_and_tag_import_nothing_from_training(tmp_path, command, tiny_run):
    from .conftest import write_tone
    clip = write_tone(tmp_path / "a.wav", seconds=1.0)
    args = ["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "f"), str(clip)] if command == "embed" \
        else ["tag", str(clip), "--weights", str(tiny_run)]
    code = ("import sys; from fastm2d.cli import main; rc = main(sys.argv[1:]); "
            "loaded = sorted(m for m in sys.modules if m.startswith('fastm2d.train')); print('LOADED', loaded); "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
    assert "LOADED []" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_function_local_imports_of_the_package_say_why():
    """An import of fastm2d's own modules inside a function hides a dependency from the contracts' reader and
    from the module's top; it stays only where loading on first use is the point (the CLI, which answers --help
    without torch; optional libraries such as transformers), and then says why on its line."""
    import ast
    package = ROOT / "fastm2d"
    unexplained = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "cli.py":  # module docstring: nothing heavy at import time, each command imports its own
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("fastm2d")):
                        if "#" not in lines[inner.lineno - 1]:
                            unexplained.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not unexplained, "\n".join(unexplained)
