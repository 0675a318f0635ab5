"""Which implementation a kernel dispatcher runs: the Triton kernel or its pure-torch twin.

One switch for every kernel, the environment variable MOESERVE_KERNELS:
    auto   (default) Triton on CUDA tensors when triton is installed; on CPU the native kernel where one applies
           (native.py), the twin otherwise;
    torch  always the twin;
    triton always Triton. On CPU tensors this needs Triton's interpreter (TRITON_INTERPRET=1 set before triton
           is first imported; the tests use it). Asking for Triton without the interpreter, or without triton
           installed, is an error rather than a silent fall-back, so a benchmark or test never measures the wrong
           path.

The variable is read on every call (a dict lookup), so tests can flip it with monkeypatch.setenv.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

MODES = ("auto", "torch", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("MOESERVE_KERNELS")
    if mode is None:  # the common case, first: dispatchers ask for every layer
        return "auto"
    mode = mode.strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MOESERVE_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


@functools.cache
def triton_installed() -> bool:
    # find_spec, not import: importing triton is slow and must not happen on a CPU-only install.
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """Whether Triton kernels can run in the interpreter in this process.

    triton decides at definition time: a kernel, and each of triton's own library functions (tl.cdiv, tl.sum, ...),
    is made interpretable only if TRITON_INTERPRET=1 was set when it was defined. So the variable must be set before
    triton.language is first imported, and that import can come early and from elsewhere (torch._dynamo imports
    triton whenever it is installed).
    """
    if not interpreting():
        return False
    if "triton.language" not in sys.modules:
        return True
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.cdiv, InterpretedFunction)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a dispatcher given this (representative input) tensor should launch the Triton kernel."""
    if os.environ.get("MOESERVE_KERNELS") in (None, "auto"):  # the common case, first: it runs for every layer
        return tensor.is_cuda and triton_installed()
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "auto":
        return tensor.is_cuda and triton_installed()
    if not triton_installed():
        raise RuntimeError("MOESERVE_KERNELS=triton but triton is not installed (pip install 'moeserve[gpu]')")
    if not tensor.is_cuda and not interpreter_ready():
        raise RuntimeError(
            "MOESERVE_KERNELS=triton on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is first imported (e.g. on the command line)"
        )
    return True
