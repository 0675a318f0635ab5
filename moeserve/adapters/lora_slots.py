"""LoRA and LoRA-expert adapters served as deltas on one linear layer, for every adapter slot at once.

A wrapped linear keeps the frozen base layer and stacked per-slot tables, allocated on the first adapter that
targets it: LoRA experts `A [S+1, E, r, in]`, `B [S+1, E, out, r]` (stored as `[S+1, E, r, out]`, so the CPU
twin's matmul with all of B is a view) with their router `[S+1, E, in]`, and IA3 vectors (MoV) `[S+1, E, dim]`
with theirs. Slot 0 is the base model and stays empty. Adapters of smaller rank or
fewer experts are zero-padded (a padded expert is never routed to), so ranks and expert counts coexist in one table.

    y = W x + sum_k g_k(x) * scale * B[slot, k] (A[slot, k] x)      LoRA experts (plain LoRA: one expert, g = 1)
    y = (W x) * sum_i g_i(W x) l[slot, i]                            IA3 experts on the output (keys, values)
    y = W (x * sum_i g_i(x) l[slot, i])                              IA3 experts on the input (FFN intermediate)

Each slot routes with its own rule (soft softmax, or top-k with optional renormalisation). On CPU the LoRA experts
of a step's adapters are one native call per linear in float32 (kernels' csrc/slot_lora_cpu.c), else padded into
batched matmuls (slot_batched_lora.py); on CUDA their routers run per slot and the delta of all tokens is one
moe_lora call indexed by (slot, expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeserve.adapters.slot_batched_lora import (
    SlotPadding,
    SlotTables,
    bind_slot_lora_native,
    native_lora_fits,
    slot_batched_lora,
    token_rows,
    worth_padding,
)
from moeserve.adapters.slot_ia3 import Ia3Routing, bind_slot_ia3_native, native_ia3_fits
from moeserve.adapters.weights import ModuleWeights
from moeserve.forward_context import get_forward_context
from moeserve.kernels.backend import use_triton
from moeserve.kernels.linear import linear
from moeserve.kernels.moe_lora import moe_lora


@dataclass(frozen=True)
class _StepPlan:
    """What one linear does for a step's set of adapter slots (kept per set until a load or unload)."""

    only: int | None  # the one adapter of every token of the step, when it is so
    lora: list[int]  # the step's slots with LoRA experts on this linear
    ia3_in: list[int]  # ... with IA3 experts on its input
    ia3_out: list[int]  # ... with IA3 experts on its output


@dataclass
class _SlotRouting:
    num_experts: int
    has_router: bool
    top_k: int | None
    renormalize: bool


