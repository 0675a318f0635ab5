"""One run's timings (any system) and their summary: output tokens/s, TTFT and inter-token latency percentiles.

All times are seconds from the start of the run, when all of its requests arrive at once.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, like numpy's default."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class RunTimings:
    wall_s: float  # start of the run -> last token of the last request
    output_tokens: int
    ttft_s: list[float]  # per request: first token - start of the run
    itl_s: list[float]  # all requests' gaps between consecutive token arrivals (chunks)
    chunks: int  # token arrivals seen (HTTP: chunks with text; may be below output_tokens, see serving_client)
    swap_s: float = 0.0  # baseline: time spent swapping models or adapters between groups (included in wall_s)

    @classmethod
    def from_arrivals(cls, wall_s: float, output_tokens: int, arrivals: list[list[float]], swap_s: float = 0.0):
        """From each request's token arrival times (seconds from the run start, ascending)."""
        ttft = [a[0] for a in arrivals if a]
        itl = [b - a for arr in arrivals for a, b in zip(arr, arr[1:])]
        return cls(wall_s, output_tokens, ttft, itl, sum(map(len, arrivals)), swap_s)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def summary(self) -> dict[str, float]:
        return {
            "tok_s": self.tokens_per_s,
            "ttft_p50": percentile(self.ttft_s, 50),
            "ttft_p99": percentile(self.ttft_s, 99),
            "itl_p50": percentile(self.itl_s, 50),
            "itl_p99": percentile(self.itl_s, 99),
            "wall_s": self.wall_s,
            "swap_s": self.swap_s,
            "chunk_ratio": self.chunks / self.output_tokens,
        }

    def to_json(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def median_summary(runs: list[RunTimings]) -> dict[str, float]:
    """The median of each summary field over repetitions, and the spread of throughput: (max - min) / median."""
    sums = [r.summary() for r in runs]
    out = {k: statistics.median(s[k] for s in sums) for k in sums[0]}
    tps = [s["tok_s"] for s in sums]
    out["tok_s_spread"] = (max(tps) - min(tps)) / out["tok_s"] if len(tps) > 1 else 0.0
    out["reps"] = len(runs)
    return out
