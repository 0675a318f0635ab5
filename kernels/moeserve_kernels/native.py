"""The native CPU kernels (csrc/*.c): built with the machine's C compiler on first use, loaded with ctypes.

As Triton compiles its launchers with the system's C compiler, this compiles plain C (no Python or torch headers, so a
build takes about a second) with -O3 -march=native into a cache directory keyed by the sources, the compiler (its
version text), the flags and the CPU, and loads it once per process. The kernels run on raw float32 (some also
bfloat16) pointers, called from the caller's thread (ctypes drops the GIL around each call).

Threads: compiled with -fopenmp and loaded after torch, the library's libgomp.so.1 is the one torch loaded, so the
kernels split their work over torch's own OpenMP threads, as many as torch.set_num_threads asked for (csrc/parallel.h);
every output element is computed by one thread in a fixed order, so results do not depend on the thread count. A
compiler without OpenMP builds them single-threaded.

MOESERVE_NATIVE_MARCH picks another -march (x86-64-v3: AVX2 and FMA, what every x86-64 CI machine has); the tests
build for it beside native, so a CPU with AVX-512 also checks the code an AVX2-only CPU runs.

The kernels promise that a token's result does not depend on its batch: every code path of a vector loop does the same
arithmetic per element, multiply-adds fused (FMA) everywhere. GCC's tuning for some CPUs (Zen, Sapphire Rapids, hybrid
cores) splits FMAs that form an accumulation chain in some loops and not in others, which breaks that promise on
those CPUs; `--param=avoid-fma-max-bits=0` turns the split off. Clang contracts within an expression and never splits.

Without a C compiler, on a build failure, or with MOESERVE_NATIVE=0 the dispatchers run the pure-torch twins instead
(a warning says why, once). MOESERVE_KERNELS=torch also keeps to the twins (backend.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from moeserve.kernels.backend import kernel_mode

logger = logging.getLogger(__name__)

SOURCES = (
    "fused_moe_cpu.c",
    "paged_attention_cpu.c",
    "rms_norm_cpu.c",
    "rope_cpu.c",
    "slot_lora_cpu.c",
    "slot_ia3_cpu.c",
    "softmax_topk_cpu.c",
    "store_kv_cpu.c",
    "threads_cpu.c",
)
CFLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11")
OPENMP_FLAGS = ("-fopenmp",)  # dropped when the compiler has no OpenMP (the kernels then run on one thread)
GCC_FLAGS = ("--param=avoid-fma-max-bits=0",)  # every multiply-add fused, whatever the tuning (see above)
_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
# name -> argument types of each exported function (all return int: 0, or a negative error code).
SIGNATURES: dict[str, tuple] = {
    # x, T, H, w13, w2, R, I, topk_weights, topk_ids, K, bf16, out
    "moeserve_fused_moe": (_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int32, _PTR),
    # (): 1 where bf16 fused MoE calls take vdpbf16ps (AVX512-BF16), 0 where they widen to float
    "moeserve_fused_moe_bf16_products": (),
    # q, k_cache, v_cache, block_tables, context_lens, B, Hq, Hkv, D, Dv, N, S, M, table stride,
    # k strides (block, slot, head), v strides (block, slot, head), scale, window, out
    # ..., scale, window, bf16, out
    "moeserve_paged_decode_attention": (
        _PTR,
        _PTR,
        _PTR,
        _PTR,
        _PTR,
        *(_I64,) * 9,
        *(_I64,) * 6,
        _F32,
        _I64,
        ctypes.c_int32,
        _PTR,
    ),
    # x, rows, dim, weight, eps, y
    "moeserve_rms_norm_f32": (_PTR, _I64, _I64, _PTR, _F32, _PTR),
    # x, T, heads, D, cos, sin, out
    "moeserve_rope_f32": (_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR),
    # logits, T, E, K, renorm, scores, ids, weights
    "moeserve_softmax_topk_f32": (_PTR, _I64, _I64, _I64, ctypes.c_int32, _PTR, _PTR, _PTR),
    # cache, slots, values, T, row, slot_mapping
    "moeserve_store_kv_f32": (_PTR, _I64, _PTR, _I64, _I64, _PTR),
    # x, T, in, token_rows, w_in, P, E, r, routed, lora_b, out, own_experts, top_k, renorm, ranks, w_in_t, cols, y
    "moeserve_slot_lora_f32": (
        _PTR,
        _I64,
        _I64,
        _PTR,
        _PTR,
        _I64,
        _I64,
        _I64,
        _I64,
        _PTR,
        _I64,
        *(_PTR,) * 5,
        _I64,
        _PTR,
    ),  # fmt: skip
    # (): the threads a kernel called from this thread uses; 0 when built without OpenMP
    "moeserve_threads": (),
    # act, T, dim, token_slots, router (or NULL), vectors, S + 1, E, has_router, own_experts, top_k, renorm
    "moeserve_slot_ia3_f32": (_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, *(_PTR,) * 4),
}


def native_enabled() -> bool:
    return os.environ.get("MOESERVE_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags (a cache built on another CPU is not reused)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("MOESERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moeserve"
    )
    return Path(root) / "native"


def native_march() -> str:
    """The -march the kernels are built for: MOESERVE_NATIVE_MARCH, else native (this CPU)."""
    return os.environ.get("MOESERVE_NATIVE_MARCH", "").strip() or "native"


def _compiler_flags(compiler: str) -> tuple[tuple[str, ...], str]:
    """(the flags for this compiler, its version text): GCC gets GCC_FLAGS, clang does not know them."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"{compiler} --version failed: {exc}") from exc
    extra = () if "clang" in version.lower() else GCC_FLAGS
    return (*CFLAGS, f"-march={native_march()}", *extra), version


