"""moeserve.kernels.linear: oneDNN's matmul for CPU float32 linears, F.linear everywhere else; the model's Linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeserve.kernels import linear as LINEAR
from moeserve.kernels.linear import linear, onednn_available, onednn_fits
from moeserve.models.linear import Linear


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear op")
def test_onednn_path_equals_f_linear():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    for x in (
        torch.randn(7, 64, generator=g),
        torch.randn(3, 5, 64, generator=g),  # leading dims
        torch.randn(64, 9, generator=g).t(),  # not contiguous
        torch.randn(0, 64),  # no rows
    ):
        assert onednn_fits(x, weight)
        for b in (None, bias):
            out = linear(x, weight, b)
            assert out.shape == (*x.shape[:-1], 48)
            torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_f_linear_where_onednn_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(LINEAR, "F", type("F", (), {"linear": staticmethod(lambda *a: calls.append(a) or a[0])}))
    weight = torch.randn(8, 4)
    x = torch.randn(2, 4)
    linear(x.bfloat16(), weight.bfloat16())  # bf16: torch already runs it through oneDNN
    trained = torch.randn(2, 4, requires_grad=True)
    linear(trained, weight)  # autograd recording: the op has no backward
    monkeypatch.setenv("MOESERVE_KERNELS", "torch")
    linear(x, weight)
    assert len(calls) == 3


def test_model_linear_is_an_nn_linear_that_trains():
    layer = Linear(6, 3)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()  # training runs F.linear, with its backward
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
