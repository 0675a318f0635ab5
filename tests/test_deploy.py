"""deploy/: every file parses, every flag it passes to `moeserve serve` exists, every metric it reads is served.

No container can be built here (no registry for base images), so the images and manifests are checked against the
things they depend on: the CLI's --help and a live server's /metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from adapter_factory import make_peft_lora
from prometheus_client.parser import text_string_to_metric_families

from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
METRIC = re.compile(r"\b((?:vllm|moeserve):[a-z0-9_:]*[a-z0-9_])")


def _documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _dockerfile_args(path: Path) -> list[str]:
    """The arguments of the Dockerfile's CMD (the entrypoint is `moeserve serve`)."""
    text = path.read_text().replace("\\\n", " ")
    assert re.search(r'^ENTRYPOINT \["moeserve", "serve"\]$', text, re.M), path
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    return json.loads(cmd)


def _compose_args() -> list[str]:
    (doc,) = _documents(DEPLOY / "docker" / "docker-compose.yaml")
    return [str(a) for a in doc["services"]["moeserve"]["command"]]


def _kubernetes_args() -> list[str]:
    (deployment,) = [d for d in _documents(DEPLOY / "kubernetes" / "deployment.yaml") if d["kind"] == "Deployment"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "moeserve"]
    return [str(a) for a in container["args"]]


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = _documents(path)
    assert docs, f"{path} is empty"
    if "kubernetes" in path.parts and not path.name.endswith("-values.yaml"):  # values: Helm chart input
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a Kubernetes object"


def test_dashboard_is_grafana_json_with_the_panels_the_issue_lists():
    dash = json.loads((DEPLOY / "docker" / "grafana" / "dashboards" / "moeserve.json").read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for words in ("running", "waiting", "kv-cache", "first token", "inter-token", "end-to-end", "tokens per second",
                  "by adapter", "adapter slots", "evictions", "preemptions"):  # fmt: skip
        assert words in titles, words
    assert all(t["expr"] for p in dash["panels"] for t in p["targets"])


def test_every_flag_passed_to_moeserve_serve_exists():
    help_text = subprocess.run(
        [sys.executable, "-m", "moeserve.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    sources = {
        "Dockerfile.cpu": _dockerfile_args(DEPLOY / "docker" / "Dockerfile.cpu"),
        "Dockerfile.cuda": _dockerfile_args(DEPLOY / "docker" / "Dockerfile.cuda"),
        "docker-compose.yaml": _compose_args(),
        "kubernetes/deployment.yaml": _kubernetes_args(),
    }
    for name, args in sources.items():
        assert "--model" in args, name
        unknown = _flags(args) - known
        assert not unknown, f"{name} passes flags `moeserve serve` does not have: {sorted(unknown)}"


def _referenced_metrics() -> dict[str, set[str]]:
    """Metric names (as they appear in /metrics samples) each file reads."""
    dashboard = (DEPLOY / "docker" / "grafana" / "dashboards" / "moeserve.json").read_text()
    values = _documents(DEPLOY / "kubernetes" / "inferencepool-values.yaml")[0]
    picker = {f["value"] for f in values["inferenceExtension"]["flags"] if f["name"].endswith("-metric")}
    return {
        "grafana dashboard": set(METRIC.findall(dashboard)),
        "endpoint picker": picker,
    }


@pytest.fixture(scope="module")
def live_metrics(tiny_dir, tmp_path_factory):
    """The sample names of a live server's /metrics after one base and one adapter request."""
    base = tiny_dir("olmoe")
    lora = make_peft_lora(base, tmp_path_factory.mktemp("deploy") / "lora", seed=2, targets=("q_proj",))[0]
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=64), scheduler=SchedulerConfig(max_model_len=64)
    )
    app = build_server(engine_config, ServerConfig(served_model_name="base", model_path=str(base)), {"lora": lora})
    with BackgroundServer(app) as server:
        for model in ("base", "lora"):
            r = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": model, "prompt": "The list type is", "max_tokens": 4, "temperature": 0},
                timeout=120,
            )
            assert r.status_code == 200, r.text
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_metric_the_dashboard_and_the_gateway_read_is_served(live_metrics):
    referenced = _referenced_metrics()
    assert len(referenced["grafana dashboard"]) >= 12 and len(referenced["endpoint picker"]) == 3
    for source, names in referenced.items():
        missing = names - live_metrics
        assert not missing, f"the {source} reads metrics a live server does not export: {sorted(missing)}"
