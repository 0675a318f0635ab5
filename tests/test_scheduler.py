"""Block pool, prefix cache and scheduler on fake requests (no model), asserting on the scheduler's output."""

from __future__ import annotations

import pytest

from moeserve.engine.block_pool import BlockPool, NoFreeBlocksError
from moeserve.engine.config import SchedulerConfig
from moeserve.engine.kv_cache_manager import KVCacheManager
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.scheduler import RunnerOutput, Scheduler
from moeserve.engine.sequence import Sequence, SequenceStatus


def seq(tokens, request_id="r", adapter=None):
    return Sequence(request_id, list(tokens), SamplingParams(max_tokens=100), adapter=adapter)


def fake_runner(out, sampled_token: int = 7) -> RunnerOutput:
    """What a model runner would return: one token for every sequence whose tokens this step completes."""
    done = [i.seq.request_id for i in out.scheduled if i.seq.num_computed_tokens + i.num_new_tokens == i.seq.num_tokens]
    return RunnerOutput(done, [sampled_token] * len(done), [None] * len(done))


def run_step(scheduler: Scheduler, out, sampled_token: int = 7) -> list:
    return scheduler.update_from_output(out, fake_runner(out, sampled_token))


def test_pool_accounting():
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3] and pool.num_free == 0 and pool.usage == 1.0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()
    pool.share(blocks[0])
    pool.free([blocks[0]])
    assert pool.num_free == 0  # still one reference
    pool.free(blocks)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([blocks[1]])


def test_prefix_hit_shares_blocks_and_frees_with_last_user():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = seq(range(10), "a")
    assert kv.use_cached_prefix(a) == 0
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    assert len(a.block_table) == 3 and a.num_cached_blocks == 2

    b = seq(list(range(8)) + [99, 98, 97], "b")  # same first 8 tokens (two full blocks)
    assert kv.use_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert kv.pool.ref_counts[a.block_table[0]] == 2

    other_adapter = seq(range(10), "c", adapter="math")  # same tokens, another adapter: different KV
    assert kv.use_cached_prefix(other_adapter) == 0

    shared = list(b.block_table)
    kv.free(a)
    assert all(kv.pool.ref_counts[blk] == 1 for blk in shared)
    kv.free(b)
    assert all(kv.pool.ref_counts[blk] == 0 for blk in shared)
    assert kv.pool.num_free == 10
    # Freed but still cached: a third request with the prefix takes the same blocks back.
    d = seq(range(9), "d")
    assert kv.use_cached_prefix(d) == 8 and d.block_table == shared


def test_last_token_is_always_computed():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = seq(range(8), "a")
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    again = seq(range(8), "b")  # the whole prompt is cached, but its last token must run to give logits
    assert kv.use_cached_prefix(again) == 4


def test_token_budget_mixes_decodes_and_chunked_prefill():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), KVCacheManager(64, 4, False))
    first = seq(range(3), "first")
    sched.add(first)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("first", 3)]
    run_step(sched, out)
    long = seq(range(25), "long")
    sched.add(long)
    out = sched.schedule()  # one decode for first, then 9 prompt tokens of long
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("first", 1), ("long", 9)]
    run_step(sched, out)
    assert long.num_computed_tokens == 9 and long.num_tokens == 25  # mid-prefill: nothing sampled
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("first", 1), ("long", 9)]


def test_max_num_seqs_caps_running():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), KVCacheManager(64, 4, False))
    for i in range(3):
        sched.add(seq(range(5), f"r{i}"))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_frees_newest_and_requeues_it_first():
    # 4 blocks of 2 tokens: two sequences of 3 tokens take 2 blocks each; growing needs a fifth block.
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), KVCacheManager(4, 2, False))
    old, new = seq(range(3), "old"), seq(range(3), "new")
    sched.add(old)
    sched.add(new)
    out = sched.schedule()
    assert len(out.scheduled) == 2 and sched.kv.pool.num_free == 0
    run_step(sched, out)  # both now hold 4 tokens: 3 computed, the next needs slot 4 -> block 3 (full table)
    run_step(sched, sched.schedule())  # decode: 4th token fits in block 2
    out = sched.schedule()  # 5th token needs a third block each: none free
    assert [s.request_id for s in out.preempted] == ["new"]
    assert [i.seq.request_id for i in out.scheduled] == ["old"]
    assert sched.waiting[0] is new and new.status is SequenceStatus.WAITING
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert new.output_token_ids == [7, 7]  # outputs kept: recomputed later, not lost


