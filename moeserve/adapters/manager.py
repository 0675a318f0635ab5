"""Which adapters exist, which are resident on the device, and which adapter slot each running request uses.

- Registered adapters (name -> directory) are validated when registered: config, base fingerprint, method, every
  tensor's name and shape, the rank and expert-count limits. A failed registration changes nothing.
- Each registration is a version. A request pins the version current when it arrives, so replacing an adapter while
  requests use it lets those finish on the old weights while new requests get the new ones.
- Device slots (1..max_slots; 0 is the base model) hold resident versions. A slot is taken from a version only when
  no running request uses it (least recently used first). Host memory keeps the tensors of up to max_cpu_adapters
  versions (plus every version a request still pins); others are read again from their directory when needed (in
  a reader thread, while the steps go on without their requests), and served only if the files hash to what was
  validated at registration (otherwise that adapter's requests fail with AdapterChangedError and nothing else
  changes): a name and version always serve the weights that were checked. Registrations read their files in the
  same thread (read_files), so no step waits for a disk.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from moeserve.adapters.config import AdapterError
from moeserve.adapters.expert_lora_slots import ExpertLoRASlots
from moeserve.adapters.expert_overlay import ExpertOverlay
from moeserve.adapters.lora_slots import AdaptedLinear
from moeserve.adapters.router_lora_slots import RouterLoRASlots
from moeserve.adapters.weights import AdapterFiles, LoadedAdapter, build_adapter, load_adapter, read_adapter_files
from moeserve.errors import ErrorKind
from moeserve.models.decoder import DecoderForCausalLM
from moeserve.models.moe import SparseMoeBlock

logger = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """No adapter is registered under that name."""

    kind = ErrorKind.ADAPTER_NOT_FOUND

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown adapter"


@dataclass(frozen=True)
class AdapterRef:
    """One version of one adapter, as a request pins it."""

    name: str
    version: int


@dataclass
class AdapterInfo:
    name: str
    path: Path
    method: str
    version: int
    digest: str = ""  # sha256 of the files as validated: what a restarted core must find again to serve it


@dataclass
class AdapterLimits:
    max_slots: int = 4  # adapters resident on the device at once
    max_cpu_adapters: int = 16  # adapters' tensors kept in host memory
    max_lora_rank: int = 64
    max_lora_experts: int = 16  # LoRA experts per adapted module
    esft_rows_per_layer: int | None = None  # overlay rows per MoE layer; None: max_slots * ceil(E / 4)

    def __post_init__(self) -> None:
        if self.max_slots < 1 or self.max_cpu_adapters < 1:
            raise ValueError("max_slots and max_cpu_adapters must be at least 1")


@dataclass
class _Version:
    ref: AdapterRef
    path: Path
    method: str
    weights: LoadedAdapter | None  # host copy; None when dropped from the host cache
    digest: str  # the validated files' content hash: a re-read must match it, or the version is not served
    pins: int = 0  # requests (running or waiting) that use this version


@dataclass
class _Slot:
    ref: AdapterRef | None = None
    last_used: int = 0


@dataclass
class AdapterStats:
    loads: int = 0  # versions placed into a device slot
    evictions: int = 0  # resident versions displaced to make room
    host_loads: int = 0  # reads of an adapter directory


class AdapterManager:
    def __init__(self, model: DecoderForCausalLM, limits: AdapterLimits | None = None) -> None:
        self.model = model
        self.limits = limits or AdapterLimits()
        self.max_slots = self.limits.max_slots
        self.stats = AdapterStats()
        self._current: dict[str, AdapterRef] = {}  # name -> the version new requests get
        self._versions: dict[AdapterRef, _Version] = {}
        self._host_lru: OrderedDict[AdapterRef, None] = OrderedDict()
        self._slots = [_Slot() for _ in range(self.max_slots + 1)]  # index 0 unused: the base model
        self._clock = itertools.count(1)
        self._version_ids = itertools.count(1)
        self._overlays: dict[int, ExpertOverlay] = {}
        # Re-reads of adapters dropped from host memory run here, off the step: file I/O and hashing only, the
        # checks against the model stay on the engine's thread (build_adapter).
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="adapter-reader")
        self._reading: dict[AdapterRef, Future] = {}
        self._linears: dict[str, AdaptedLinear] = {}
        self._expert_loras: dict[int, ExpertLoRASlots] = {}
        self._router_loras: dict[int, RouterLoRASlots] = {}

    # --- registry ---

    def is_registered(self, name: str) -> bool:
        return name in self._current

    def list(self) -> list[AdapterInfo]:
        infos = []
        for name, ref in self._current.items():
            version = self._versions[ref]
            infos.append(AdapterInfo(name, version.path, version.method, ref.version, version.digest))
        return infos

    def read_files(self, path: str | Path) -> Future:
        """Reads an adapter directory in the reader thread (AdapterFiles), for register(files=...) afterwards."""
        return self._reader.submit(read_adapter_files, path, self.max_adapter_bytes)

    def register(
        self,
        name: str,
        path: str | Path,
        replace: bool = False,
        expected_digest: str | None = None,
        files: AdapterFiles | None = None,
    ) -> AdapterInfo:
        """Validates and registers the adapter in `path` under `name` (a new version when replacing).

        expected_digest: the files must be exactly those (a restarted core re-registering what was served).
        files: the directory as read_files read it (otherwise it is read here).
        """
        if name in self._current and not replace:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        if files is None:
            weights = load_adapter(path, self.model, expected_digest, self.max_adapter_bytes)
        else:
            weights = build_adapter(files, self.model, expected_digest)
        self._check_limits(weights)
        ref = AdapterRef(name, next(self._version_ids))
        self._versions[ref] = _Version(ref, Path(path), weights.config.method, weights, weights.digest)
        self._touch_host(ref)
        old = self._current.get(name)
        self._current[name] = ref
        if old is not None:
            self._retire(old)
        logger.info("registered adapter %s v%d (%s) from %s", name, ref.version, weights.config.method, path)
        return AdapterInfo(name, Path(path), weights.config.method, ref.version, weights.digest)

    @functools.cached_property
    def max_adapter_bytes(self) -> int:
        """The largest weights file an adapter within the limits can have (fp32, every linear adapted with
        max_lora_experts experts of max_lora_rank, a router and IA3 vectors, plus every routed expert for ESFT and
        rank-max_lora_rank LoRA on every routed expert's tables):
        files above it are refused before they are read, so no adapter can make serving allocate more."""
        experts, rank = self.limits.max_lora_experts, self.limits.max_lora_rank
        total = 1 << 20  # the header and ESFT's score tensors
        for module in self.model.modules():
            if isinstance(module, (nn.Linear, AdaptedLinear)):
                i, o = module.in_features, module.out_features
                total += 4 * experts * (rank * (i + o) + i + max(i, o))
            elif isinstance(module, SparseMoeBlock):  # ESFT rows, or LoRA on every routed expert's tables
                gate_up, down = module.experts.gate_up_proj, module.experts.down_proj
                total += 4 * (gate_up.numel() + down.numel())
                total += 4 * gate_up.shape[0] * rank * (sum(gate_up.shape[1:]) + sum(down.shape[1:]))
        return total

    def unregister(self, name: str) -> None:
        """New requests for `name` are refused from now on; requests already using it finish on its weights."""
        if name not in self._current:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        self._retire(self._current.pop(name))

    def _retire(self, ref: AdapterRef) -> None:
        if self._versions[ref].pins == 0:
            self._drop(ref)

    def _drop(self, ref: AdapterRef) -> None:
        for slot in self._slots:
            if slot.ref == ref:
                self._clear_slot(slot)
        self._versions.pop(ref, None)
        self._host_lru.pop(ref, None)

    def _check_limits(self, weights: LoadedAdapter) -> None:
        for path, w in weights.modules.items():
            if w.rank > self.limits.max_lora_rank:
                raise AdapterError(
                    f"adapter rank {w.rank} at {path} is above --max-lora-rank {self.limits.max_lora_rank}"
                )
            if w.num_experts > self.limits.max_lora_experts:
                raise AdapterError(
                    f"adapter has {w.num_experts} experts at {path}, above --max-lora-experts "
                    f"{self.limits.max_lora_experts}"
                )
        for layer, w in weights.router_lora.items():
            if w.rank > self.limits.max_lora_rank:
                raise AdapterError(f"adapter rank {w.rank} on the router of layer {layer} is above --max-lora-rank")
        for layer, w in weights.expert_lora.items():
            rank = max(t.shape[1] for t in (w.a13, w.a2) if t is not None)
            if rank > self.limits.max_lora_rank:
                raise AdapterError(
                    f"adapter rank {rank} on the experts of layer {layer} is above --max-lora-rank "
                    f"{self.limits.max_lora_rank} (per-expert gate and up LoRAs count together)"
                )
        for layer, experts in weights.experts.items():
            rows = self._rows_per_layer(layer)
            if len(experts) > rows:
                raise AdapterError(
                    f"ESFT adapter fine-tunes {len(experts)} experts in layer {layer}, more than the {rows} overlay "
                    "rows per layer (--esft-rows-per-layer)"
                )

    # --- requests ---

    def acquire(self, name: str) -> AdapterRef:
        """Pins the current version of `name` for a new request."""
        ref = self._current.get(name)
        if ref is None:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        self._versions[ref].pins += 1
        return ref

    def release(self, ref: AdapterRef) -> None:
        version = self._versions.get(ref)
        if version is None:
            return
        version.pins -= 1
        if version.pins == 0 and self._current.get(ref.name) != ref:
            self._drop(ref)  # unloaded or replaced, and now unused

    # --- device slots ---

    def slot_of(self, ref: AdapterRef) -> int | None:
        for i, slot in enumerate(self._slots[1:], start=1):
            if slot.ref == ref:
                return i
        return None

    def assign_slot(self, ref: AdapterRef, busy: set[int]) -> int | None:
        """A device slot holding `ref`, loading it if needed into a free or idle slot (never one in `busy`).

        None when every slot is busy: the scheduler then leaves the request waiting.
        """
        index = self.slot_of(ref)
        if index is None:
            if self._host_weights(ref) is None:
                return None  # still being read: not this step
            free = [i for i in range(1, self.max_slots + 1) if self._slots[i].ref is None]
            idle = sorted(
                (i for i in range(1, self.max_slots + 1) if i not in busy and i not in free),
                key=lambda i: self._slots[i].last_used,
            )
            for index in free + idle:
                if self._place(ref, index):
                    break
            else:
                return None
        self._slots[index].last_used = next(self._clock)
        return index

    def _place(self, ref: AdapterRef, index: int) -> bool:
        slot = self._slots[index]
        weights = self._host_weights(ref)
        if slot.ref is not None:
            self._clear_slot(slot)
            self.stats.evictions += 1
        if not self._fits_overlay(weights):
            return False
        for layer, experts in weights.experts.items():
            self._overlay(layer).load(index, experts)
        for path, w in weights.modules.items():
            self._linear(path).load(index, w)
        for layer, w in weights.expert_lora.items():
            self._expert_lora(layer).load(index, w)
        for layer, w in weights.router_lora.items():
            self._router_lora(layer).load(index, w)
        slot.ref = ref
        self.stats.loads += 1
        return True

    def _fits_overlay(self, weights: LoadedAdapter) -> bool:
        return all(len(e) <= self._overlay(layer).num_free_rows for layer, e in weights.experts.items())

    def _clear_slot(self, slot: _Slot) -> None:
        index = self._slots.index(slot)
        for overlay in self._overlays.values():
            overlay.unload(index)
        for linear in self._linears.values():
            linear.unload(index)
        for expert_lora in self._expert_loras.values():
            expert_lora.unload(index)
        for router_lora in self._router_loras.values():
            router_lora.unload(index)
        slot.ref = None

    def _host_weights(self, ref: AdapterRef) -> LoadedAdapter | None:
        """ref's weights in host memory; None while they are being read again from disk by the reader thread (the
        step goes on without this adapter's requests). AdapterChangedError if the files read are not the ones
        validated at registration."""
        version = self._versions[ref]
        if version.weights is None:
            reading = self._reading.get(ref)
            if reading is None:
                self._reading[ref] = self._reader.submit(read_adapter_files, version.path, self.max_adapter_bytes)
                return None
            if not reading.done():
                return None
            del self._reading[ref]
            version.weights = build_adapter(reading.result(), self.model, version.digest)  # checks on this thread
            self.stats.host_loads += 1
        self._touch_host(ref)
        return version.weights

    @property
    def reading(self) -> bool:
        """Adapter files are being read in the background (the core should not sleep on its pipe)."""
        return bool(self._reading)

    def _touch_host(self, ref: AdapterRef) -> None:
        self._host_lru[ref] = None
        self._host_lru.move_to_end(ref)
        while len(self._host_lru) > self.limits.max_cpu_adapters:
            victim = next((r for r in self._host_lru if self._versions[r].pins == 0 and r != ref), None)
            if victim is None:
                break
            self._host_lru.pop(victim)
            self._versions[victim].weights = None

    # --- model surgery, on first use ---

    def _rows_per_layer(self, layer: int) -> int:
        if self.limits.esft_rows_per_layer is not None:
            return self.limits.esft_rows_per_layer
        block = self.model.model.layers[layer].mlp
        return self.max_slots * math.ceil(block.experts.gate_up_proj.shape[0] / 4)

    def _overlay(self, layer: int) -> ExpertOverlay:
        if layer not in self._overlays:
            block = self.model.model.layers[layer].mlp
            assert isinstance(block, SparseMoeBlock)
            block.overlay = ExpertOverlay(block, self.max_slots, self._rows_per_layer(layer))
            self._overlays[layer] = block.overlay
        return self._overlays[layer]

    def _expert_lora(self, layer: int) -> ExpertLoRASlots:
        if layer not in self._expert_loras:
            block = self.model.model.layers[layer].mlp
            assert isinstance(block, SparseMoeBlock)
            block.expert_lora = ExpertLoRASlots(block, self.max_slots)
            self._expert_loras[layer] = block.expert_lora
        return self._expert_loras[layer]

    def _router_lora(self, layer: int) -> RouterLoRASlots:
        if layer not in self._router_loras:
            router = self.model.model.layers[layer].mlp.gate
            router.lora = RouterLoRASlots(router, self.max_slots)
            self._router_loras[layer] = router.lora
        return self._router_loras[layer]

    def _linear(self, path: str) -> AdaptedLinear:
        if path not in self._linears:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            base = getattr(parent, child)
            assert isinstance(base, nn.Linear)
            wrapped = AdaptedLinear(base, self.max_slots, self.limits.max_lora_rank, self.limits.max_lora_experts)
            setattr(parent, child, wrapped)
            self._linears[path] = wrapped
        return self._linears[path]

    def resident(self) -> list[AdapterRef]:
        return [s.ref for s in self._slots[1:] if s.ref is not None]
