"""Parameter counts of a decoder MoE model from its config: what a decode step reads and what a prompt token computes.

Read from the Hugging Face config alone (no weights), for the architectures the benchmarks build: OLMoE and Qwen3-MoE
(grouped-query attention, every layer MoE), Qwen2-MoE (a shared expert), DeepSeek-V2/V3 (MLA, shared experts, dense
first layers). Biases, and the small q/k norms, are counted as an upper bound or left out: < 0.1% of any layer here.

  decode step bytes (B sequences at mean context C) =
        every layer's attention, norms, router, dense MLP and shared experts
      + the routed experts the batch touches (expected distinct experts of a layer under uniform routing:
        E (1 - (1 - k/E)^B); random routers route near-uniformly)
      + lm_head, final norm, B embedding rows
      + the KV cache: B x C x (per layer: 2 x kv_heads x head_dim; MLA: kv_lora_rank + qk_rope_head_dim, the
        compressed latent moeserve caches, moeserve/models/mla.py)
  prompt FLOPs (T tokens of S sequences) = 2 T (matmul parameters a token passes: attention linears, router, dense
      MLP, shared and top-k routed experts) + 2 S vocab hidden (lm_head, once per sequence: the sampled position);
      attention scores and softmax are left out (4 C heads head_dim per token and layer: < 1% at C = 120)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer, grouped by how a step reads them."""

    attention: int  # attention linears + the layer's norms (read every step)
    dense: int  # dense MLP (0 in an MoE layer)
    shared: int  # shared experts, and a shared expert's gate (read every step)
    router: int  # router weight E x hidden (0 in a dense layer)
    expert: int  # one routed expert (gate, up, down)
    experts: int  # routed experts E (0 in a dense layer)
    top_k: int  # experts per token k (0 in a dense layer)

    def touched(self, batch: int) -> float:
        """Expected distinct routed experts `batch` tokens hit under uniform routing."""
        if self.experts == 0:
            return 0.0
        return self.experts * (1 - (1 - self.top_k / self.experts) ** batch)

    @property
    def always(self) -> int:
        """Parameters every step reads whatever the routing."""
        return self.attention + self.dense + self.shared + self.router

    @property
    def active(self) -> int:
        """Matmul parameters one token passes through."""
        return self.always + self.top_k * self.expert


@dataclass(frozen=True)
class StepBytes:
    weights: float  # bytes of weights one decode step reads
    kv: float  # bytes of KV cache one decode step reads


def _attention(config) -> int:
    h, heads = config.hidden_size, config.num_attention_heads
    norms = 2 * h  # input and post-attention RMSNorm
    if getattr(config, "kv_lora_rank", None):  # DeepSeek MLA
        nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        r, q_rank = config.kv_lora_rank, config.q_lora_rank
        q = h * heads * (nope + rope) if not q_rank else h * q_rank + q_rank + q_rank * heads * (nope + rope)
        kv = h * (r + rope) + r + r * heads * (nope + v)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
        return q + kv + heads * v * h + norms
    kv_heads = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    qk_norms = (heads + kv_heads) * d  # OLMoE normalises whole q and k; Qwen3 per head (2 d): an upper bound
    return h * heads * d * 2 + h * kv_heads * d * 2 + qk_norms + norms


def _is_dense(config, i: int) -> bool:
    if config.model_type.startswith("deepseek"):
        return i < config.first_k_dense_replace
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return i in (getattr(config, "mlp_only_layers", None) or []) or (i + 1) % step != 0


def layer_params(config) -> list[LayerParams]:
    """Every decoder layer's parameters, in order."""
    h = config.hidden_size
    attention = _attention(config)
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
    experts = experts or config.num_local_experts
    top_k = config.num_experts_per_tok
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = 3 * h * inter * (getattr(config, "n_shared_experts", None) or 0)
    if getattr(config, "shared_expert_intermediate_size", None):  # Qwen2-MoE: one shared expert and its gate
        shared += 3 * h * config.shared_expert_intermediate_size + h
    layers = []
    for i in range(config.num_hidden_layers):
        if _is_dense(config, i):
            layers.append(LayerParams(attention, 3 * h * config.intermediate_size, 0, 0, 0, 0, 0))
        else:
            layers.append(LayerParams(attention, 0, shared, experts * h, 3 * h * inter, experts, top_k))
    return layers


def kv_per_token(config) -> int:
    """KV cache elements one token stores in one layer."""
    if getattr(config, "kv_lora_rank", None):
        return config.kv_lora_rank + config.qk_rope_head_dim
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * d


def total_params(config) -> int:
    """Every parameter: layers, embedding, lm_head (unless tied), final norm."""
    h, vocab = config.hidden_size, config.vocab_size
    layers = sum(p.always + p.experts * p.expert for p in layer_params(config))
    return layers + vocab * h * (1 if config.tie_word_embeddings else 2) + h


def step_bytes(config, batch: int, context: float, dtype_bytes: int) -> StepBytes:
    """What one decode step of `batch` sequences at mean `context` reads (see the module docstring)."""
    h = config.hidden_size
    layers = layer_params(config)
    weights = sum(p.always + p.touched(batch) * p.expert for p in layers) + config.vocab_size * h + h + batch * h
    kv = len(layers) * batch * context * kv_per_token(config)
    return StepBytes(weights * dtype_bytes, kv * dtype_bytes)


def prompt_flops(config, tokens: int, sequences: int) -> float:
    """Matmul FLOPs of prefilling `tokens` prompt tokens of `sequences` sequences (see the module docstring)."""
    active = sum(p.active for p in layer_params(config))
    return 2.0 * tokens * active + 2.0 * sequences * config.vocab_size * config.hidden_size
