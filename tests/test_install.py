"""A non-editable install ships kernels/ as fastm2d.kernels and nothing as a bare top-level `kernels`."""
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
    """The GPU machine runs the repository with PYTHONPATH=. : kernels/ must map to fastm2d.kernels there too."""
    probe = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
             f"sys.path.insert(0, {str(ROOT)!r}); "
             "import fastm2d.kernels as k, fastm2d.model; print(k.__file__); print(k.REFERENCE.l2norm_mse.__module__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), "fastm2d.kernels.l2norm_mse"]
