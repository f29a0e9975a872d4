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


def test_the_import_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_them(tmp_path):
    shutil.copytree(ROOT / "fastm2d", tmp_path / "fastm2d", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "fastm2d" / "transfer" / "runtime.py", "a") as f:  # using a model must not reach the trainer
        f.write("\nfrom ..train import trainer  # noqa\n")
    r = _lint(tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout[-3000:]
    assert "fastm2d.transfer.runtime -> fastm2d.train" in r.stdout


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
