"""Tile configurations of the fused MoE Triton kernel: tuned values are data (JSON), looked up per shape and GPU.

One file per (GPU name, R, H, I) in configs/, named like
    E=64,H=2048,I=1024,device_name=NVIDIA_H100_80GB_HBM3.json
where E is the number of rows of the expert tables the kernel sees (router experts plus any ESFT overlay rows),
holding {"<tokens>": {"block_m": 16, "block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3},
...}: the best configuration measured at that token count. A call with T tokens uses the entry whose token count is
nearest to T. When no file matches, `default_config` gives an untuned but reasonable choice. Files are read once
per process.
benchmarks/tune_fused_moe.py writes these files.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows (sorted token assignments) per tile; tl.dot needs >= 16
    block_n: int  # output columns per tile (I for gate/up, H for down); >= 16
    block_k: int  # reduction step (H for gate/up, I for down); >= 16
    group_m: int  # row tiles walked together so neighbouring programs share weight tiles in L2
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value}: tile sizes are powers of two >= 16 (a tl.dot requirement)")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"group_m, num_warps and num_stages are positive: {self}")

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def config_file_name(num_rows: int, hidden: int, inter: int, device_name: str) -> str:
    return f"E={num_rows},H={hidden},I={inter},device_name={device_name.replace(' ', '_')}.json"


def default_config(num_tokens: int, num_rows: int, top_k: int) -> TileConfig:
    """Untuned fallback. Few assignments per expert (decode) want short row tiles, since most rows of a tile would
    be padding; many (prefill) want square tiles and L2 grouping, as in the usual Triton matmul recipe."""
    rows_per_expert = num_tokens * top_k / max(num_rows, 1)
    if rows_per_expert <= 16:
        return TileConfig(block_m=16, block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=3)
    if rows_per_expert <= 64:
        return TileConfig(block_m=32, block_n=64, block_k=64, group_m=4, num_warps=4, num_stages=3)
    return TileConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


@functools.cache
def load_configs(path: Path) -> dict[int, TileConfig] | None:
    """The {tokens: config} table of one JSON file, or None when the file does not exist."""
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {int(tokens): TileConfig(**entry) for tokens, entry in raw.items()}


@functools.lru_cache(maxsize=4096)  # called per MoE layer per step: keep the lookup off the hot path
def get_config(
    num_tokens: int,
    num_rows: int,
    hidden: int,
    inter: int,
    top_k: int,
    device_name: str | None,
    config_dir: Path = CONFIG_DIR,
) -> TileConfig:
    """The tuned configuration nearest to num_tokens for this shape and GPU, else the default."""
    if device_name is not None:
        table = load_configs(config_dir / config_file_name(num_rows, hidden, inter, device_name))
        if table:
            nearest = min(table, key=lambda tokens: (abs(tokens - num_tokens), tokens))
            return table[nearest]
    return default_config(num_tokens, num_rows, top_k)
