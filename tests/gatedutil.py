"""Gated models for request-path tests: a forward that waits on ``self.gate`` (a threading.Event).

With the gate closed, one request occupies the model's worker thread and
everything after it stays queued, so what the queue does next (batch,
reorder, expire, refuse) is observable and exact.  Each forward also logs
(thread, input shape, first column) so tests can see which requests ran
together and in what order.  The ``gated`` fixture (conftest.py) writes the
factory module and weights.
"""

from __future__ import annotations

import asyncio
import textwrap

import torch
from waiting import until

GATED_MODULE = textwrap.dedent(
    '''
    import threading

    import torch

    # Two models whose forwards both wait here can only pass if they run at the same time.
    BARRIER = threading.Barrier(2)


    class Gated(torch.nn.Module):
        def __init__(self, gate_open=True, kind="linear"):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.kind = kind
            self.gate = threading.Event()
            if gate_open:
                self.gate.set()
            self.entered = threading.Event()
            self.log = []  # per forward: (thread name, input shape, first column)

        def forward(self, x):
            self.log.append((threading.current_thread().name, tuple(x.shape),
                             x.reshape(-1, x.shape[-1])[:, 0].tolist()))
            self.entered.set()
            if not self.gate.wait(10):
                raise RuntimeError("gate never opened")
            if bool(torch.isnan(x).any()):
                raise RuntimeError("NaN in input")
            if self.kind == "sum":
                return x.sum(dim=-1, keepdim=True)
            return self.lin(x)


    def build(gate_open=True, kind="linear"):
        return Gated(gate_open, kind)


    class Meeting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.threads = []

        def forward(self, x):
            self.threads.append(threading.current_thread().name)
            BARRIER.wait(timeout=5)
            return self.lin(x)


    def meeting():
        return Meeting()
    '''
)

X4 = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
Y2 = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]


async def add(engine, cfg):
    await engine.register(cfg)
    await engine.load(cfg["name"])
    return engine.instance(cfg["name"])


async def occupy(engine, inst, value: float = -1.0) -> asyncio.Task:
    """Send one request to a gated model whose gate is closed; return once its forward is blocked."""
    task = asyncio.ensure_future(engine.infer(inst.name, {"x": torch.full((1, 4), value)}))
    await until(inst._module.entered.is_set)
    assert inst.in_flight == 1 and inst.queue.size == 0
    return task


def tagged(i: int) -> torch.Tensor:
    """A (1, 4) input whose first column identifies the request in the model's log."""
    x = torch.randn(1, 4)
    x[0, 0] = float(i)
    return x


def reference(inst, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return inst._module(x)
