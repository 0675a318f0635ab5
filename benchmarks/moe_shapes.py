"""The MoE layer shapes the kernel benchmarks and the tile tuner use (from the models' config.json files)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    experts: int  # routed experts of one MoE layer (E)
    top_k: int  # experts per token (K)
    hidden: int  # hidden size (H)
    inter: int  # expert intermediate size (I)
    q_heads: int  # attention query heads
    kv_heads: int  # attention key/value heads
    head_dim: int


MODEL_SHAPES = {
    "olmoe-1b-7b": MoEShape(experts=64, top_k=8, hidden=2048, inter=1024, q_heads=16, kv_heads=16, head_dim=128),
    "qwen3-30b-a3b": MoEShape(experts=128, top_k=8, hidden=2048, inter=768, q_heads=32, kv_heads=4, head_dim=128),
}

# Token counts of one step: decode batches at the small end, prefill chunks at the large end.
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
