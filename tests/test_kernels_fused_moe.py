"""The fused MoE Triton kernel against its torch twin, the twin against a per-token loop, and the pieces around them
(token alignment, tile configurations, dispatch).

Without CUDA the Triton kernels run in Triton's interpreter on CPU, in float32 only (the interpreter's bf16 tl.dot is
wrong). The interpreter needs TRITON_INTERPRET=1 before triton.language is first imported; in a full pytest session
something imports it earlier (torch._dynamo does, whenever triton is installed), so this module then skips itself and
tests/test_kernels_interpreter.py reruns it in a fresh process. To run it directly, set the variable on the command
line: TRITON_INTERPRET=1 pytest tests/test_kernels_fused_moe.py. With CUDA the fp32 tests run compiled on the GPU,
and so do the bf16/fp16 tests at the end.
"""

import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel modules below are imported
pytest.importorskip("triton")
from moeserve.kernels.backend import interpreter_ready  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreter_ready():
    pytest.skip("triton was imported before TRITON_INTERPRET: see the docstring", allow_module_level=True)

from test_fused_moe import reference  # noqa: E402

from moeserve.kernels import fused_moe, fused_moe_torch  # noqa: E402
from moeserve.kernels.fused_moe_config import TileConfig, config_file_name, default_config, get_config  # noqa: E402
from moeserve.kernels.fused_moe_triton import fused_moe_triton, invoke_fused_moe  # noqa: E402
from moeserve.kernels.moe_align import align_block_size, max_blocks  # noqa: E402

per_token_loop = reference  # the definition written out, shared with test_fused_moe.py


