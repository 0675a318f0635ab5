"""Decode steps replayed from (CUDA) graphs give the eager engine's tokens.

On CPU the capture is the eager stand-in, which reruns the captured function on the static buffers: it checks the
buffer filling, the padding to captured sizes and the scratch block, everything but torch.cuda.graph itself (the GPU
suite runs the real capture).
"""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.cuda_graphs import DecodeGraphs, capture_sizes, eager_capture

PROMPTS = ["The quick brown fox", "a", "Hello world, this is a longer prompt over several KV blocks.", "x y", "z"]


def test_capture_sizes():
    assert capture_sizes(64) == [1, 2, 4, *range(8, 65, 8)]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]


@pytest.mark.parametrize("arch", ["llama", "olmoe"])
def test_graph_replayed_decodes_equal_eager(tiny_dir, arch):
    model_dir = tiny_dir(arch)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = LLM(model_dir, block_size=4, num_kv_blocks=128, max_model_len=64, max_num_seqs=8)
    expected = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]

    llm = LLM(model_dir, block_size=4, num_kv_blocks=128, max_model_len=64, max_num_seqs=8)
    runner = llm.engine.core.runner
    graphs = DecodeGraphs(
        runner.model, runner.model.spec.hidden_size, 8, 16, 128, 4, torch.device("cpu"), torch.float32, eager_capture
    )
    runner.graphs = graphs
    replays = []
    run = graphs.run
    graphs.run = lambda *a: replays.append(a[2].num_seqs) or run(*a)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert got == expected
    assert replays and set(graphs.graphs) == {graphs.padded_size(n) for n in replays}
    assert 5 in replays and 8 in graphs.graphs  # five decodes ran padded to the graph of eight
    # The scratch block is the one past the pool: no sequence ever owns it.
    assert llm.engine.kv.pool.num_blocks == 128


def test_adapter_steps_and_prefills_run_eagerly(tiny_dir):
    model_dir = tiny_dir("llama")
    llm = LLM(model_dir, block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=4)
    runner = llm.engine.core.runner
    graphs = DecodeGraphs(
        runner.model, runner.model.spec.hidden_size, 4, 16, 64, 4, torch.device("cpu"), torch.float32, eager_capture
    )
    from moeserve.engine.scheduler import ScheduledSeq, SchedulerOutput

    llm.engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3))
    seq = llm.engine.scheduler.requests["r"]
    batch = llm.engine.scheduler.schedule()
    assert not graphs.can_run(runner.prepare(batch).context)  # a prefill
    llm.engine.step()
    seq.adapter_slot = 1
    decode = SchedulerOutput([ScheduledSeq(seq, 1)])
    assert not graphs.can_run(runner.prepare(decode).context)  # an adapter token
    seq.adapter_slot = 0
    assert graphs.can_run(runner.prepare(decode).context)
