"""Shared fixtures: tiny checkpoints of every architecture, made once per test session."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch

from moeserve.tiny import TINY_ARCHS, make_tiny

# The test models are tiny: a second intra-op thread only adds synchronisation (and, on a busy machine, OpenMP
# spin-waits that made single files take minutes instead of seconds).
torch.set_num_threads(1)


# The dependencies whose releases have changed what moeserve must do (docs/dependencies.md): their versions head every
# run's output, so a CI log says what it resolved.
WATCHED = ("torch", "transformers", "peft", "kernels", "tokenizers", "xgrammar", "fastapi", "pydantic", "ray", "triton")


def pytest_terminal_summary(terminalreporter) -> None:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    terminalreporter.write_line("dependencies: " + ", ".join(f"{name} {version(name)}" for name in WATCHED))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A function arch -> directory of that tiny checkpoint (built on first request, then reused)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0)
        return made[arch]

    return get


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param
