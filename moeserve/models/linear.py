"""The model's dense linear layer: an nn.Linear (same parameters, state dict and isinstance checks) whose forward
runs moeserve.kernels.linear (oneDNN on CPU float32, F.linear elsewhere)."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.kernels.linear import linear


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