def _route(x: torch.Tensor, router: torch.Tensor | None, r: _SlotRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids and weights [n, K] for tokens x [n, D] of one slot (K = top_k, or all experts when soft)."""
    n = x.shape[0]
    if not r.has_router:
        return torch.zeros(n, 1, dtype=torch.long, device=x.device), torch.ones(n, 1, device=x.device)
    probs = (x @ router[: r.num_experts].t()).float().softmax(dim=-1)  # [n, E]
    if r.top_k is None or r.top_k >= r.num_experts:
        ids = torch.arange(r.num_experts, device=x.device).expand(n, -1)
        return ids, probs
    weights, ids = torch.topk(probs, r.top_k, dim=-1)
    if r.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, max_experts: int) -> None:
        super().__init__()
        self.base = base
        self.num_slots, self.max_rank, self.max_experts = num_slots, max_rank, max_experts
        self.kind: list[str | None] = [None] * (num_slots + 1)  # per slot: "lora", "ia3_out", "ia3_in" or None
        self.routing: list[_SlotRouting | None] = [None] * (num_slots + 1)
        self.tables: dict[str, torch.Tensor] = {}
        self.rank = [0] * (num_slots + 1)  # per slot: its LoRA rank (0: none)
        # The LoRA tables cut to the adapters of the latest step, per kind of cut: kind -> (slots, contiguous copies);
        # emptied by every load and unload. Steps in a row mostly serve the same adapters: a cut is made once.
        self._cuts: dict[str, tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | SlotTables]] = {}
        self._plans: dict[tuple[int, ...], _StepPlan | None] = {}  # the slots of a step -> its plan; None: base only
        self._any_loaded = False
        self._ia3_routing = {"ia3_in": Ia3Routing(num_slots), "ia3_out": Ia3Routing(num_slots)}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def _table(self, name: str, *shape: int) -> torch.Tensor:
        """The table [S+1, *shape], at least that large in every dimension: made on first use, grown (zero-padded,
        contents kept) when an adapter needs more, so the LoRA tables stay as small as the resident adapters'
        largest rank and expert count rather than the configured maxima (the CPU twin's cost scales with them)."""
        old = self.tables.get(name)
        if old is not None and all(have >= want for have, want in zip(old.shape[1:], shape)):
            return old
        w = self.base.weight
        size = shape if old is None else tuple(max(a, b) for a, b in zip(old.shape[1:], shape))
        table = torch.zeros(self.num_slots + 1, *size, dtype=w.dtype, device=w.device)
        if old is not None:
            table[(slice(None), *(slice(0, n) for n in old.shape[1:]))] = old
        self.tables[name] = table
        return table

    def load(self, slot: int, w: ModuleWeights) -> None:
        num = w.num_experts
        if num > self.max_experts:
            raise ValueError(f"{num} experts exceed the configured maximum of {self.max_experts}")
        self.unload(slot)
        din, dout = self.in_features, self.out_features
        if w.lora_a is not None:
            rank = w.rank
            if rank > self.max_rank:
                raise ValueError(f"rank {rank} exceeds the configured maximum of {self.max_rank}")
            self._table("lora_a", num, rank, din)[slot, :num, :rank] = w.lora_a
            self._table("lora_b", num, rank, dout)[slot, :num, :rank] = w.lora_b.transpose(1, 2)  # [E, r, out]
            self._table("lora_scale")[slot] = w.scale
            self._table("lora_plain")[slot] = float(w.router is None)
            self.rank[slot] = rank
            kind, router_name, router_dim = "lora", "lora_router", din
        else:
            kind = "ia3_in" if w.ia3_input else "ia3_out"
            dim = din if w.ia3_input else dout
            self._table(f"{kind}_vec", self.max_experts, dim)[slot, :num] = w.ia3
            router_name, router_dim = f"{kind}_router", dim
        if w.router is not None:
            self._table(router_name, num if kind == "lora" else self.max_experts, router_dim)[slot, :num] = w.router
        if kind != "lora":
            self._ia3_routing[kind].set(slot, w.router is not None, num, w.top_k, w.renormalize)
        self.kind[slot] = kind
        self.routing[slot] = _SlotRouting(num, w.router is not None, w.top_k, w.renormalize)
        self._any_loaded = True

    def unload(self, slot: int) -> None:
        """Empties the slot (zeroed, so a padded read of it can never leak an old adapter)."""
        for table in self.tables.values():
            table[slot].zero_()
        for routing in self._ia3_routing.values():
            routing.clear(slot)
        self._cuts.clear()
        self._plans.clear()
        self.kind[slot] = None
        self._any_loaded = any(k is not None for k in self.kind)
        self.routing[slot] = None
        self.rank[slot] = 0

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer, without nn.Module's call machinery (it runs for every adapted linear of every step)."""
        return linear(x, self.base.weight, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        if ctx.adapter_slot is None or not self._any_loaded:
            return self._base(x)
        groups = ctx.token_groups()  # slot -> its token indices, built by the runner: no host sync here
        key = tuple(groups)
        plan = self._plans.get(key, False)
        if plan is False:
            plan = self._plans[key] = self._make_plan(key)
        if plan is None:
            return self._base(x)
        if plan.only is not None:  # every token of the step is this one adapter's: no per-token routing
            return self._one_adapter(x, plan.only, groups)
        if plan.ia3_in:
            x_in = x.clone()
            self._rescale_ia3("ia3_in", plan.ia3_in, x_in, groups)
        else:
            x_in = x
        y = self._base(x_in)  # [T, out]
        lora_slots = plan.lora
        tables = self._slot_tables(lora_slots) if lora_slots and not use_triton(x) else None
        run = self._native_lora(x, lora_slots) if tables is not None else None
        if run is not None:
            run(x.contiguous(), self._token_rows("token_rows", lora_slots, x.shape[0], groups, local=True), y)
        elif tables is not None and worth_padding([groups[s].shape[0] for s in lora_slots]):
            key = ("slot_padding", tuple(lora_slots))
            step_cache = ctx.step_cache
            if key not in step_cache:  # the same for every layer of the step
                step_cache[key] = SlotPadding.of([groups[s] for s in lora_slots])
            slot_batched_lora(x, tables, step_cache[key], y)
        elif lora_slots:
            self._add_lora(x, y, ctx.adapter_slot, lora_slots, groups)
        if plan.ia3_out:
            self._rescale_ia3("ia3_out", plan.ia3_out, y, groups)
        return y

    def _make_plan(self, slots: tuple[int, ...]) -> _StepPlan | None:
        present = [s for s in slots if self.kind[s] is not None]
        if not present:
            return None
        lora, ia3_in, ia3_out = ([s for s in present if self.kind[s] == k] for k in ("lora", "ia3_in", "ia3_out"))
        return _StepPlan(present[0] if len(slots) == 1 else None, lora, ia3_in, ia3_out)

    @staticmethod
    def _token_rows(name: str, slots: list[int], num_tokens: int, groups: dict, local: bool) -> torch.Tensor:
        """[T] int32 per token: its slot's place in `slots` (local) or the slot itself, -1 for the other tokens; made
        once per step for every layer (step cache)."""
        step_cache = get_forward_context().step_cache
        key = (name, tuple(slots))
        if key not in step_cache:
            step_cache[key] = token_rows(num_tokens, [groups[s] for s in slots], None if local else slots)
        return step_cache[key]

    def _rescale_ia3(self, kind: str, ia3_slots: list[int], act: torch.Tensor, groups: dict) -> None:
        """act [T, dim] (a fresh tensor) rescaled in place, each of these slots' tokens by its IA3 experts."""
        vectors = self.tables[f"{kind}_vec"]
        if native_ia3_fits(act, vectors):
            # Bound to the whole tables (every slot), which change only on load and unload: those clear the cuts.
            router = self.tables.get(f"{kind}_router")
            run = self._cut(kind, [], lambda: bind_slot_ia3_native(vectors, router, self._ia3_routing[kind]))
            run(act, self._token_rows(kind, ia3_slots, act.shape[0], groups, local=False))
            return
        for s in ia3_slots:
            act[groups[s]] = act[groups[s]] * self._ia3_scale(kind, s, act[groups[s]])

    def _one_adapter(self, x: torch.Tensor, slot: int, groups: dict) -> torch.Tensor:
        """The step where all T tokens belong to `slot`: the same result as the per-slot path, with no per-token
        routing or padding (a plain LoRA is two small matmuls), in fp32 and rounded once like moe_lora."""
        kind = self.kind[slot]
        if kind == "ia3_in":
            x_in = x.clone()
            self._rescale_ia3("ia3_in", [slot], x_in, groups)
            return self._base(x_in)
        y = self._base(x)  # [T, out]
        if kind == "ia3_out":
            self._rescale_ia3("ia3_out", [slot], y, groups)
            return y
        run = self._native_lora(x, [slot], "one")
        if run is not None:
            run(x.contiguous(), None, y)  # every token is the one adapter's
        else:
            slot_batched_lora(x, self._slot_tables([slot], "one"), SlotPadding.whole(), y)
        return y

    def _native_lora(self, x: torch.Tensor, lora_slots: list[int], kind: str = "slot_tables"):
        """The native LoRA call bound to these adapters' slot tables (kept beside the cut, like it), or None where
        the native kernel does not take this step (not float32 on CPU, no library)."""
        if x.dtype != torch.float32:
            return None
        return self._cut(f"{kind}:native", lora_slots, lambda: self._bind_native(self._slot_tables(lora_slots, kind)))

    @staticmethod
    def _bind_native(tables: SlotTables):
        probe = tables.w_in
        return bind_slot_lora_native(tables) if native_lora_fits(probe, tables, probe) else None

    def _ia3_scale(self, kind: str, slot: int, act: torch.Tensor) -> torch.Tensor:
        """sum_i g_i(act) l[slot, i] for the activations act [n, dim] it will rescale: [n, dim]."""
        routing = self.routing[slot]
        vectors = self.tables[f"{kind}_vec"][slot, : routing.num_experts]  # [E, dim]
        if not routing.has_router:  # one vector for every token
            return vectors[0].expand(act.shape[0], -1)
        ids, weights = _route(act, self.tables[f"{kind}_router"][slot], routing)  # [n, K]
        if ids.shape[1] == routing.num_experts:  # soft: every expert, in order
            return weights.to(act.dtype) @ vectors
        gate = torch.zeros(act.shape[0], routing.num_experts, dtype=act.dtype, device=act.device)  # [n, E]
        return gate.scatter_(1, ids, weights.to(act.dtype)) @ vectors

    def _add_lora(
        self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, lora_slots: list[int], groups: dict
    ) -> None:
        routed = [s for s in lora_slots if self.routing[s].has_router]
        top_k = max([1] + [self.routing[s].top_k or self.routing[s].num_experts for s in routed])
        # Plain LoRA slots (one expert, weight 1): one table lookup for all their tokens; 0 for every other token.
        plain = self.tables["lora_plain"][slots.long()].float()  # [T]
        if not routed:
            ids = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)  # [T, 1]
            weights = plain[:, None]  # [T, 1]
        else:
            ids = torch.zeros(x.shape[0], top_k, dtype=torch.long, device=x.device)  # [T, K]
            weights = torch.zeros(x.shape[0], top_k, dtype=torch.float32, device=x.device)  # [T, K]
            weights[:, 0] = plain
            for s in routed:  # each routed slot's router on its own tokens
                s_ids, s_weights = _route(x[groups[s]], self.tables["lora_router"][s], self.routing[s])
                ids[groups[s], : s_ids.shape[1]] = s_ids
                weights[groups[s], : s_weights.shape[1]] = s_weights
        # Tokens with no LoRA here (base, IA3-only slots) have weight 0 and add nothing.
        lora_a, lora_b, scale, slots = self._step_tables(lora_slots, slots)
        moe_lora(x, lora_a, lora_b, slots, ids, weights, scale, y)

    def _slot_tables(self, lora_slots: list[int], kind: str = "slot_tables") -> SlotTables:
        """These adapters' LoRA experts and routers, cut to their largest expert count and rank, laid out for
        slot_batched_lora (kept while the same adapters are stepped and none is loaded or unloaded; steps of one
        adapter keep theirs apart, `kind="one"`, so they and mixed steps do not evict each other's)."""
        return self._cut(kind, lora_slots, lambda: self._make_slot_tables(lora_slots))

    def _cut(self, kind: str, lora_slots: list[int], make):
        """This kind of cut for these adapters: the one kept from an earlier step if it was for them, else make()."""
        key = tuple(lora_slots)
        if self._cuts.get(kind, (None,))[0] != key:
            self._cuts[kind] = key, make()
        return self._cuts[kind][1]

    def _make_slot_tables(self, lora_slots: list[int]) -> SlotTables:
        routing = [self.routing[s] for s in lora_slots]
        experts = max(r.num_experts for r in routing)
        rank = max(self.rank[s] for s in lora_slots)
        device = self.tables["lora_a"].device
        index = torch.tensor(lora_slots, device=device)  # [P]
        num = len(lora_slots)
        a = self.tables["lora_a"].index_select(0, index)[:, :experts, :rank].reshape(num, experts * rank, -1)
        scale = self.tables["lora_scale"].index_select(0, index)[:, None, None]  # [P, 1, 1]
        b = self.tables["lora_b"].index_select(0, index)[:, :experts, :rank].reshape(num, experts * rank, -1) * scale
        top_k = [r.num_experts if r.top_k is None else min(r.top_k, r.num_experts) for r in routing]
        renorm = [r.has_router and r.renormalize and k < r.num_experts for r, k in zip(routing, top_k)]
        native = {  # the same routing per adapter, for the native kernel
            "own_experts": torch.tensor([r.num_experts for r in routing], dtype=torch.int32),
            "top_k": torch.tensor(top_k, dtype=torch.int32),
            "renorm": torch.tensor(renorm, dtype=torch.int32),
            "ranks": torch.tensor([self.rank[s] for s in lora_slots], dtype=torch.int32),
        }
        if not any(r.has_router for r in routing):  # plain LoRA only
            return SlotTables(a.contiguous(), b.contiguous(), 1, rank, False, None, None, None, False, **native)
        router = self.tables["lora_router"].index_select(0, index)[:, :experts]  # [P, E, in]; 0 where not routed
        own = torch.tensor([r.num_experts for r in routing], device=device)  # [P]
        bias = None
        if any(r.num_experts < experts for r in routing):
            bias = torch.zeros(num, 1, experts + experts * rank, dtype=torch.float32, device=device)  # [P, 1, E + E*r]
            bias[:, 0, :experts].masked_fill_(torch.arange(experts, device=device) >= own[:, None], float("-inf"))
        max_k = None if all(k == r.num_experts for r, k in zip(routing, top_k)) else max(top_k)  # None: all soft
        keep = None
        if max_k is not None and len(set(top_k)) > 1:
            keep = (torch.arange(max_k)[None, :] < torch.tensor(top_k)[:, None]).float()[:, None, :].to(device)
        renormalize = (
            all(renorm) if all(renorm) or not any(renorm) else torch.tensor(renorm, device=device)[:, None, None]
        )
        return SlotTables(
            w_in=torch.cat([router, a], dim=1).contiguous(),
            lora_b=b.contiguous(),
            num_experts=experts,
            rank=rank,
            routed=True,
            bias=bias,
            max_k=max_k,
            keep=keep,
            renormalize=renormalize,
            **native,
        )

    def _step_tables(self, lora_slots: list[int], slots: torch.Tensor):
        """The LoRA tables cut to this step's adapters, where that is smaller than the whole tables: the slots present
        (and an empty slot 0 for every other token), their largest expert count and rank. The tables are padded to
        the largest of every resident adapter, so without the cut a plain LoRA next to a resident 10-expert MoLoRA
        would pay for 10 experts. The cut is kept (contiguous) while the same adapters are stepped and none is loaded
        or unloaded. Returns (lora_a, lora_b as [S', E', out, r'], scale, the tokens' slots in the cut tables)."""
        lora_a, lora_b, scale = self.tables["lora_a"], self.tables["lora_b"], self.tables["lora_scale"]
        experts = max(self.routing[s].num_experts for s in lora_slots)
        rank = max(self.rank[s] for s in lora_slots)
        if (len(lora_slots) + 1) * experts * rank >= lora_a.shape[0] * lora_a.shape[1] * lora_a.shape[2]:
            return lora_a, lora_b.transpose(2, 3), scale, slots
        step_cache = get_forward_context().step_cache
        key = ("lora_cut", tuple(lora_slots), lora_a.shape[0])
        if key not in step_cache:  # the token remap is the same for every layer of the step with these adapters
            local = torch.zeros(self.num_slots + 1, dtype=torch.long)
            local[lora_slots] = torch.arange(1, len(lora_slots) + 1)  # table slot -> its place in the cut
            step_cache[key] = local.to(lora_a.device)[slots.long()]

        def make():
            index = torch.tensor([0, *lora_slots], device=lora_a.device)  # [P + 1] host data
            return (
                lora_a.index_select(0, index)[:, :experts, :rank].contiguous(),  # [P + 1, E', r', in]
                lora_b.index_select(0, index)[:, :experts, :rank].contiguous(),  # [P + 1, E', r', out]
                scale.index_select(0, index),  # [P + 1]
            )

        cut_a, cut_b, cut_scale = self._cut("step_tables", lora_slots, make)
        return cut_a, cut_b.transpose(2, 3), cut_scale, step_cache[key]
