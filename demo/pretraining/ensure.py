"""A built-in base model's directory, pretrained once into the cache when this install does not ship it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from moeserve.builtin import locate
from moeserve.demo.pretraining.config import PRESETS

logger = logging.getLogger(__name__)


def ensure_builtin_model(preset: str = "base") -> Path:
    """The directory of a built-in base model ("base" or "small-test"), pretraining it first if it is missing."""
    if preset not in PRESETS:
        raise ValueError(f"unknown built-in model {preset!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[preset]
    found = locate.find_model(config.name)
    if found is not None:
        return found
    cached = locate.cache_root() / config.name
    logger.warning(
        "the built-in model %s is not shipped in this install (%s); pretraining it into %s once (%d steps)",
        config.name, locate.DATA_DIR / config.name, cached, config.schedule.steps,
    )  # fmt: skip
    from moeserve.demo.pretraining.pretrain import pretrain  # imports Trainer; only needed here

    cached.parent.mkdir(parents=True, exist_ok=True)
    # Train into a temporary sibling and rename: an interrupted run leaves no half-written model behind.
    work = Path(tempfile.mkdtemp(prefix=f".{config.name}-", dir=cached.parent))
    try:
        pretrain(config, work)
        if locate.is_model_dir(cached):  # another process finished first; keep its copy
            shutil.rmtree(work)
        else:
            os.replace(work, cached)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return cached
