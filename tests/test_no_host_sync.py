"""A decode step of the engine, adapters of every kind in the batch, runs its model forward without reading a device
value back to the host: the metadata the forward needs is built by the runner, so the step can be a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from adapter_factory import EXPERT_TABLES, make_peft_expert_lora
from test_adapter_methods_serving import make_adapter
from test_attention_rows import SyncError, no_syncs, sync_origin

from moeserve import LLM, SamplingParams
from moeserve.forward_context import forward_context

METHODS = {
    "qwen2_moe": ["esft-gate", "lora", "molora", "mola", "mov", "loramoe"],
    "olmoe": ["esft-token", "lora", "molora", "mola", "mov"],
    "deepseek_v2": ["esft-gate", "lora", "mola"],
}


@pytest.mark.parametrize("arch", list(METHODS))
def test_mixed_adapter_decode_step_has_no_host_sync(tiny_dir, tmp_path, arch, monkeypatch):
    base = tiny_dir(arch)
    methods = [*METHODS[arch], "expert-lora"]
    llm = LLM(base, num_kv_blocks=64, max_model_len=64, max_adapters=len(methods), max_cpu_adapters=len(methods))
    seqs = [llm.tokenizer.encode("The list type is"), llm.tokenizer.encode("x y")]
    for method in methods:
        if method == "expert-lora":  # LoRA on the routed experts and the router (PEFT target_parameters)
            tables = [*EXPERT_TABLES, "mlp.gate.weight"]
            path, _ = make_peft_expert_lora(base, tmp_path / method, 3, targets=("o_proj",), target_parameters=tables)
        else:
            path = make_adapter(base, tmp_path / method, method, arch, seqs)
        llm.engine.adapters.register(method, path)
    engine = llm.engine
    for i, adapter in enumerate([None, *methods]):
        engine.add_request(str(i), seqs[i % 2], SamplingParams(temperature=0, max_tokens=4), adapter=adapter)
    engine.step()  # the prefills
    runner = engine.core.runner
    inp = runner.prepare(engine.scheduler.schedule())
    ctx = inp.context
    assert ctx.is_decode and ctx.num_seqs == len(methods) + 1 and len(ctx.token_groups()) == len(methods) + 1
    try:
        with monkeypatch.context() as patched, torch.inference_mode(), forward_context(ctx):
            no_syncs(patched)
            hidden = runner.model(inp.input_ids, inp.positions)
    except SyncError as error:
        pytest.fail(f"{arch}: the model's forward syncs in {sync_origin(error)}")
    assert torch.isfinite(hidden).all()
