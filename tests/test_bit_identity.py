"""The same input in the same batch gives bit-identical outputs on every path.

A request may reach a model through one process or a front end, as JSON or binary V2 (with
its binary data at any offset of the body), over gRPC, from the result cache, or through the
client handle, over the wire or in process.  Every one of them must answer with the very same
bits: on some CPUs (AVX-512 among them) torch's kernels round differently when an input
buffer starts a few bytes off a cache line, so the engine places every input at a 64-byte
boundary before a batch forms (``tensors.to_tensor``).

The probe model reports where its input lay (``offset`` = the input's address modulo 64) beside
a real computation (two linear layers, large enough that rounding paths differ), so an input that
reached the kernel misaligned is seen directly, whatever this machine's vector unit.

"Same batch": the model's ``max_batch_size`` equals the request's batch, so however many
requests arrive together, each runs alone; every path is driven at once, many times over.
"""

from __future__ import annotations

import asyncio
import textwrap

import aiohttp
import numpy as np
import orjson
import pytest
import torch
import tritonclient.grpc.aio as grpc_aio
from safetensors.torch import save_file
from serverutil import ServerThread

from modelconsole.client import Model
from modelconsole.scheduler.tensors import ALIGNMENT, TensorSpec, to_tensor
from modelconsole.server.web import ServerSettings

BATCH = 4
WIDTH = 64

PROBE = textwrap.dedent(
    """
    import torch


    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 512)
            self.b = torch.nn.Linear(512, 16)

        def forward(self, x):
            offset = torch.full((x.shape[0], 1), x.data_ptr() % 64, dtype=torch.int64)
            return self.b(torch.tanh(self.a(x))), offset


    def build():
        return Probe()
    """
)


def probe_model(name: str, **kw) -> dict:
    return {
        "name": name, "source": "safetensors:probe.safetensors", "factory": "probemodel:build",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 16]},
                    {"name": "offset", "datatype": "INT64", "shape": [-1, 1]}],
        "max_batch_size": BATCH, "max_queue_delay_ms": 0, "device": "cpu", "warmup": 0, **kw,
    }


def write_probe(folder) -> None:
    (folder / "probemodel.py").write_text(PROBE)
    gen = torch.Generator().manual_seed(7)
    save_file({"a.weight": torch.randn(512, 64, generator=gen), "a.bias": torch.randn(512, generator=gen),
               "b.weight": torch.randn(16, 512, generator=gen) / 20, "b.bias": torch.randn(16, generator=gen)},
              str(folder / "probe.safetensors"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One process and two front ends, each with HTTP and gRPC, serving the probe."""
    models = [probe_model("probe"), probe_model("probe-cached", cache=True)]
    folders = [tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")]
    for f in folders:
        write_probe(f)
    settings = ServerSettings(port=0, token="bits")
    with ServerThread(folders[0], models, settings=settings, grpc_port=0) as one, \
            ServerThread(folders[1], models, settings=settings, workers=2, grpc_port=0) as two:
        yield one, two


X = np.random.default_rng(3).standard_normal((BATCH, WIDTH)).astype(np.float32)


def binary_body(x: np.ndarray, pad: int) -> tuple[bytes, int]:
    """A V2 binary request whose tensor bytes start ``pad`` bytes later than the bare header's end."""
    head = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}},
                                     {"name": "offset", "parameters": {"binary_data": True}}]})
    head += b" " * pad
    return head + x.tobytes(), len(head)


def split_binary(body: bytes, header_length: int) -> dict[str, np.ndarray]:
    head = orjson.loads(body[:header_length])
    out, pos = {}, header_length
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        dtype = {"FP32": "<f4", "INT64": "<i8"}[o["datatype"]]
        out[o["name"]] = np.frombuffer(body[pos:pos + size], dtype).reshape(o["shape"])
        pos += size
    return out


async def http_json(s: aiohttp.ClientSession, url: str, model: str) -> dict[str, np.ndarray]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [BATCH, WIDTH], "data": X.ravel().tolist()}]}
    async with s.post(f"{url}/v2/models/{model}/infer", json=body) as r:
        assert r.status == 200, await r.text()
        outs = (await r.json())["outputs"]
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o["name"]: np.array(o["data"], dtypes[o["datatype"]]).reshape(o["shape"]) for o in outs}


