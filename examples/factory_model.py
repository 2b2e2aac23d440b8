"""A factory for a ``safetensors:`` source: it builds the module the weights load into.

A safetensors file holds tensors only, no code, so modelconsole needs to be
told what module they belong to.  The config names a callable with
``factory = "factory_model:build"``; modelconsole imports this file from the
config file's directory, calls ``build(**args)`` and loads the weights into
the result strictly (every name and shape must match).

Make a weights file for it (any trained or random weights of this shape)::

    import torch
    from safetensors.torch import save_model
    from factory_model import build

    save_model(build(hidden=32), "weights/factory_model.safetensors")

and declare the tensors in the config, because the file does not name them::

    [[models]]
    name = "factory-mlp"
    source = "safetensors:weights/factory_model.safetensors"
    factory = "factory_model:build"
    args = { hidden = 32 }
    inputs = [{ name = "features", datatype = "FP32", shape = [-1, 16] }]
    outputs = [{ name = "scores", datatype = "FP32", shape = [-1, 4] }]
"""

from __future__ import annotations

import torch
from torch import nn


class FactoryMLP(nn.Module):
    """16 features -> hidden -> 4 scores."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features)))


def build(hidden: int = 32) -> nn.Module:
    """The module for ``factory = "factory_model:build"``; ``args`` become keyword arguments."""
    return FactoryMLP(hidden)
