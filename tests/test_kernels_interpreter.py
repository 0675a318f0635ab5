"""Reruns the Triton kernel tests in Triton's interpreter, in a fresh process, when this process cannot run them.

TRITON_INTERPRET=1 only takes effect if it is set before triton.language is first imported, and in a full pytest
session torch._dynamo (imported by transformers and the lead's fixtures) imports triton first. The kernel test
modules then skip themselves with SKIP_REASON; this test runs them in a child process whose environment sets the
variable from the start, and fails if the child fails or skips them again.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeserve.kernels import backend

MODULES = (
    "test_kernels_fused_moe.py",
    "test_kernels_expert_lora.py",
    "test_kernels_moe_lora.py",
    "test_kernels_paged_decode_attention.py",
)
SKIP_REASON = "triton was imported before TRITON_INTERPRET"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernel tests run compiled, in this process")
def test_kernel_modules_in_the_interpreter():
    pytest.importorskip("triton")
    if backend.interpreter_ready():
        pytest.skip("the interpreter works in this process, so the kernel modules ran here")
    tests_dir = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", MOESERVE_KERNELS="auto")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *(str(tests_dir / m) for m in MODULES)],
        cwd=tests_dir.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    assert SKIP_REASON not in child.stdout, report
    assert " passed" in child.stdout, report
