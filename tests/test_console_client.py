"""console/client.py against real components: RemoteClient over HTTP to a real server
(ServerThread), LocalClient on a real in-process Engine, and the attach-mode promise that
importing the client loads neither torch nor the engine."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from serverutil import ServerThread
from waiting import until

from modelconsole.console.client import ClientError, RemoteClient
from modelconsole.console.local import LocalClient
from modelconsole.server.web import ServerSettings

MODELS = [
    {"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0},
    {"name": "other", "source": "zoo:tiny-mlp", "warmup": 0},
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with ServerThread(tmp_path_factory.mktemp("srv"), models=MODELS) as s:
        yield s


@pytest.fixture
async def remote(srv):
    client = RemoteClient(srv.url)
    await client.start()
    yield client
    await client.close()


async def collect(client, done, timeout: float = 10.0) -> list[dict]:
    """Events from client.events() until done(seen) is true."""
    seen: list[dict] = []

    async def run() -> None:
        async for ev in client.events():
            seen.append(ev)
            if done(seen):
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out; events so far: {[(e['kind'], e['message']) for e in seen]}") from None
    return seen


def kinds_seen(*kinds: str, model: str | None = None):
    return lambda seen: set(kinds) <= {e["kind"] for e in seen if model is None or e["model"] == model}


def model_in(snap: dict, name: str, version: str = "1") -> dict | None:
    return next((m for m in snap["models"] if (m["name"], m["version"]) == (name, version)), None)


# --------------------------------------------------------------------------- RemoteClient


async def test_remote_first_snapshot(remote, srv):
    assert remote.connected and remote.url == srv.url and not remote.read_only
    snap = remote.snapshot()
    assert {"models", "devices", "cache", "host_tier", "server", "events"} <= set(snap)
    assert {m["name"] for m in snap["models"]} >= {"tiny", "other"}


async def test_remote_control_round_trips(remote, srv):
    snap = await remote.register("ctl", "zoo:tiny-mlp", options={"args": {"hidden": 32}, "priority": 2,
                                                                  "warmup": 0})
    assert (snap["name"], snap["version"], snap["state"]) == ("ctl", "1", "UNLOADED")
    assert snap["config"]["priority"] == 2
    await until(lambda: model_in(remote.snapshot(), "ctl") is not None, what="ctl in the periodic snapshot")

    snap = await remote.load("ctl")
    assert snap["state"] == "READY"
    assert model_in(remote.snapshot(), "ctl")["state"] == "READY"  # shown at once, not a second later
    assert (await remote.pin("ctl", "1"))["pinned"] is True
    assert (await remote.set_priority("ctl", None, 1))["config"]["priority"] == 1
    assert (await remote.pin("ctl", pinned=False))["pinned"] is False
    assert (await remote.evict("ctl"))["state"] == "UNLOADED"
    assert (await remote.load("ctl", "1"))["state"] == "READY"
    assert (await remote.unload("ctl"))["state"] == "UNLOADED"
    assert model_in(remote.snapshot(), "ctl")["state"] == "UNLOADED"

    entries = await remote.audit(model="ctl")
    assert [e["action"] for e in entries][::-1] == ["register", "load", "pin", "priority", "unpin", "evict",
                                                    "load", "unload"]
    assert {e["actor"] for e in entries} == {"console"}
    assert len(await remote.audit(limit=2)) == 2


async def test_remote_errors_carry_the_servers_status_and_message(remote):
    with pytest.raises(ClientError) as e:
        await remote.load("nope")
    assert e.value.status == 404 and e.value.message == "unknown model 'nope'"
    with pytest.raises(ClientError) as e:
        await remote.load("tiny", "9")
    assert e.value.status == 404 and "no version '9'" in e.value.message
    with pytest.raises(ClientError) as e:
        await remote.set_priority("tiny", None, 99)
    assert e.value.status == 400 and e.value.message.startswith("priority: expected an integer from 1")
    with pytest.raises(ClientError) as e:
        await remote.register("tiny", "zoo:tiny-mlp", "1")
    assert e.value.status == 409 and "already registered" in e.value.message
    with pytest.raises(ClientError) as e:
        await remote.register("x", "zoo:tiny-mlp", options={"name": "y"})
    assert e.value.status == 400 and "options.name" in e.value.message
    with pytest.raises(ClientError) as e:
        await remote.evict("other")
    assert e.value.status == 409 and "not loaded" in e.value.message


async def test_remote_events_arrive(remote):
    task = asyncio.create_task(remote.load("other"))
    seen = await collect(remote, kinds_seen("loading", "loaded", model="other"))
    await task
    mine = [e for e in seen if e["model"] == "other"]
    kinds = [e["kind"] for e in mine]
    assert kinds.index("loading") < kinds.index("loaded")
    assert {"kind", "message", "model", "version", "level", "data", "ts", "seq"} <= set(mine[-1])
    assert all(isinstance(e["seq"], int) for e in mine)
    await remote.unload("other")
    await collect(remote, kinds_seen("unloaded", model="other"))


async def test_remote_read_only_refuses_changes_but_reads(srv):
    client = RemoteClient(srv.url, read_only=True)
    await client.start()
    try:
        with pytest.raises(ClientError) as e:
            await client.load("tiny")
        assert e.value.status is None and "read-only" in e.value.message
        assert isinstance(await client.audit(), list)
    finally:
        await client.close()


async def test_remote_unreachable_server(srv):
    client = RemoteClient("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ClientError) as e:
        await client.start()
    assert e.value.status is None and e.value.message.startswith("cannot reach http://127.0.0.1:9: ")
    assert not client.connected and client.snapshot() is None


async def test_remote_token(tmp_path):
    with ServerThread(tmp_path, models=MODELS[:1], settings=ServerSettings(port=0, token="t")) as s:
        for token, status in ((None, 401), ("wrong", 403)):
            client = RemoteClient(s.url, token=token)
            with pytest.raises(ClientError) as e:
                await client.start()
            assert e.value.status == status
        client = RemoteClient(s.url, token="t")
        await client.start()
        try:
            assert client.connected and model_in(client.snapshot(), "tiny") is not None
            task = asyncio.create_task(client.load("tiny"))
            await collect(client, kinds_seen("loaded", model="tiny"))  # the stream has the token too
            assert (await task)["state"] == "READY"
        finally:
            await client.close()


async def test_remote_survives_a_server_restart(tmp_path):
    """The server goes away: connected turns False, a connection event says so, the last picture
    stays.  A new server on the same port: the client is back by itself, with a fresh picture,
    and the new server's events arrive (its event numbers started again at 1)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = ServerThread(tmp_path / "a", models=MODELS)
    await asyncio.to_thread(first.__enter__)
    port = first.server.port
    client = RemoteClient(first.url)
    try:
        await client.start()
        for _ in range(3):  # push the old server's event numbers well past the new one's
            await client.load("tiny")
            await client.unload("tiny")
        await collect(client, lambda seen: sum(e["kind"] == "unloaded" for e in seen) == 3)
        before = client.snapshot()

        await asyncio.to_thread(first.__exit__, None, None, None)
        await until(lambda: not client.connected, "connected to turn False", 5)
        lost = await collect(client, lambda seen: seen[-1]["kind"] == "connection", 5)
        assert lost[-1]["level"] == "warning" and first.url in lost[-1]["message"]
        assert client.snapshot() is not None
        assert client.snapshot()["server"]["started"] == before["server"]["started"]  # the last picture
        with pytest.raises(ClientError) as e:
            await client.load("tiny")
        assert e.value.status is None and e.value.message.startswith(f"cannot reach {first.url}")

        second = ServerThread(tmp_path / "b", models=MODELS, settings=ServerSettings(port=port))
        await asyncio.to_thread(second.__enter__)
        try:
            await until(lambda: client.connected, "the client to reconnect", 10)
            back = await collect(client, lambda seen: seen[-1]["kind"] == "connection", 5)
            assert back[-1]["level"] == "info" and "restarted" in back[-1]["message"]
            assert client.snapshot()["server"]["started"] != before["server"]["started"]
            assert model_in(client.snapshot(), "tiny")["state"] == "UNLOADED"
            task = asyncio.create_task(client.load("tiny"))
            await collect(client, kinds_seen("loaded", model="tiny"))
            assert (await task)["state"] == "READY"
        finally:
            await client.close()
            await asyncio.to_thread(second.__exit__, None, None, None)
    finally:
        await client.close()
        if first.server is not None and first.server._runner is not None:
            await asyncio.to_thread(first.__exit__, None, None, None)


