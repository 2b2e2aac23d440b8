"""CUDA graphs of a model's forward at fixed batch sizes (``cuda_graphs = true``).

An eager forward of a transformer is hundreds of kernel launches, each a
trip through Python that needs the GIL — which the event loop also needs for
every request it answers.  On the H200 that contention made the default
encoder's forward 25% slower inside the engine than alone.  A captured graph
replays all of them in one call, so the forward no longer competes with the
loop.

Graphs are captured once per batch-size bucket (powers of two up to
max_batch_size, sharing one memory pool); a batch runs in the smallest bucket
that holds it, its tail rows left from earlier batches.  That is only correct
for models whose samples are independent of each other along dim 0 — true of
inference in eval mode for the usual architectures — and needs every
non-batch dimension fixed.  Worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .tensors import TensorSpec, torch_dtype


def buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class GraphRunner:
    def __init__(self, module: Callable[..., Any], inputs: Sequence[TensorSpec], as_outputs: Callable[[Any], list],
                 device: torch.device, max_batch: int, warmup: int = 2):
        for s in inputs:
            if s.datatype == "BYTES" or -1 in s.shape[1:]:
                raise ValueError(f"cuda_graphs needs fixed non-batch dimensions and numeric inputs; "
                                 f"input '{s.name}' is {s.datatype} {list(s.shape)}")
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], list[torch.Tensor]]] = {}
        self.host: dict[int, list[list[torch.Tensor]]] = {}
        self.flip: dict[int, int] = {}
        side = torch.cuda.Stream(device)
        for b in sorted(buckets(max_batch), reverse=True):  # largest first: the pool is sized once
            static_in = [torch.zeros((b,) + tuple(s.shape[1:]), dtype=torch_dtype(s.datatype), device=device)
                         for s in inputs]
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    module(*static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other model threads keep launching and synchronizing while this one
            # captures (the default, global, makes their CUDA calls fail during the capture)
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_out = as_outputs(module(*static_in))
            self.graphs[b] = (graph, static_in, static_out)
            # two pinned host copies of the outputs per bucket: one batch's results are read
            # while the next batch's are copied in
            self.host[b] = [[torch.empty(o.shape, dtype=o.dtype).pin_memory() for o in static_out]
                            for _ in range(2)]
            self.flip[b] = 0
        self.sizes = sorted(self.graphs)
        torch.cuda.synchronize(device)

    def launch(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.cuda.Event, list[torch.Tensor], int]:
        """Copy the batch in, replay the smallest graph that holds it, start copying its rows out.

        Returns without waiting for the device; collect() waits.
        """
        n = tensors[0].shape[0]
        size = next(b for b in self.sizes if b >= n)
        graph, static_in, static_out = self.graphs[size]
        for dst, src in zip(static_in, tensors):
            dst[:n].copy_(src, non_blocking=True)
        graph.replay()
        self.flip[size] ^= 1
        host = self.host[size][self.flip[size]]
        for h, o in zip(host, static_out):
            h[:n].copy_(o[:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return done, host, n

    @staticmethod
    def collect(handle: tuple[torch.cuda.Event, list[torch.Tensor], int]) -> list[torch.Tensor]:
        """Wait for a launched batch and return its outputs as CPU tensors of its own."""
        done, host, n = handle
        done.synchronize()
        return [h[:n].clone() for h in host]

    def run(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.collect(self.launch(tensors))
