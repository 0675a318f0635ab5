"""Where the built-in base models live: shipped in the package, or pretrained once into the cache.

The package ships both presets under moeserve/builtin/data/ (bf16, a few MB), so the demo starts at once and every
machine uses the same weights. An install without those files (a trimmed wheel, a sparse checkout) finds them in
$MOESERVE_CACHE (default ~/.cache/moeserve) once they are pretrained there: the command line does that on first use
(moeserve.demo.pretraining.ensure); serving code only looks.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
# preset -> directory name (under DATA_DIR and the cache); the pretraining presets are named after these.
BUILTIN_MODELS: dict[str, str] = {"base": "moeserve-base", "small-test": "moeserve-small-test"}


def cache_root() -> Path:
    return Path(os.environ.get("MOESERVE_CACHE", Path.home() / ".cache" / "moeserve"))


def is_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def find_model(name: str) -> Path | None:
    """The directory holding built-in model `name`: the shipped copy, else the cached one, else None."""
    for path in (DATA_DIR / name, cache_root() / name):
        if is_model_dir(path):
            return path
    return None


def builtin_model_dir(preset: str = "base") -> Path:
    """The directory of a built-in base model ("base" or "small-test"); FileNotFoundError if this install lacks it."""
    if preset not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {preset!r}; known: {', '.join(BUILTIN_MODELS)}")
    name = BUILTIN_MODELS[preset]
    found = find_model(name)
    if found is None:
        raise FileNotFoundError(
            f"the built-in model {name} is neither shipped in this install ({DATA_DIR / name}) nor in the cache "
            f"({cache_root() / name}); `moeserve serve` or `moeserve demo` without --model pretrains it there once"
        )
    return found


def small_test_base() -> Path:
    """The small built-in base for CI and fast tests: same architecture family, tokenizer scheme and data."""
    return builtin_model_dir("small-test")
