"""Chunks: many requests for one model crossing into the engine as one entry (``Engine.submit_rows``).

A front end stacks the calls of one loop turn that share a model, version,
priority, timeout and outputs (``ipc.pack_calls``); the engine core queues
them as one entry and answers them in one.  Every promise a request has
holds for each request of a chunk: its own rows, the queue bound, deadlines,
priorities, the result cache, statistics, ``max_batch_size`` (a chunk is cut
at request boundaries), and the paths that serve requests one by one (a
routed name, a rate limit, a version not loaded) still get every request.

The engine tests use the gated models of ``test_request_path.py`` (a forward
that waits on a gate, so what stays queued is observable and exact); the
last tests run real front-end processes.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
import torch
from gatedutil import add, occupy, reference, tagged
from serverutil import ServerThread
from waiting import until

from modelconsole.scheduler import rows
from modelconsole.scheduler.config import ConfigError, parse_config
from modelconsole.scheduler.errors import DeadlineExceeded, EngineError, InputError, QueueFull
from modelconsole.server import ipc, transport
from modelconsole.server.ipc import InferAnswer, InferCall, InferChunk, Rows
from modelconsole.server.web import ServerSettings

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


class Answers:
    """What ``submit_rows`` answers, per request of the chunk, and the groups it answered them in."""

    def __init__(self, parts: list[int]):
        self.parts = parts
        self.by_place: dict[int, tuple[torch.Tensor | None, BaseException | None]] = {}
        self.groups: list[list[int]] = []
        self.all = asyncio.get_running_loop().create_future()

    def done(self, places: list[int], result, error) -> None:
        self.groups.append(places)
        at = 0
        for k in places:
            assert k not in self.by_place, f"request {k} answered twice"
            n = self.parts[k]
            self.by_place[k] = ((result.outputs["y"][at:at + n] if error is None else None), error)
            at += n
        if len(self.by_place) == len(self.parts) and not self.all.done():
            self.all.set_result(None)


def submit(engine, name: str, xs: list[torch.Tensor], **kw) -> Answers:
    answers = Answers([x.shape[0] for x in xs])
    assert engine.submit_rows(name, {"x": torch.cat(xs)}, answers.parts, answers.done, **kw)
    return answers


def tagged_rows(first: int, n: int) -> torch.Tensor:
    return torch.cat([tagged(first + k) for k in range(n)])


async def test_a_chunk_is_one_queue_entry_and_each_request_gets_its_own_rows(engine, gated):
    inst = await add(engine, gated("g", gate_open=False, max_batch_size=8))
    blocker = await occupy(engine, inst)
    xs = [tagged_rows(10, 1), tagged_rows(20, 2), tagged_rows(30, 1)]
    answers = submit(engine, "g", xs)
    assert inst.queue.size == 3 and inst.queue.samples == 4  # three requests, counted as three
    inst._module.gate.set()
    await asyncio.gather(answers.all, blocker)
    assert answers.groups == [[0, 1, 2]]  # answered as one
    shapes = [shape for _, shape, _ in inst._module.log]
    assert shapes == [(1, 4), (4, 4)]  # one forward for the whole chunk
    for k, x in enumerate(xs):
        out, err = answers.by_place[k]
        assert err is None and out.shape == (x.shape[0], 2)
        assert torch.allclose(out, reference(inst, x), atol=1e-5)
    stats = inst.stats.to_dict()
    assert stats["success"] == 4 and stats["inference_count"] == 5
    assert inst.stats._lat_n == 4  # a latency per request


async def test_a_chunk_over_max_batch_size_is_cut_at_request_boundaries(engine, gated):
    inst = await add(engine, gated("g", gate_open=False, max_batch_size=4))
    blocker = await occupy(engine, inst)
    xs = [tagged_rows(10, 3), tagged_rows(20, 2), tagged_rows(30, 3), tagged_rows(40, 1)]
    answers = submit(engine, "g", xs)
    inst._module.gate.set()
    await asyncio.gather(answers.all, blocker)
    batches = [cols for _, _, cols in inst._module.log[1:]]
    for k, x in enumerate(xs):
        out, err = answers.by_place[k]
        assert err is None and torch.allclose(out, reference(inst, x), atol=1e-5)
    assert all(len(b) <= 4 for b in batches), batches
    firsts = sorted(round(c) // 10 * 10 for b in batches for c in b)
    assert firsts == [10, 10, 10, 20, 20, 30, 30, 30, 40]
    for b in batches:  # no request's rows spread over two batches
        assert all(round(c) // 10 * 10 != round(other) // 10 * 10 for c in b
                   for other in sum((o for o in batches if o is not b), []))


async def test_a_chunk_past_its_deadline_is_answered_504_and_not_computed(engine, gated):
    inst = await add(engine, gated("g", gate_open=False, max_batch_size=8))
    blocker = await occupy(engine, inst)
    answers = submit(engine, "g", [tagged_rows(10, 1), tagged_rows(20, 2)], timeout_ms=20)
    await answers.all  # the sweep answers them while the forward still blocks
    assert all(isinstance(err, DeadlineExceeded) for _, err in answers.by_place.values())
    inst._module.gate.set()
    await blocker
    assert [cols for _, _, cols in inst._module.log] == [[-1.0]]  # only the blocker ran
    assert inst.stats.failures["deadline"] == 2


async def test_the_queue_bound_counts_each_request_of_a_chunk(engine, gated):
    inst = await add(engine, gated("g", gate_open=False, max_batch_size=8, max_queue_size=3))
    blocker = await occupy(engine, inst)
    xs = [tagged_rows(10 * (k + 1), 1) for k in range(5)]
    answers = submit(engine, "g", xs)
    await until(lambda: 3 in answers.by_place)  # refused at once, on the next loop turn
    assert isinstance(answers.by_place[3][1], QueueFull) and isinstance(answers.by_place[4][1], QueueFull)
    assert inst.queue.size == 3 and inst.stats.failures["queue_full"] == 2
    inst._module.gate.set()
    await asyncio.gather(answers.all, blocker)
    for k in range(3):
        out, err = answers.by_place[k]
        assert err is None and torch.allclose(out, reference(inst, xs[k]), atol=1e-5)


async def test_a_more_urgent_chunk_goes_before_less_urgent_requests(engine, gated):
    inst = await add(engine, gated("g", gate_open=False, max_batch_size=2, priority_levels=2, priority=2))
    blocker = await occupy(engine, inst)
    later = asyncio.ensure_future(engine.infer("g", {"x": tagged(50)}))
    await until(lambda: inst.queue.size == 1)
    answers = submit(engine, "g", [tagged_rows(10, 1), tagged_rows(20, 1)], priority=1)
    inst._module.gate.set()
    await asyncio.gather(answers.all, blocker, later)
    order = [round(c) for _, _, cols in inst._module.log[1:] for c in cols]
    assert order == [10, 20, 50]


async def test_cache_hits_in_a_chunk_are_answered_at_once_and_misses_form_the_chunk(engine, gated):
    inst = await add(engine, gated("g", max_batch_size=8, cache=True))
    a, b, c, d = (tagged_rows(10 * k, 1) for k in range(1, 5))
    first = submit(engine, "g", [a, b])
    await first.all
    inst._module.log.clear()
    inst._module.gate.clear()
    inst._module.entered.clear()
    blocker = await occupy(engine, inst)
    second = submit(engine, "g", [a, c, b, d])
    await until(lambda: len(second.by_place) == 2)  # the hits, before any forward
    assert sorted(second.by_place) == [0, 2]
    assert torch.equal(second.by_place[0][0], first.by_place[0][0])  # the stored bytes, exactly
    assert torch.equal(second.by_place[2][0], first.by_place[1][0])
    inst._module.gate.set()
    await asyncio.gather(second.all, blocker)
    assert [round(c) for _, _, cols in inst._module.log[1:] for c in cols] == [30, 40]  # only the misses ran (c, d)
    stats = inst.stats.to_dict()
    assert stats["cache_hits"] == 2 and stats["success"] == 7


async def test_a_chunk_with_bad_input_is_refused_whole_and_counted_per_request(engine, gated):
    inst = await add(engine, gated("g", max_batch_size=8))
    with pytest.raises(InputError, match="x"):
        engine.submit_rows("g", {"x": torch.zeros(3, 5)}, [1, 2], lambda *a: None)
    with pytest.raises(InputError, match="rows"):  # the rows do not add up to the requests'
        engine.submit_rows("g", {"x": torch.zeros(3, 4)}, [1, 1], lambda *a: None)
    assert inst.stats.failures["invalid_input"] == 4


async def test_what_must_be_served_one_by_one_is_handed_back(engine, gated):
    await add(engine, gated("big", max_batch_size=2))
    await add(engine, gated("limited", max_batch_size=8, rate_limit={"rps": 100, "burst": 10}))
    await engine.register(gated("lazy", max_batch_size=8))
    x = {"x": torch.zeros(3, 4)}
    assert not engine.submit_rows("big", x, [3], lambda *a: None)  # a request over max_batch_size: its own 400
    assert not engine.submit_rows("limited", x, [1, 2], lambda *a: None)
    assert not engine.submit_rows("lazy", x, [1, 2], lambda *a: None)  # not loaded yet
    assert engine.instance("lazy").queue.size == 0


def test_rows_cuts_at_request_boundaries():
    assert rows.pieces([3, 2, 3, 1], 4) == [(0, 1), (1, 2), (2, 4)]
    assert rows.pieces([1, 1, 1], 8) == [(0, 3)]
    assert rows.pieces([4, 4], 4) == [(0, 1), (1, 2)]
    assert rows.runs([0, 1, 3, 5, 6]) == [(0, 2), (3, 4), (5, 7)]
    assert rows.offsets([2, 1, 3]) == [0, 2, 3, 6]
    views = rows.part_views({"x": np.arange(6)}, [2, 1, 3])
    assert [v["x"].tolist() for v in views] == [[0, 1], [2], [3, 4, 5]]


# ---------------------------------------------------------------- the message format


def _call(model: str, x: np.ndarray, **kw) -> InferCall:
    return InferCall(model, None, {"input": x}, **kw)


def test_calls_that_agree_travel_as_one_chunk_and_the_answer_is_cut_back():
    xs = [np.full((n, 4), k, np.float32) for k, n in enumerate([1, 2, 1])]
    calls = [(7, _call("m", xs[0], routing_key="u1")), (8, _call("m", xs[1])), (9, _call("m", xs[2])),
             (10, _call("m", xs[0], priority=2)),  # another priority: alone
             (11, _call("other", xs[0])),  # another model: alone
             (12, _call("m", xs[0].astype(np.float64)))]  # another datatype: alone
    got = ipc.unpack_calls(ipc.pack_calls(calls))
    chunks = [(k, c) for k, c in got if isinstance(c, InferChunk)]
    assert len(chunks) == 1 and sorted(k for k, c in got if isinstance(k, int)) == [10, 11, 12]
    key, chunk = chunks[0]
    assert key == Rows([7, 8, 9], [1, 2, 1]) and chunk.keys == ["u1", None, None]
    assert np.array_equal(chunk.inputs["input"], np.concatenate(xs))
    singles = {k: c for k, c in got if isinstance(k, int)}
    for one, whole in zip(chunk.calls(), [c for _, c in calls[:3]]):  # the same digest as alone
        assert np.array_equal(one.inputs["input"], whole.inputs["input"])
    alone = ipc.unpack_calls(ipc.pack_calls([(1, calls[0][1])]))[0][1]
    assert chunk.digests[0] == alone.digest and singles[10].digest == alone.digest
    answer = InferAnswer("m", "1", {"y": np.arange(8, dtype=np.float32).reshape(4, 2)})
    back = dict(ipc.unpack_answers(ipc.pack_answers([(key, answer)])))
    assert [back[i].outputs["y"].tolist() for i in (7, 8, 9)] == [[[0, 1]], [[2, 3], [4, 5]], [[6, 7]]]
    errors = dict(ipc.unpack_answers(ipc.pack_answers([(key, QueueFull("full", retry_after=1.0))])))
    assert all(isinstance(errors[i], QueueFull) and errors[i].retry_after == 1.0 for i in (7, 8, 9))


def test_an_answer_without_a_row_per_input_row_fails_each_call():
    key = Rows([1, 2], [1, 1])
    back = dict(ipc.unpack_answers(ipc.pack_answers([(key, InferAnswer("m", "1", {"y": np.zeros((3, 2))}))])))
    assert all(b.status == 500 and "one row per input row" in b.message for b in back.values())


@pytest.mark.parametrize("change, expect", [
    ({"i": [1, "x"]}, "'i'"), ({"n": [1]}, "'n'"), ({"n": [1, 0]}, "'n'"), ({"n": "12"}, "'n'"),
])
def test_a_malformed_chunk_entry_is_a_protocol_error(change, expect):
    frames = ipc.pack_calls([(1, _call("m", np.zeros((1, 4), np.float32))),
                             (2, _call("m", np.zeros((1, 4), np.float32)))])
    import orjson
    head = orjson.loads(bytes(frames[0]))
    head[0].update(change)
    with pytest.raises(ipc.ProtocolError, match=expect):
        ipc.unpack_calls([orjson.dumps(head), *frames[1:]])


@pytest.mark.parametrize("change, expect", [
    ({"n": [1, 2]}, "rows"), ({"k": ["a"]}, "'k'"), ({"d": ["00"]}, "'d'"), ({"m": 3}, "'m'"),
    ({"x": [["input", "FP32", [2, 5]]]}, "input"),
])
def test_a_chunk_whose_fields_are_wrong_is_answered_and_the_rest_of_the_message_served(change, expect):
    frames = ipc.pack_calls([(1, _call("m", np.zeros((1, 4), np.float32))),
                             (2, _call("m", np.zeros((1, 4), np.float32))),
                             (3, _call("n", np.zeros((1, 4), np.float32)))])
    import orjson
    head = orjson.loads(bytes(frames[0]))
    chunk_at = next(k for k, e in enumerate(head) if isinstance(e["i"], list))
    head[chunk_at].update(change)
    got = ipc.unpack_calls([orjson.dumps(head), *frames[1:]])
    errors = [c for k, c in got if isinstance(k, Rows)]
    assert len(errors) == 1 and expect in str(errors[0])
    assert [k for k, c in got if isinstance(c, InferCall)] == [3]  # the other call still parses


# ---------------------------------------------------------------- through front-end processes

MODELS = [
    {"name": "tiny", "source": "zoo:tiny-mlp", "max_batch_size": 16},
    {"name": "cached", "source": "zoo:tiny-mlp", "cache": True, "max_batch_size": 16},
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    settings = ServerSettings(port=0)
    with ServerThread(tmp_path_factory.mktemp("one"), MODELS, settings=settings) as one, \
            ServerThread(tmp_path_factory.mktemp("two"), MODELS, settings=settings, workers=2) as two:
        yield one, two


async def _infer(session: aiohttp.ClientSession, url: str, model: str, x: np.ndarray) -> list:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    async with session.post(f"{url}/v2/models/{model}/infer", json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["outputs"][0]["data"]


async def test_front_ends_send_chunks_and_every_request_gets_its_own_answer(pair):
    one, two = pair
    core = two.server.core
    rng = np.random.default_rng(0)
    async with aiohttp.ClientSession() as session:
        for _wave in range(50):  # until a front end has stacked calls (the first wave nearly always)
            chunks, calls = core.chunks, core.calls
            xs = [rng.standard_normal((1 + k % 3, 64)).astype(np.float32) for k in range(96)]
            models = ["tiny" if k % 2 else "cached" for k in range(96)]
            got = await asyncio.gather(*(_infer(session, two.url, m, x) for m, x in zip(models, xs)))
            want = await asyncio.gather(*(_infer(session, one.url, m, x) for m, x in zip(models, xs)))
            for g, w, x in zip(got, want, xs):
                assert len(g) == x.shape[0] * 10
                assert np.allclose(g, w, atol=1e-5)  # another batch mix: a tolerance, not bits
            assert core.calls - calls == 96
            if core.chunks > chunks:
                break
        else:
            pytest.fail("no chunk reached the engine core in 50 waves of 96 concurrent requests")
        # the cache answers a repeated request exactly as it first answered, chunk or not
        cached = [k for k, m in enumerate(models) if m == "cached"][:8]
        again = await asyncio.gather(*(_infer(session, two.url, "cached", xs[k]) for k in cached))
        assert again == [got[k] for k in cached]
    stats = two.engine.instance("tiny").stats.to_dict()
    assert stats["success"] >= 48 and stats["fail"] == 0


# ---------------------------------------------------------------- low load: spin instead of sleeping


async def test_keep_awake_keeps_the_loop_turning_and_stops_after_its_budget():
    loop = asyncio.get_running_loop()
    awake = transport.KeepAwake(0.02)
    awake.extend()
    assert awake.active
    ran = loop.create_future()
    loop.call_soon(ran.set_result, True)  # nothing waits behind it: other callbacks run as usual
    assert await ran
    await until(lambda: not awake.active)  # it ends by itself once its budget is spent
    idle = transport.KeepAwake(0.0)
    idle.extend()
    assert not idle.active  # a budget of 0 never spins


@pytest.mark.parametrize("value", [-1, 10_001, "fast", True])
def test_ipc_spin_us_is_checked(value):
    with pytest.raises(ConfigError, match=r"server\.ipc_spin_us: expected microseconds from 0"):
        parse_config({"server": {"ipc_spin_us": value}}, ".")
    assert parse_config({"server": {"ipc_spin_us": 250}}, ".").server.ipc_spin_us == 250.0


async def test_frames_arrive_aligned_and_writable_so_the_core_copies_no_input(tmp_path):
    got: asyncio.Queue = asyncio.Queue()
    server = transport.UnixServerEnd(str(tmp_path / "s.sock"), lambda peer, frames: got.put_nowait(frames))
    await server.start()
    client = transport.UnixClientEnd(str(tmp_path / "s.sock"), lambda frames: None, lambda: None)
    await client.start()
    try:
        sent = [b"{}", b"\x01" * 3, np.arange(5, dtype=np.float32).tobytes(), b"", b"\x02" * 70]
        client.send(sent)
        frames = await got.get()
        assert [bytes(f) for f in frames] == sent
        for f in frames[1:]:
            arr = np.frombuffer(f, np.uint8)
            assert arr.flags.writeable
            if len(f):
                assert arr.ctypes.data % transport.FRAME_ALIGNMENT == 0
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize("value", [99, 100_001, "x", False])
def test_gil_switch_us_is_checked(value):
    with pytest.raises(ConfigError, match=r"server\.gil_switch_us: expected microseconds from 100 to 100000"):
        parse_config({"server": {"gil_switch_us": value}}, ".")
    assert parse_config({"server": {"gil_switch_us": 500}}, ".").server.gil_switch_us == 500.0
    assert parse_config({}, ".").server.gil_switch_us is None


# ---------------------------------------------------------------- fuzz: what the core parses

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) |
                     st.text(max_size=6), lambda inner: st.lists(inner, max_size=4) |
                     st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)
_fields = st.sampled_from(["i", "n", "m", "v", "p", "t", "o", "k", "x", "d", "c", "r"])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(_fields, _json, max_size=4), extra_frames=st.integers(-2, 2))
def test_a_mangled_chunk_never_breaks_the_parser(changes, extra_frames):
    """Whatever a message says, the core gets calls, chunks, per-entry errors or one ProtocolError."""
    import orjson

    frames = ipc.pack_calls([(1, _call("m", np.zeros((1, 4), np.float32))),
                             (2, _call("m", np.ones((2, 4), np.float32))),
                             (3, _call("n", np.zeros((1, 4), np.float32)))])
    head = orjson.loads(bytes(frames[0]))
    chunk_at = next(k for k, e in enumerate(head) if isinstance(e["i"], list))
    head[chunk_at].update(changes)
    body = list(frames[1:])
    if extra_frames > 0:
        body += [b"\0" * 8] * extra_frames
    elif extra_frames < 0:
        body = body[:extra_frames]
    try:
        got = ipc.unpack_calls([orjson.dumps(head), *body])
    except ipc.ProtocolError:
        return
    for key, entry in got:
        assert isinstance(entry, (InferCall, InferChunk, EngineError))
        if isinstance(entry, InferChunk):
            assert type(key) is Rows and sum(entry.parts) == next(iter(entry.inputs.values())).shape[0]
            assert len(entry.calls()) == len(entry.ids)


def test_staying_awake_is_chosen_only_with_cores_to_spare():
    from modelconsole.scheduler.policy import ipc_spin_us

    assert ipc_spin_us(16, 8) == 400.0  # the GPU host: 8 front ends, cores to spare
    assert ipc_spin_us(11, 8) == 400.0  # bench/http.py's server share of that host
    assert ipc_spin_us(2, 1) == 0.0  # the 2-core machine: polling would take CPU from the work
    assert ipc_spin_us(4, 2) == 0.0
    assert parse_config({}, ".").server.ipc_spin_us is None  # unset: chosen by the policy