# --------------------------------------------------------------------------- LocalClient


@pytest.fixture
async def local(engine):
    await engine.register({"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0})
    client = LocalClient(engine)
    await client.start()
    yield client
    await client.close()


async def test_local_snapshot_and_round_trips(local):
    assert local.url is None and local.connected and not local.read_only
    snap = local.snapshot()
    assert {"models", "devices", "cache", "host_tier", "server", "events"} <= set(snap)
    assert model_in(snap, "tiny")["state"] == "UNLOADED" and snap["server"]["accepting"] is True

    assert (await local.register("ctl", "zoo:tiny-mlp", options={"warmup": 0, "priority": 2}))["state"] == "UNLOADED"
    assert model_in(local.snapshot(), "ctl") is not None
    assert (await local.load("ctl"))["state"] == "READY"
    assert model_in(local.snapshot(), "ctl")["state"] == "READY"
    assert (await local.pin("ctl", "1"))["pinned"] is True
    assert (await local.set_priority("ctl", None, 1))["config"]["priority"] == 1
    assert (await local.pin("ctl", pinned=False))["pinned"] is False
    assert (await local.evict("ctl"))["state"] == "UNLOADED"
    assert (await local.load("ctl"))["state"] == "READY"
    assert (await local.unload("ctl"))["state"] == "UNLOADED"
    entries = await local.audit(model="ctl")
    assert [e["action"] for e in entries][::-1] == ["register", "load", "pin", "priority", "unpin", "evict",
                                                    "load", "unload"]
    assert {e["actor"] for e in entries} == {"console"}


async def test_local_errors_are_client_errors_with_http_statuses(local):
    with pytest.raises(ClientError) as e:
        await local.load("nope")
    assert e.value.status == 404 and e.value.message == "unknown model 'nope'"
    with pytest.raises(ClientError) as e:
        await local.set_priority("tiny", None, 99)
    assert e.value.status == 400 and e.value.message.startswith("priority: expected an integer from 1")
    with pytest.raises(ClientError) as e:
        await local.evict("tiny")
    assert e.value.status == 409
    with pytest.raises(ClientError) as e:
        await local.register("x", "zoo:nope")
    assert e.value.status == 400 and "unknown zoo model" in e.value.message
    with pytest.raises(ClientError) as e:
        await local.register("bad name!", "zoo:tiny-mlp")
    assert e.value.status == 400


async def test_local_events_and_read_only(local, engine):
    task = asyncio.create_task(local.load("tiny"))
    seen = await collect(local, kinds_seen("loading", "loaded", model="tiny"))
    await task
    kinds = [e["kind"] for e in seen if e["model"] == "tiny"]
    assert kinds.index("loading") < kinds.index("loaded") and isinstance(seen[-1]["seq"], int)

    viewer = LocalClient(engine, lambda: {"embedded": True}, read_only=True)
    await viewer.start()
    with pytest.raises(ClientError) as e:
        await viewer.unload("tiny")
    assert "read-only" in e.value.message
    assert viewer.snapshot()["server"] == {"embedded": True}
    await viewer.close()
    assert [e async for e in viewer.events()] == []  # close() ends the iterator


# --------------------------------------------------------------------------- attach mode


def test_importing_the_client_loads_neither_torch_nor_the_engine():
    code = ("import modelconsole.console.client, sys; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'modelconsole.scheduler', "
            "'modelconsole.server'))]; assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
