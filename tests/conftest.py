"""Shared fixtures: real engines on real SQLite files, real torch models (CPU)."""

from __future__ import annotations

import pytest
import torch

from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.store import Store


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "state.db"


@pytest.fixture
async def engine(store_path, tmp_path):
    eng = Engine(Store(store_path), model_roots=(str(tmp_path),), base_dir=str(tmp_path), default_device="cpu")
    await eng.start()
    yield eng
    await eng.close()


class Guarded(torch.nn.Module):
    """A real model that raises on NaN input: lets tests make one batch fail."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(x).any()):
            raise RuntimeError("NaN in input")
        return self.lin(x)


@pytest.fixture
def guarded_model(tmp_path):
    """A TorchScript archive of Guarded and the model table that registers it."""
    torch.manual_seed(0)
    path = tmp_path / "guarded.pt"
    torch.jit.save(torch.jit.script(Guarded()), str(path))
    return {
        "name": "guarded",
        "source": "torchscript:guarded.pt",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "device": "cpu",
        "max_batch_size": 8,
        "warmup": 0,
    }
