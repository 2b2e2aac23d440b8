"""Shared fixtures: real engines on real SQLite files, real torch models (CPU)."""

from __future__ import annotations

import pytest
import torch
from gatedutil import GATED_MODULE, X4, Y2
from safetensors.torch import save_file

from modelconsole.gpu.devices import SimulatedBackend
from modelconsole.scheduler.config import GpuConfig
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.store import Store

MiB = 2**20


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "state.db"


@pytest.fixture
async def engine(store_path, tmp_path):
    eng = Engine(Store(store_path), model_roots=(str(tmp_path),), base_dir=str(tmp_path), default_device="cpu")
    await eng.start()
    yield eng
    await eng.close()


@pytest.fixture
async def make_engine(tmp_path):
    """Engines on simulated devices (``capacities_mib``), closed after the test."""
    engines = []

    async def make(capacities_mib=(256,), store=False, tick_s=3600.0, free_delay_s=0.0, backend_kw=None, **gpu):
        gpu.setdefault("reserve_mib", 0)
        gpu.setdefault("min_residency_s", 0)
        backend = SimulatedBackend([c * MiB for c in capacities_mib], free_delay_s=free_delay_s,
                                   **(backend_kw or {}))
        eng = Engine(Store(tmp_path / "state.db") if store else None, gpu=GpuConfig(**gpu), backend=backend,
                     base_dir=str(tmp_path), tick_s=tick_s)
        await eng.start()
        engines.append(eng)
        return eng, backend

    yield make
    for eng in engines:
        if not eng._closing:
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


@pytest.fixture
def gated(engine, tmp_path):
    """Writes the factory module and weights; returns a config maker.  Opens every gate at teardown."""
    (tmp_path / "gatedmodels.py").write_text(GATED_MODULE)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    save_file({"lin.weight": lin.weight.detach().contiguous(), "lin.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "gated.safetensors"))
    names: list[str] = []

    def make(name: str, gate_open: bool = True, kind: str = "linear", **kw):
        names.append(name)
        cfg = {
            "name": name,
            "source": "safetensors:gated.safetensors",
            "factory": "gatedmodels:build",
            "args": {"gate_open": gate_open, "kind": kind},
            "inputs": X4,
            "outputs": Y2,
            "device": "cpu",
            "warmup": 0,
        }
        cfg.update(kw)
        return cfg

    yield make
    # never leave a worker blocked: the engine's close would wait for it
    for name in names:
        try:
            mod = engine.instance(name)._module
        except Exception:  # noqa: BLE001
            continue
        if mod is not None and hasattr(mod, "gate"):
            mod.gate.set()
