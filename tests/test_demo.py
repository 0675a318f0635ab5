"""`moeserve demo` end to end on the built-in base: train, serve all adapters, score over HTTP.

The demo's own training budget (150 steps per adapter; shorter runs were tried and left the LoRA and MoLA adapters
at or below the base on their task), scored on fewer test examples: about 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import pytest

from moeserve.builtin import builtin_model_dir
from moeserve.demo.run import BASE_NAME, DEMO_LEARNING_RATES, GENERAL_TASK, DemoConfig, DemoPlan, parse_plan, run_demo


def test_short_demo_adapters_beat_the_base_on_their_own_task(tmp_path):
    config = DemoConfig(base=builtin_model_dir(), work_dir=tmp_path, eval_examples=32, concurrency=16)
    report = run_demo(config)
    assert len(report.adapters) == len(config.plan)
    for adapter in report.adapters:
        own = adapter.plan.task
        assert report.score(adapter.name, own) > report.score(BASE_NAME, own), (adapter.name, report.table())
        assert adapter.trainable_params > 0 and adapter.adapter_bytes > 0
    assert all(f"--adapter {a.name}={a.path.resolve()}" in report.serve_command() for a in report.adapters)
    table = report.table()
    assert table.count("\n") == 2 + len(report.adapters)  # header, rule, base, adapters
    for task in [*report.tasks, GENERAL_TASK]:
        assert all(r.metrics["n"] == config.eval_examples for r in report.results if r.label == task)


def test_plan_flags_replace_or_add_tasks_and_bad_plans_fail_before_training(tmp_path):
    plan = parse_plan(["math=molora", "intent=lora@1e-3"])
    by_task = {p.task: p for p in plan}
    assert [p.task for p in plan] == ["translate", "math", "intent"]
    assert by_task["math"].method == "molora" and by_task["math"].lr == DEMO_LEARNING_RATES["molora"]
    assert by_task["intent"].lr == 1e-3
    for bad in ["math", "math=", "=lora", "math=lora@fast"]:
        with pytest.raises(ValueError, match="--plan"):
            parse_plan([bad])
    with pytest.raises(ValueError, match="unknown method 'sft'"):
        DemoConfig(base=tmp_path, work_dir=tmp_path, plan=parse_plan(["math=sft"]))
    with pytest.raises(ValueError, match="unknown demo task 'poetry'"):
        DemoConfig(base=tmp_path, work_dir=tmp_path, plan=parse_plan(["poetry=lora"]))
    with pytest.raises(ValueError, match="names a task twice"):
        DemoConfig(base=tmp_path, work_dir=tmp_path, plan=[DemoPlan("math", "lora"), DemoPlan("math", "mola")])
