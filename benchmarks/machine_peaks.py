"""What the CPU can do at best, measured with torch at a given thread count: memory read bandwidth and matmul peak.

  read bandwidth   bytes / time of `x.sum()` over a float32 buffer far larger than the caches (a decode step
                   mostly reads weights once, so reading is the bound, not copying)
  copy bandwidth   2 x bytes / time of `y.copy_(x)` (read + write counted), for comparison with bench_roofline's GPU
                   figure
  matmul peak      2 n^3 / time of an n x n x n matmul (n = 2048), float32 and bfloat16

Each is the best of `repeats` timings (the machine may be shared: the best is the least disturbed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class MachinePeaks:
    threads: int  # torch intra-op threads the figures were measured with
    read_gb_s: float  # x.sum() over a large float32 buffer, GB/s (1e9 bytes)
    copy_gb_s: float  # y.copy_(x), read + write counted, GB/s
    matmul_gflop_s: dict[str, float]  # dtype name -> n^3 matmul GFLOP/s

    def to_json(self) -> dict:
        return asdict(self)


def _best(fn, repeats: int) -> float:
    fn()  # warm: page faults, oneDNN's kernel choice
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _bandwidths(nbytes: int, repeats: int) -> tuple[float, float]:
    """(read, copy) bytes/s over a float32 buffer of `nbytes`; the buffers are freed on return."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # ones: every page really allocated
    y = torch.empty_like(x)
    return nbytes / _best(x.sum, repeats), 2 * nbytes / _best(lambda: y.copy_(x), repeats)


def measure(threads: int, buffer_gib: float = 1.0, n: int = 2048, repeats: int = 5,
            dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> MachinePeaks:  # fmt: skip
    """The peaks at `threads` torch threads (the caller's thread count is restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        read, copy = _bandwidths(int(buffer_gib * 2**30), repeats)
        flops = {}
        for name in dtypes:
            a = torch.randn(n, n).to(getattr(torch, name))
            b = torch.randn(n, n).to(getattr(torch, name))
            flops[name] = 2 * n**3 / _best(lambda: torch.mm(a, b), repeats) / 1e9
        return MachinePeaks(threads, read / 1e9, copy / 1e9, flops)
    finally:
        torch.set_num_threads(before)
