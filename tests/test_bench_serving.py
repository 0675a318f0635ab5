"""Smoke test of benchmarks/bench_serving.py on a tiny model: every cell and system is in the report (not timed)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_serving  # noqa: E402
from serving_report import markdown  # noqa: E402


def test_minimal_grid_reports_every_cell_and_system(tiny_dir, tmp_path):
    args = bench_serving.build_parser().parse_args([
        "--model", str(tiny_dir("olmoe")), "--n", "2", "--k", "0", "1", "--k1-methods", "lora", "--out-len", "4",
        "--prompt-len", "8", "--reps", "1", "--server", "inprocess", "--work-dir", str(tmp_path / "work"),
        "--check-outputs",
    ])  # fmt: skip
    report = bench_serving.run_sweep(args)

    cells = {c["cell"]: c for c in report["cells"]}
    assert set(cells) == {"N=2 base", "N=2 K=1 lora"}
    all_systems = {"moeserve", "moeserve offline", "transformers+peft", "transformers generate_batch"}
    assert set(cells["N=2 base"]["systems"]) == all_systems
    assert set(cells["N=2 K=1 lora"]["systems"]) == all_systems - {"transformers generate_batch"}
    for cell in cells.values():
        for summary in cell["systems"].values():
            assert summary["tok_s"] > 0 and summary["ttft_p50"] > 0 and summary["reps"] == 1
    assert cells["N=2 K=1 lora"]["ratios"]["moeserve / transformers+peft"] > 0
    assert cells["N=2 K=1 lora"]["heterogeneity"]["moeserve"] > 0
    assert report["output_check"]["identical"] == 2
    assert len(report["runs"]) == 4 + 3 and not report["skipped"]
    assert all(r["output_tokens"] == 2 * 4 for r in report["runs"])

    text = markdown(report)
    assert "| 2 | K=1 lora |" in text and "Cost of heterogeneity" in text
