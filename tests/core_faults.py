"""Engine core entry points with faults injected (AsyncEngine's core_target), for tests. The spawned core process
imports this module by name (tests/ is on the sys.path it inherits), patches the core, then runs it as usual."""

from __future__ import annotations

import torch

from moeserve.adapters.manager import AdapterManager
from moeserve.engine.core_process import run_engine_core

# adapter name -> what placing it into a device slot raises
PLACEMENT_FAULTS = {
    "boom-runtime": lambda: RuntimeError("injected: the adapter tables could not be written"),
    "boom-oom": lambda: torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 2.00 GiB"),
}


def run_core_with_placement_faults(config, adapters, sock) -> None:
    """The core, with placing the adapters named in PLACEMENT_FAULTS failing (the scheduler's assign_slot)."""
    original = AdapterManager.assign_slot

    def assign_slot(self, ref, busy):
        fault = PLACEMENT_FAULTS.get(ref.name)
        if fault is not None:
            raise fault()
        return original(self, ref, busy)

    AdapterManager.assign_slot = assign_slot
    run_engine_core(config, adapters, sock)
