"""Every script under benchmarks/ answers --help (with its usage) without running anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted(p for p in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))
MODULES = {"serving_client", "serving_peers", "serving_timings", "serving_workload", "baselines", "moe_shapes",
           "model_params", "machine_peaks"}  # fmt: skip


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.stem not in MODULES], ids=lambda p: p.stem)
def test_script_answers_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout.lower()
