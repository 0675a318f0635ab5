"""The IA3-expert rescaling (MoV) of a step's adapters on one linear, all slots in one native call (CPU, float32).

AdaptedLinear keeps each slot's IA3 vectors [S+1, E, dim] and router [S+1, E, dim]; Ia3Routing holds the routing
of every slot as host int32 arrays, so moeserve.kernels' csrc/slot_ia3_cpu.c reads them by slot. Per token of slot s:
act *= sum_e g_e(act) l[s, e], g the softmax of the router's logits over the slot's experts (then its top k,
renormalised where it says), or l[s, 0] for a slot without a router: AdaptedLinear._ia3_scale's semantics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeserve.kernels.native import check_native, native_function, native_ready


class Ia3Routing:
    """Per adapter slot (0..S): whether it routes, its expert count, its k (its expert count when soft), whether it
    renormalises; zeros for a slot without IA3 experts here."""

    def __init__(self, num_slots: int) -> None:
        self.table = torch.zeros(4, num_slots + 1, dtype=torch.int32)  # [4, S+1]: has_router, experts, k, renorm

    def set(self, slot: int, has_router: bool, num_experts: int, top_k: int | None, renormalize: bool) -> None:
        k = num_experts if top_k is None or top_k >= num_experts else top_k
        self.table[:, slot] = torch.tensor([has_router, num_experts, k, has_router and renormalize and k < num_experts])

    def clear(self, slot: int) -> None:
        self.table[:, slot] = 0


def native_ia3_fits(act: torch.Tensor, vectors: torch.Tensor) -> bool:
    """Whether slot_ia3_native takes these activations: float32 and contiguous on CPU, float32 tables, the library."""
    return native_ready(act) and vectors.dtype == torch.float32 and act.is_contiguous()


def slot_ia3_native(
    act: torch.Tensor,
    vectors: torch.Tensor,
    router: torch.Tensor | None,
    routing: Ia3Routing,
    token_slots: torch.Tensor,
) -> None:
    """Rescales act [T, dim] in place, each token by its slot's IA3 experts (token_slots [T] int32, -1: leave it).
    vectors and router [S+1, E, dim] contiguous float32 (router None: no slot routes)."""
    bind_slot_ia3_native(vectors, router, routing)(act, token_slots)


def bind_slot_ia3_native(
    vectors: torch.Tensor, router: torch.Tensor | None, routing: Ia3Routing
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """slot_ia3_native on these tables with their arguments bound once: run(act, token_slots). An adapted linear
    keeps it until an adapter is loaded or unloaded (which may grow the tables)."""
    if router is not None and router.shape != vectors.shape:
        raise ValueError(f"IA3 router {tuple(router.shape)} and vectors {tuple(vectors.shape)} tables differ")
    fn, name = native_function("moeserve_slot_ia3_f32"), "moeserve_slot_ia3_f32"
    meta = routing.table
    dim = vectors.shape[2]
    bound = (
        None if router is None else router.data_ptr(), vectors.data_ptr(), vectors.shape[0], vectors.shape[1],
        meta[0].data_ptr(), meta[1].data_ptr(), meta[2].data_ptr(), meta[3].data_ptr(),
    )  # fmt: skip
    bad = "a token's adapter slot has no IA3 experts in these tables (or a routing outside them)"

    def run(act: torch.Tensor, token_slots: torch.Tensor) -> None:
        if act.shape[-1] != dim or not act.is_contiguous() or token_slots.shape[0] != act.shape[0]:
            raise ValueError(f"slot_ia3_native rescales contiguous act [T, {dim}] with one slot per token")
        code = fn(act.data_ptr(), act.shape[0], dim, token_slots.data_ptr(), *bound)
        if code != 0:
            check_native(code, name, bad)

    run.tables = (vectors, router, meta)  # the pointers above stay valid while run lives
    return run
