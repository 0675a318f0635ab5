"""The MOESERVE_KERNELS switch and the dispatchers' choice between Triton and the torch twins."""

import os
import subprocess
import sys

import pytest
import torch

from moeserve.kernels import backend, fused_moe, moe_lora, paged_decode_attention


def test_modes(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("MOESERVE_KERNELS", "torch")
    assert not backend.use_triton(cpu)
    monkeypatch.setenv("MOESERVE_KERNELS", "auto")
    assert not backend.use_triton(cpu)  # auto never runs Triton on CPU, interpreter or not
    monkeypatch.delenv("MOESERVE_KERNELS")
    assert backend.kernel_mode() == "auto"
    monkeypatch.setenv("MOESERVE_KERNELS", "fast")
    with pytest.raises(ValueError, match="MOESERVE_KERNELS"):
        backend.use_triton(cpu)


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MOESERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not backend.triton_installed():
        with pytest.raises(RuntimeError, match="not installed"):
            backend.use_triton(torch.zeros(1))
        return
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backend.interpreter_ready():
        assert backend.use_triton(torch.zeros(1))
    else:  # triton.language was imported earlier in this process, without the variable
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            backend.use_triton(torch.zeros(1))


def test_interpreter_not_ready_if_set_after_triton_is_imported():
    """The converse (set first, then import) is what test_kernels_interpreter.py relies on and checks."""
    pytest.importorskip("triton")
    code = ("import os, triton; os.environ['TRITON_INTERPRET'] = '1'; from moeserve.kernels import backend; "
            "assert backend.interpreting() and not backend.interpreter_ready()")  # fmt: skip
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_importing_kernels_does_not_import_triton():
    code = "import sys, moeserve.kernels; assert 'triton' not in sys.modules, 'triton was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dispatchers_run_the_twin_when_forced(monkeypatch):
    """With MOESERVE_KERNELS=torch the dispatchers never touch triton, even if the Triton modules would fail."""
    monkeypatch.setenv("MOESERVE_KERNELS", "torch")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 8, generator=g)
    out = fused_moe(hidden, torch.randn(2, 8, 8, generator=g), torch.randn(2, 8, 4, generator=g),
                    torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long))  # fmt: skip
    assert out.shape == (3, 8)
    y = torch.zeros(3, 5)
    lora_a, lora_b = torch.randn(2, 1, 2, 8, generator=g), torch.randn(2, 1, 5, 2, generator=g)
    moe_lora(hidden, lora_a, lora_b, torch.tensor([0, 1, 0]), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
             torch.ones(2), y)  # fmt: skip
    assert y[0].abs().sum() == 0 and y[2].abs().sum() == 0 and y[1].abs().sum() > 0
    tables, lens = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), torch.tensor([3, 1], dtype=torch.int32)
    attn = paged_decode_attention(torch.randn(2, 2, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g),
                                  torch.randn(3, 2, 1, 4, generator=g), tables, lens, 0.5)  # fmt: skip
    assert attn.shape == (2, 2, 4)
