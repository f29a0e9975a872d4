"""The device suite runs end to end on CPU with tiny sizes, so a typo never wastes GPU minutes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_suite_dry_run(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "device_suite.json").read_text())
    assert {row["kernel"] for row in result["kernels"]} == {"l2norm_mse", "noise_mix", "gather_visible", "ema"}
    assert not [row for row in result["kernels"] if "error" in row]
    assert result["train"][0]["samples_s"] > 0 and result["train"][0]["rung"] == "eager fp32"
    assert r.stdout.rstrip().splitlines()[-1].startswith("| fp32 +fused attention")  # the ladder is printed last
    assert (tmp_path / "device_suite.md").read_text().startswith("# fastm2d device suite")