async def http_binary(s: aiohttp.ClientSession, url: str, model: str, pad: int) -> dict[str, np.ndarray]:
    body, head = binary_body(X, pad)
    async with s.post(f"{url}/v2/models/{model}/infer", data=body,
                      headers={"Inference-Header-Content-Length": str(head)}) as r:
        assert r.status == 200, await r.text()
        return split_binary(await r.read(), int(r.headers["Inference-Header-Content-Length"]))


async def grpc(client: grpc_aio.InferenceServerClient, model: str) -> dict[str, np.ndarray]:
    x = grpc_aio.InferInput("x", [BATCH, WIDTH], "FP32")
    x.set_data_from_numpy(X)
    r = await client.infer(model, [x])
    return {"y": r.as_numpy("y"), "offset": r.as_numpy("offset")}


async def in_process(srv: ServerThread, model: str) -> dict[str, np.ndarray]:
    async def call():
        # a view that starts 4 bytes into its buffer: the engine must not hand it on as it is
        buf = torch.zeros(BATCH * WIDTH + 1)
        view = buf[1:].view(BATCH, WIDTH)
        view.copy_(torch.from_numpy(X))
        result = await srv.engine.infer(model, {"x": view})
        return {k: v.numpy().copy() for k, v in result.outputs.items()}

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), srv.loop))


async def handle_local(srv: ServerThread, model: str) -> dict[str, np.ndarray]:
    async def call():
        return await Model(model).apredict({"x": X})

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), srv.loop))


async def every_path(one: ServerThread, two: ServerThread, rounds: int) -> list[tuple[str, dict]]:
    """Every path, ``rounds`` times each, all in flight together."""
    calls = []
    async with aiohttp.ClientSession() as s, \
            grpc_aio.InferenceServerClient(url=one.grpc_hostport) as g1, \
            grpc_aio.InferenceServerClient(url=two.grpc_hostport) as g2:
        for _ in range(rounds):
            for srv, g, where in ((one, g1, "one process"), (two, g2, "front ends")):
                for model in ("probe", "probe-cached"):
                    calls += [
                        (f"{where} {model} JSON", http_json(s, srv.url, model)),
                        *[(f"{where} {model} binary +{pad}", http_binary(s, srv.url, model, pad))
                          for pad in (0, 1, 4, 8)],
                        (f"{where} {model} gRPC", grpc(g, model)),
                        (f"{where} {model} client handle", Model(model, url=srv.url).apredict({"x": X})),
                    ]
                calls.append((f"{where} in process (misaligned view)", in_process(srv, "probe")))
                calls.append((f"{where} client handle in process", handle_local(srv, "probe")))
        answers = await asyncio.gather(*(c for _, c in calls))
    return [(name, a) for (name, _), a in zip(calls, answers)]


async def test_the_same_input_gives_the_same_bits_on_every_path(servers):
    one, two = servers
    hits_before = one.engine.instance("probe-cached").stats.cache_hits
    answers = await every_path(one, two, rounds=1)  # every cache miss computes (and fills the cache)
    answers += await every_path(one, two, rounds=3)  # now the cached model answers from the cache
    assert one.engine.instance("probe-cached").stats.cache_hits > hits_before  # the cache answered some
    reference = answers[0][1]["y"]
    assert reference.shape == (BATCH, 16) and reference.dtype == np.float32
    for name, got in answers:
        # every forward saw its input at a 64-byte boundary (a cache hit reports the first one's)
        assert got["offset"].tolist() == [[0]] * BATCH, name
        assert got["y"].tobytes() == reference.tobytes(), name  # bit-identity is the promise here


@pytest.mark.parametrize("offset", [0, 1, 4, 8, 12, 32])
def test_inputs_are_placed_at_a_64_byte_boundary(offset):
    """Wherever a decoder left the bytes (a read-only body, a writable frame, a torch view),
    the tensor the model gets starts at a 64-byte boundary and holds the same values."""
    spec = TensorSpec("x", "FP32", (-1, WIDTH))
    raw = bytes(offset) + X.tobytes()
    views = [
        np.frombuffer(raw, np.float32, offset=offset).reshape(X.shape) if offset % 4 == 0 else None,
        np.frombuffer(bytearray(raw), np.uint8, offset=offset).view(np.float32).reshape(X.shape)
        if offset % 4 == 0 else None,
        torch.zeros(BATCH * WIDTH + offset)[offset:].view(BATCH, WIDTH).copy_(torch.from_numpy(X)),
        X[:, :],
    ]
    for v in views:
        if v is None:
            continue
        t = to_tensor(spec, v, max_batch_size=BATCH)
        assert t.data_ptr() % ALIGNMENT == 0
        assert t.numpy().tobytes() == X.tobytes()
