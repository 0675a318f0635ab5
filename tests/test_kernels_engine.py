"""End to end: the engine with every Triton kernel (under the interpreter on CPU) generates what the torch path does.

Runs in a child process, because TRITON_INTERPRET must be set before triton is first imported (see
test_kernels_interpreter.py). The child serves a base request, an ESFT request and a LoRA request in one batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from adapter_factory import make_esft, make_peft_lora

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from moeserve import LLM, SamplingParams
    from moeserve.kernels import use_triton
    base, esft, lora, kernels = sys.argv[1:5]
    assert use_triton(torch.zeros(1)) == (kernels == "triton"), "the kernel switch did not take"
    llm = LLM(base, block_size=4, num_kv_blocks=64, max_model_len=64, adapters={"esft": esft, "lora": lora})
    prompts = ["The list type is", "x", "A dictionary maps keys"]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(prompts, params, adapter=[None, "esft", "lora"])
    print(json.dumps([o.outputs[0].token_ids for o in outs]))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the engine already runs the compiled kernels")
def test_engine_with_triton_kernels_matches_torch_path(tiny_dir, tmp_path):
    pytest.importorskip("triton")
    base = tiny_dir("olmoe")
    esft, _ = make_esft(base, tmp_path / "esft", seed=4)
    lora, _ = make_peft_lora(base, tmp_path / "lora", seed=5, targets=("q_proj", "o_proj"))

    def run(kernels: str) -> list[list[int]]:
        env = dict(os.environ, MOESERVE_KERNELS=kernels, TRITON_INTERPRET="1" if kernels == "triton" else "0")
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(base), str(esft), str(lora), kernels],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert child.returncode == 0, child.stderr[-4000:]
        return json.loads(child.stdout.strip().splitlines()[-1])

    assert run("triton") == run("torch")
