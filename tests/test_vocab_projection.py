"""The LM head's projection: the blocked float32 CPU path equals F.linear, and the cases it leaves to one matmul."""

import torch
import torch.nn.functional as F

from moeserve.kernels.vocab_projection import BLOCK, MIN_VOCAB, blocked, vocab_projection


def test_blocked_projection_equals_linear():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 64, generator=g)
    weight = torch.randn(MIN_VOCAB + BLOCK // 2 + 3, 64, generator=g)  # a partial last block
    assert blocked(hidden, weight)
    out = vocab_projection(hidden, weight)
    assert out.shape == (5, weight.shape[0]) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(hidden, weight), rtol=1e-5, atol=1e-5)


def test_one_matmul_where_blocks_do_not_help():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(MIN_VOCAB, 32, generator=g)
    one_row = torch.randn(1, 32, generator=g)
    assert not blocked(one_row, weight)  # a single row: as fast as one matmul
    assert not blocked(torch.randn(4, 32).bfloat16(), weight.bfloat16())  # bf16: oneDNN is fast on this shape
    assert not blocked(torch.randn(4, 32), weight[: MIN_VOCAB - 1])  # a small vocabulary
    trained = torch.randn(4, 32, requires_grad=True)
    assert not blocked(trained, weight)  # autograd: the plain linear
    assert torch.equal(vocab_projection(one_row, weight), F.linear(one_row, weight))
    vocab_projection(trained, weight).sum().backward()
    assert trained.grad is not None
