"""Where the built-in base models live: shipped in the package, or pretrained once into the cache.

The package ships both presets under moeserve/builtin/data/ (bf16, a few MB), so the demo starts at once and every
machine uses the same weights. An install without those files (a trimmed wheel, a sparse checkout) pretrains the
preset on first use into $MOESERVE_CACHE (default ~/.cache/moeserve), showing the Trainer's progress bar.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from moeserve.demo.pretraining.config import PRESETS

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def cache_root() -> Path:
    return Path(os.environ.get("MOESERVE_CACHE", Path.home() / ".cache" / "moeserve"))


def is_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def builtin_model_dir(preset: str = "base") -> Path:
    """The directory of a built-in base model ("base" or "small-test"), pretraining it first if it is missing."""
    if preset not in PRESETS:
        raise ValueError(f"unknown built-in model {preset!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[preset]
    shipped = DATA_DIR / config.name
    if is_model_dir(shipped):
        return shipped
    cached = cache_root() / config.name
    if is_model_dir(cached):
        return cached
    logger.warning(
        "the built-in model %s is not shipped in this install (%s); pretraining it into %s once (%d steps)",
        config.name, shipped, cached, config.schedule.steps,
    )  # fmt: skip
    from moeserve.demo.pretraining.pretrain import pretrain  # imports Trainer; only needed here

    cached.parent.mkdir(parents=True, exist_ok=True)
    # Train into a temporary sibling and rename: an interrupted run leaves no half-written model behind.
    work = Path(tempfile.mkdtemp(prefix=f".{config.name}-", dir=cached.parent))
    try:
        pretrain(config, work)
        if is_model_dir(cached):  # another process finished first; keep its copy
            shutil.rmtree(work)
        else:
            os.replace(work, cached)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return cached


def small_test_base() -> Path:
    """The small built-in base for CI and fast tests: same architecture family, tokenizer scheme and data."""
    return builtin_model_dir("small-test")
