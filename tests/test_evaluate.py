"""`moeserve eval`'s core: scoring a served model over HTTP on a task suite or a JSONL file."""

from __future__ import annotations

import asyncio
import json

import pytest

from moeserve import LLM, SamplingParams
from moeserve.cli import main
from moeserve.demo.http_eval import EvalJob, metric_scorer, read_reference_jsonl, run_jobs
from moeserve.demo.tasks import get_task
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server


def base_app(base):
    """The server for a tiny base model, served as "base"."""
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_model_len=256)
    )
    return build_server(engine_config, ServerConfig(served_model_name="base", model_path=str(base)))


def test_http_scores_equal_offline_greedy_scores(tiny_dir, tmp_path):
    base = tiny_dir("olmoe")
    task = get_task("math")
    records = task.generate("test", 6, seed=0)
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "reference": r["completion"]}) + "\n" for r in records))
    app = base_app(base)
    jobs = [
        EvalJob("base", records, task.evaluate, 8, "math"),
        EvalJob("base", read_reference_jsonl(data), metric_scorer("chrf"), 8, "mine"),
    ]
    with BackgroundServer(app) as server:
        by_task, by_file = asyncio.run(run_jobs(server.url, jobs, concurrency=4))
    offline = LLM(base, num_kv_blocks=64, max_model_len=256)
    outs = offline.generate([r["prompt"] for r in records], SamplingParams(temperature=0, max_tokens=8))
    preds = [o.outputs[0].text for o in outs]
    assert by_task.predictions == preds
    assert by_task.metrics == task.evaluate(preds, [r["completion"] for r in records])
    assert by_file.predictions == preds and by_file.metrics["n"] == 6
    assert 0.0 <= by_file.metrics["score"] <= 1.0


def test_reference_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_reference_jsonl(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_reference_jsonl(bad)


def test_eval_command_prints_the_score_and_refuses_bad_input(tiny_dir, tmp_path, capsys):
    base = tiny_dir("olmoe")
    app = base_app(base)
    with BackgroundServer(app) as server:
        assert main(["eval", "--server", server.url, "--model", "base", "--task", "intent", "--n", "5"]) == 0
        line = json.loads(capsys.readouterr().out)
        assert line["model"] == "base" and line["data"] == "intent" and line["n"] == 5
        assert 0.0 <= line["score"] <= 1.0
        assert main(["eval", "--server", server.url, "--model", "nope", "--task", "math", "--n", "2"]) == 1
        assert "404" in capsys.readouterr().err
        assert main(["eval", "--server", server.url, "--model", "base"]) == 2
        assert "exactly one of --task" in capsys.readouterr().err
        url = server.url
    assert main(["eval", "--server", url, "--model", "base", "--task", "math", "--n", "1"]) == 1
    assert "cannot reach" in capsys.readouterr().err