def make_case(num_tokens, rows, top_k, hidden_size, inter, seed, router_experts=None, dtype=torch.float32):
    """Random inputs; ids drawn (distinct per token) from the first router_experts rows, default all rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=g)
    w13 = torch.randn(rows, 2 * inter, hidden_size, generator=g) / hidden_size**0.5
    w2 = torch.randn(rows, hidden_size, inter, generator=g) / inter**0.5
    choices = router_experts or rows
    topk_ids = torch.argsort(torch.rand(num_tokens, choices, generator=g), dim=-1)[:, :top_k]
    topk_weights = torch.softmax(torch.randn(num_tokens, top_k, generator=g), dim=-1)
    to = dict(device=DEVICE)
    return (hidden.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to),
            topk_weights.to(**to), topk_ids.to(**to))  # fmt: skip


SMALL = TileConfig(block_m=16, block_n=32, block_k=32, group_m=2)  # few programs: the interpreter pays per program


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 33])
@pytest.mark.parametrize("rows,top_k", [(4, 1), (8, 2), (16, 8)])
def test_triton_matches_twin(num_tokens, rows, top_k):
    # H and I are not multiples of the tile sizes, so every edge mask is exercised.
    case = make_case(num_tokens, rows, top_k, hidden_size=40, inter=24, seed=num_tokens * 31 + rows)
    expected = fused_moe_torch(*case)
    torch.testing.assert_close(invoke_fused_moe(*case, "silu", SMALL), expected)


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh"])
def test_triton_activations(activation):
    case = make_case(9, 8, 2, hidden_size=32, inter=16, seed=3)
    torch.testing.assert_close(invoke_fused_moe(*case, activation, SMALL), fused_moe_torch(*case, activation))


@pytest.mark.parametrize(
    "config",
    [
        TileConfig(block_m=16, block_n=16, block_k=16, group_m=1),
        TileConfig(block_m=32, block_n=64, block_k=64, group_m=8),
    ],
)
def test_triton_tile_configs(config):
    case = make_case(21, 6, 3, hidden_size=48, inter=40, seed=5)
    torch.testing.assert_close(invoke_fused_moe(*case, "silu", config), fused_moe_torch(*case))


def test_triton_default_config_path():
    case = make_case(5, 4, 2, hidden_size=16, inter=16, seed=11)
    torch.testing.assert_close(fused_moe_triton(*case), fused_moe_torch(*case))


def test_triton_overlay_rows_and_empty_experts():
    """ESFT overlay rows (beyond the router's 8 experts) are ordinary rows; most rows get no token and no tile."""
    hidden, w13, w2, weights, _ = make_case(13, 40, 4, hidden_size=24, inter=16, seed=7)
    g = torch.Generator().manual_seed(8)
    base_ids = torch.argsort(torch.rand(13, 8, generator=g), dim=-1)[:, :4]
    remap = torch.arange(40)
    remap[2], remap[5] = 33, 39  # one resident adapter replaced experts 2 and 5
    ids = remap[base_ids].to(DEVICE)
    ids[::2] = base_ids[::2].to(DEVICE)  # half the tokens are base-model tokens
    expected = per_token_loop(hidden, w13, w2, weights, ids, "silu")
    torch.testing.assert_close(fused_moe_torch(hidden, w13, w2, weights, ids), expected)
    torch.testing.assert_close(invoke_fused_moe(hidden, w13, w2, weights, ids, "silu", SMALL), expected)


def test_triton_all_tokens_on_one_expert_and_int32_ids():
    hidden, w13, w2, weights, _ = make_case(35, 4, 2, hidden_size=16, inter=16, seed=9)
    ids = torch.tensor([[3, 1]] * 35, dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(invoke_fused_moe(hidden, w13, w2, weights, ids, "silu", SMALL),
                               fused_moe_torch(hidden, w13, w2, weights, ids))  # fmt: skip


def test_triton_strided_inputs():
    hidden, w13, w2, weights, ids = make_case(7, 4, 2, hidden_size=32, inter=16, seed=12)
    wide = torch.randn(7, 64, device=DEVICE)
    wide[:, ::2] = hidden
    strided = wide[:, ::2]  # a column-strided view
    torch.testing.assert_close(invoke_fused_moe(strided, w13, w2, weights.t().contiguous().t(), ids, "silu", SMALL),
                               fused_moe_torch(hidden, w13, w2, weights, ids))  # fmt: skip


def test_twin_matches_per_token_loop_top8_with_overlay():
    case = make_case(6, 20, 8, hidden_size=12, inter=8, seed=13, router_experts=16)
    torch.testing.assert_close(fused_moe_torch(*case), per_token_loop(*case, "silu"))


def test_dispatcher_forced_to_triton(monkeypatch):
    monkeypatch.setenv("MOESERVE_KERNELS", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = make_case(3, 4, 2, hidden_size=16, inter=16, seed=14)
    calls = []
    import moeserve.kernels.fused_moe_triton as module

    monkeypatch.setattr(module, "fused_moe_triton", lambda *a: calls.append(1) or invoke_fused_moe(*a, SMALL))
    torch.testing.assert_close(fused_moe(*case), fused_moe_torch(*case))
    assert calls == [1]


def test_bad_shapes_and_activation_are_refused():
    hidden, w13, w2, weights, ids = make_case(2, 4, 2, hidden_size=16, inter=16, seed=15)
    with pytest.raises(ValueError, match="activation"):
        invoke_fused_moe(hidden, w13, w2, weights, ids, "relu", SMALL)
    with pytest.raises(ValueError, match="do not fit"):
        invoke_fused_moe(hidden, w13[:, :16], w2, weights, ids, "silu", SMALL)


# ---- token alignment ----


@pytest.mark.parametrize("num_items,num_keys,block_m", [(0, 4, 16), (1, 4, 16), (33, 5, 4), (200, 7, 16), (50, 64, 16)])
def test_align_block_size(num_items, num_keys, block_m):
    g = torch.Generator().manual_seed(num_items)
    keys = torch.randint(-1, num_keys, (num_items,), generator=g)  # -1: left out
    keys[: num_items // 3] = min(2, num_keys - 1)  # a popular key
    sorted_ids, block_key = align_block_size(keys, num_keys, block_m)
    assert sorted_ids.numel() == block_key.numel() * block_m == max_blocks(num_items, num_keys, block_m) * block_m
    used = block_key >= 0
    assert bool((used[:-1] >= used[1:]).all()), "unused blocks come last"
    tiles = sorted_ids.view(-1, block_m)
    for key in range(num_keys):
        expected = torch.nonzero(keys == key).squeeze(1)
        got = tiles[block_key == key].reshape(-1)
        assert bool((got[expected.numel() :] == num_items).all()), "a run is padded with the sentinel"
        assert torch.equal(got[: expected.numel()].long(), expected), "items in ascending order"
        assert got.numel() == -(-expected.numel() // block_m) * block_m, "no block for an empty key"
    assert bool((tiles[~used] == num_items).all())


# ---- tile configurations ----


def test_config_lookup(tmp_path):
    name = config_file_name(8, 64, 32, "NVIDIA H100 80GB HBM3")
    assert name == "E=8,H=64,I=32,device_name=NVIDIA_H100_80GB_HBM3.json"
    small, large = TileConfig(16, 32, 64, 1, 4, 2), TileConfig(64, 128, 64, 8, 8, 4)
    (tmp_path / name).write_text(json.dumps({"1": small.to_json(), "1024": large.to_json()}))
    assert get_config(3, 8, 64, 32, 2, "NVIDIA H100 80GB HBM3", tmp_path) == small
    assert get_config(700, 8, 64, 32, 2, "NVIDIA H100 80GB HBM3", tmp_path) == large
    assert get_config(700, 8, 64, 32, 2, "NVIDIA A100", tmp_path) == default_config(700, 8, 2)
    assert get_config(700, 8, 64, 32, 2, None, tmp_path) == default_config(700, 8, 2)
    with pytest.raises(ValueError, match="powers of two"):
        TileConfig(8, 32, 32, 1)


# ---- GPU: half precision against an fp32 reference ----

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to the output's largest magnitude


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 512])
def test_gpu_half_precision(dtype, num_tokens):
    case = make_case(num_tokens, 72, 8, hidden_size=512, inter=256, seed=num_tokens, router_experts=64, dtype=dtype)
    hidden, w13, w2, weights, ids = case
    reference = fused_moe_torch(hidden.float(), w13.float(), w2.float(), weights, ids)
    out = fused_moe_triton(*case)
    assert out.dtype == dtype
    tol = TOLERANCE[dtype] * reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference, atol=tol, rtol=0)