def test_finish_frees_blocks_wherever_the_sequence_is():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(16, 4, False))
    a = seq(range(6), "a")
    sched.add(a)
    run_step(sched, sched.schedule())
    sched.finish(a, "abort")
    assert a.finish_reason == "abort" and sched.kv.pool.num_free == 16 and not sched.has_unfinished()


class FakeSlots:
    """Adapter slots that always have room; counts acquisitions released."""

    def __init__(self) -> None:
        self.released: list = []

    def assign_slot(self, ref, busy):
        return 1

    def release(self, ref) -> None:
        self.released.append(ref)


def test_update_from_output_stops_on_stop_token_eos_and_length():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(64, 4, False), max_model_len=12)
    params = {
        "stop_tok": SamplingParams(max_tokens=100, stop_token_ids=[5]),
        "eos": SamplingParams(max_tokens=100),
        "ignore": SamplingParams(max_tokens=100, ignore_eos=True),
        "len": SamplingParams(max_tokens=2),
        "ctx": SamplingParams(max_tokens=None),
    }
    for rid, p in params.items():
        sched.add(Sequence(rid, list(range(10)), p, eos_token_ids=frozenset({0})))
    batch = sched.schedule()
    tokens = {"stop_tok": 5, "eos": 0, "ignore": 0, "len": 3, "ctx": 3}
    outs = sched.update_from_output(batch, RunnerOutput(list(tokens), list(tokens.values()), [None] * 5))
    reasons = {o.request_id: (o.finish_reason, o.stop_reason, o.new_token_ids) for o in outs}
    assert reasons["stop_tok"] == ("stop", 5, [5])
    assert reasons["eos"] == ("stop", None, [0])
    assert reasons["ignore"][0] is None and reasons["len"][0] is None and reasons["ctx"][0] is None
    assert set(sched.requests) == {"ignore", "len", "ctx"}
    assert all(s.num_computed_tokens == 10 for s in sched.running)
    batch = sched.schedule()  # decodes: "len" reaches max_tokens 2, "ctx" reaches the context of 12
    outs = sched.update_from_output(batch, RunnerOutput(["ignore", "len", "ctx"], [4, 4, 4], [None] * 3))
    reasons = {o.request_id: o.finish_reason for o in outs}
    assert reasons == {"ignore": "length", "len": "length", "ctx": "length"}  # ignore's context is full too
    assert not sched.has_unfinished() and sched.kv.pool.num_free == 64


def test_update_from_output_skips_mid_prefill_and_survives_preemption():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), KVCacheManager(4, 2, False))
    old, new = seq(range(3), "old"), seq(range(3), "new")
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())
    run_step(sched, sched.schedule())
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["new"]
    outs = run_step(sched, out)
    assert [o.request_id for o in outs] == ["old"]
    assert new.num_computed_tokens == 0 and new.output_token_ids == [7, 7] and "new" in sched.requests


def test_finishing_releases_the_adapter_once():
    slots = FakeSlots()
    sched = Scheduler(SchedulerConfig(), KVCacheManager(16, 4, False), slots)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=1), adapter="x", adapter_ref="ref-x")
    b = Sequence("b", [1, 2, 3], SamplingParams(max_tokens=5), adapter="x", adapter_ref="ref-x2")
    sched.add(a)
    sched.add(b)
    outs = run_step(sched, sched.schedule())
    assert [o.finish_reason for o in outs] == ["length", None] and slots.released == ["ref-x"]
    assert sched.abort("b") and not sched.abort("b")
    sched.finish(b, "abort")  # already finished: nothing more to release
    assert slots.released == ["ref-x", "ref-x2"]
