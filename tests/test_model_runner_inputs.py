"""The runner's per-step inputs: a decode step's positions and cache slots (built per sequence) and every step's
adapter token groups (built from host lists) equal what the general, per-token derivation gives."""

from __future__ import annotations

import torch

from moeserve.engine.llm import LLM
from moeserve.engine.model_runner import token_groups
from moeserve.engine.sampling_params import SamplingParams


def test_token_groups_match_the_slots_of_the_tokens():
    seq_slots, query_lens = [0, 3, 1, 3, 0, 2], [1, 1, 5, 1, 3, 2]
    per_token = torch.tensor(seq_slots).repeat_interleave(torch.tensor(query_lens))
    groups = token_groups(seq_slots, query_lens)
    assert sorted(groups) == [0, 1, 2, 3]
    for slot, rows in groups.items():
        assert rows.dtype == torch.int64 and torch.equal(rows, torch.nonzero(per_token == slot).squeeze(1))


def test_decode_step_positions_and_slots(tiny_dir):
    llm = LLM(tiny_dir("llama"), block_size=4, num_kv_blocks=64, max_model_len=64)
    core = llm.engine.core
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, n in enumerate((3, 9, 6)):  # prompts ending mid-block and on a block edge
        llm.engine.add_request(f"r{i}", list(range(5, 5 + n)), sp)
    core.step()  # the prefills
    for _ in range(3):
        batch = core.scheduler.schedule()
        inp = core.runner.prepare(batch)
        seqs = inp.sample_seqs
        assert inp.input_ids.shape[0] == len(seqs) == 3  # a decode step
        pos = [s.num_computed_tokens for s in seqs]
        assert inp.positions.tolist() == pos
        want = [s.block_table[p // 4] * 4 + p % 4 for s, p in zip(seqs, pos)]
        assert inp.context.slot_mapping.tolist() == want
        assert inp.input_ids.tolist() == [s.token_ids[p] for s, p in zip(seqs, pos)]
        core.scheduler.update_from_output(batch, core.runner.execute(batch))


def test_growing_ids_convert_only_what_was_appended_and_start_over_on_a_new_list():
    """The runner's block tables and the sampler's seen tokens: a list appended to is mirrored by diff; a list
    replaced (a preempted sequence's new block table) or cut shorter is mirrored afresh."""
    from moeserve.engine.growing_ids import GrowingIds

    mirror = GrowingIds(torch.device("cpu"), torch.int32)
    table = [5, 9]
    assert mirror.update(table).tolist() == [5, 9]
    table += [2] * 70  # past the first capacity (64): the buffer grows, its ids kept
    assert mirror.update(table).tolist() == [5, 9] + [2] * 70 and mirror.length == 72
    table = [7]  # preempted, readmitted: a new list
    assert mirror.update(table).tolist() == [7]
    table.append(8)
    assert mirror.update(table).tolist() == [7, 8]
    del table[1:]
    assert mirror.update(table).tolist() == [7]
    with torch.inference_mode():  # the runner's mode: the same buffer is updated in it and out of it
        table.append(3)
        assert mirror.update(table).tolist() == [7, 3]
    table.append(4)
    assert mirror.update(table).tolist() == [7, 3, 4]