def _build(compiler: str, openmp: bool = True) -> Path:
    src_dir = Path(__file__).parent / "csrc"
    sources = [src_dir / name for name in SOURCES]
    flags, version = _compiler_flags(compiler)
    flags = (*flags, *OPENMP_FLAGS) if openmp else flags
    # Every file of csrc/, headers included: an edit to a shared header must not load a library built before it.
    inputs = [f.name.encode() + b"\0" + f.read_bytes() for f in sorted(src_dir.iterdir()) if f.suffix in (".c", ".h")]
    key = hashlib.sha256()
    for part in (*inputs, compiler.encode(), version.encode(), " ".join(flags).encode(), _cpu_id().encode()):
        key.update(part)
        key.update(b"\0")
    out = _cache_dir() / key.hexdigest()[:16] / "libmoeserve_cpu.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place, so processes building at once never load a partial file.
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        cmd = [compiler, *flags, "-o", str(partial), *map(str, sources), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The loaded library, or None (the twins run) when it cannot be built here; built at most once per process."""
    if not native_enabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        logger.warning("no C compiler found: the CPU kernels run their pure-torch twins (slower)")
        return None
    lib = None
    for openmp in (True, False):  # without OpenMP (a compiler without it) the kernels run on the caller's thread
        try:
            lib = ctypes.CDLL(str(_build(compiler, openmp)))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            error = exc
    if lib is None:
        logger.warning("native CPU kernels unavailable, running the pure-torch twins: %s", error)
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def native_ready(tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether a native kernel may take this (representative input) tensor: one of the kernel's dtypes (float32
    unless it says more), on CPU, the library built, and MOESERVE_KERNELS not asking for the twins."""
    return tensor.dtype in dtypes and tensor.is_cpu and native_library() is not None and kernel_mode() != "torch"


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an op on these tensors (the native kernels have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def native_function(name: str):
    """The exported function `name` of the library (its argument types set from SIGNATURES), for callers that bind
    their constant arguments once; check its return code with check_native."""
    lib = native_library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not built here (see moeserve.kernels.native)")
    return getattr(lib, name)


def check_native(code: int, name: str, bad_input: str) -> None:
    """IndexError(bad_input) when the kernel refused its input (-1), MemoryError when its workspace could not be
    allocated (-2)."""
    if code == -1:
        raise IndexError(bad_input)
    if code != 0:
        raise MemoryError(f"{name} could not allocate its workspace")


def call_native(name: str, *args, bad_input: str) -> None:
    """Runs the exported function `name` (SIGNATURES) on these arguments: IndexError(bad_input) when it refuses its
    input (-1), MemoryError when its workspace cannot be allocated (-2)."""
    code = native_function(name)(*args)
    if code != 0:
        check_native(code, name, bad_input)
