"""The engine core's malloc tuning (moeserve/engine/host_allocator.py): applied on glibc, blocks of a step's size then
come from the heap (no fresh mapping to fault in), and the opt-out leaves malloc alone."""

import ctypes
import sys

import pytest

from moeserve.engine import host_allocator

glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt")


@pytest.mark.skipif(not glibc, reason="glibc's mallopt only")
def test_tuning_puts_step_sized_blocks_in_the_heap():
    assert host_allocator.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, (ctypes.c_ssize_t,)
    block = libc.malloc(4 << 20)  # 4 MiB: a mapping of its own under glibc's default threshold (128 KiB)
    try:
        heap_end = libc.sbrk(0)
        assert block < heap_end  # below the program break: carved from the heap
    finally:
        libc.free(block)


def test_opt_out(monkeypatch):
    monkeypatch.setenv("MOESERVE_MALLOC_TUNING", "0")
    host_allocator.keep_freed_memory.cache_clear()
    try:
        assert host_allocator.keep_freed_memory() is False
    finally:
        monkeypatch.delenv("MOESERVE_MALLOC_TUNING")
        host_allocator.keep_freed_memory.cache_clear()
