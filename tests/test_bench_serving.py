"""Smoke test of benchmarks/bench_serving.py on a tiny model: every cell and system is in the report (not timed)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_serving  # noqa: E402
import serving_peers  # noqa: E402
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


def test_peer_requests_pick_adapters_as_each_server_wants():
    ids = {"lora-0": 0, "lora-1": 1}
    prompt = [5, 6, 7]
    # llama-server: the adapter by an explicit "lora" list, and the base by a non-empty list with scale 0 (quirk c)
    base = serving_peers.llama_body(ids, None, prompt, 4)
    assert base["lora"] == [{"id": 0, "scale": 0.0}] and base["model"] == "base"
    assert serving_peers.llama_body(ids, "lora-1", prompt, 4)["lora"] == [{"id": 1, "scale": 1.0}]
    # vLLM: the adapter by "model"; both get the token ids, greedy, ignore_eos, streamed with usage
    assert serving_peers.vllm_body("lora-1", prompt, 4)["model"] == "lora-1"
    assert serving_peers.vllm_body(None, prompt, 4)["model"] == "base"
    for body in (base, serving_peers.vllm_body(None, prompt, 4)):
        assert body["prompt"] == prompt and body["max_tokens"] == 4 and body["temperature"] == 0.0
        assert body["ignore_eos"] and body["stream"] and body["stream_options"] == {"include_usage": True}


def test_vllm_gets_a_max_model_len(tmp_path, monkeypatch):
    started = {}

    @contextlib.contextmanager
    def server(cmd, env, name, ready, timeout):
        started.update(env)
        yield

    monkeypatch.setattr(serving_peers, "_server", server)
    paths = serving_peers.PeerPaths(tmp_path, tmp_path / "venv", tmp_path / "llama.cpp")
    with serving_peers.start_vllm(paths, tmp_path / "model", {}, "bfloat16", 1, max_model_len=2048):
        pass
    # unset, vLLM takes max_position_embeddings (163840 on DeepSeek-V2-Lite) and its warm-up runs for minutes
    assert started["MAX_MODEL_LEN"] == "2048"


def test_peer_cells_and_attention_only_adapters(tmp_path):
    cells = bench_serving.parse_peer_cells(["16x0", "32x8"])
    assert [c.key for c in cells] == ["N=16 base", "N=32 K=8 lora uniform"]
    assert bench_serving.adapter_names(cells[1]) == [f"lora-{j}" for j in range(8)]
    args = bench_serving.build_parser().parse_args(["--systems", "moeserve", "vllm"])
    peer_keys = {c.key for c in cells}
    assert bench_serving._systems_for(cells[1], ["moeserve", "vllm"], 0, peer_keys) == ["moeserve", "vllm"]
    assert bench_serving._systems_for(cells[1], ["moeserve", "vllm"], 1, peer_keys) == ["vllm", "moeserve"]
    assert bench_serving._systems_for(cells[1], ["moeserve", "vllm"], 0, set()) == ["moeserve"]
    assert args.systems == ["moeserve", "vllm"]

    def adapter(name: str, targets: list[str]) -> Path:
        (tmp_path / name).mkdir()
        config = {"peft_type": "LORA", "target_modules": targets}
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        return tmp_path / name

    serving_peers.check_attention_lora({"a": adapter("attn", ["q_proj", "k_proj", "v_proj", "o_proj"])})
    serving_peers.check_attention_lora({"s": adapter("suffixes", ["self_attn.q_proj", "self_attn.o_proj"])})
    with pytest.raises(ValueError, match="plain LoRA on q_proj"):
        serving_peers.check_attention_lora({"b": adapter("ffn", ["q_proj", "up_proj"])})


def test_peers_not_installed_are_skipped_with_the_reason(tiny_dir, tmp_path):
    """With nothing installed at the given paths the sweep still runs, and says why each peer did not."""
    args = bench_serving.build_parser().parse_args([
        "--model", str(tiny_dir("olmoe")), "--systems", "moeserve offline", "vllm", "llama-server",
        "--only-peer-cells", "--peer-cells", "2x0", "2x2", "--out-len", "3", "--prompt-len", "8", "--reps", "1",
        "--work-dir", str(tmp_path / "work"), "--peers-dir", str(tmp_path / "no-peers"),
        "--vllm-venv", str(tmp_path / "no-venv"), "--llama-cpp-dir", str(tmp_path / "no-llama"),
    ])  # fmt: skip
    report = bench_serving.run_sweep(args)

    skipped = report["peers_skipped"]
    assert set(skipped) == {"vllm", "llama-server"}
    assert "not installed" in skipped["vllm"] and "install_vllm_cpu.sh" in skipped["vllm"]
    assert "not installed" in skipped["llama-server"] and "install_llama_cpp.sh" in skipped["llama-server"]
    assert [c["cell"] for c in report["cells"]] == ["N=2 base", "N=2 K=2 lora uniform"]
    assert all(set(c["systems"]) == {"moeserve offline"} for c in report["cells"])
    assert report["adapters"].keys() == {"lora-0", "lora-1"}
    assert "NOT RUN: vllm: vllm skipped: not installed" in markdown(report)
