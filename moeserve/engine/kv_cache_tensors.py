"""Allocates the paged KV cache of every attention layer and hands it to the layers."""

from __future__ import annotations

import torch

from moeserve.models.attention import Attention
from moeserve.models.decoder import DecoderForCausalLM
from moeserve.models.mla import MLAttention


def _layer_shapes(model: DecoderForCausalLM, block_size: int) -> list[list[tuple[int, ...]]]:
    """Per attention layer, the shapes of its cache tensors, [N, ...] without the leading N."""
    shapes = []
    for module in model.modules():
        if isinstance(module, Attention):
            spec = module.spec
            one = (block_size, spec.num_kv_heads, spec.head_dim)
            shapes.append([one, one])  # keys, values
        elif isinstance(module, MLAttention):
            spec = module.spec
            shapes.append([(block_size, 1, spec.kv_lora_rank + spec.qk_rope_head_dim)])  # the latent
    return shapes


def bytes_per_block(model: DecoderForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(torch.Size(s).numel() * elem for layer in _layer_shapes(model, block_size) for s in layer)


def allocate_kv_cache(
    model: DecoderForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[torch.Tensor]:
    """Gives every attention layer its cache tensors [N, S, heads, D]; returns them all."""
    tensors: list[torch.Tensor] = []
    layers = [m for m in model.modules() if isinstance(m, (Attention, MLAttention))]
    for module, shapes in zip(layers, _layer_shapes(model, block_size)):
        caches = [torch.zeros(num_blocks, *s, dtype=dtype, device=device) for s in shapes]
        if isinstance(module, Attention):
            module.k_cache, module.v_cache = caches
        else:
            (module.kv_cache,) = caches
        tensors.extend(caches)
    return tensors


def default_num_blocks(
    model: DecoderForCausalLM,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    fraction: float,
    cpu_bytes: int,
) -> int:
    """As many blocks as `fraction` of the free accelerator memory holds (on CPU: `cpu_bytes`)."""
    per_block = bytes_per_block(model, block_size, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * fraction)
    else:
        budget = cpu_bytes
    return max(1, budget // per_block)
