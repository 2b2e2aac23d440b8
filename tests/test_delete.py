"""Removing what was registered (issue 15, item 7): ``Engine.delete`` and
``DELETE /api/models/{name}[/versions/{version}]`` — refused with 409 saying why while a version is
in use, audited either way, gone after a restart."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import Conflict, ModelNotFound
from modelconsole.scheduler.store import Store


def mlp(version: str) -> dict:
    return {"name": "m", "version": version, "source": "zoo:tiny-mlp", "warmup": 0, "device": "cpu"}


async def rows(engine: Engine, action: str) -> list[tuple[str, str]]:
    return [(e["result"], e.get("detail") or "") for e in await engine.audit_log(100, "m") if e["action"] == action]


async def test_a_version_and_then_the_model_are_deleted_for_good(engine, store_path, tmp_path):
    for v in ("1", "2", "3"):
        await engine.register(mlp(v))
    assert await engine.delete("m", "3") == {"name": "m", "deleted": ["3"]}
    assert [s["version"] for s in engine.snapshot_models("m")] == ["1", "2"]
    with pytest.raises(ModelNotFound, match=r"no version '3' \(versions: 1, 2\)"):
        await engine.infer("m", {}, version="3")
    assert await engine.delete("m") == {"name": "m", "deleted": ["1", "2"]}
    assert engine.snapshot_models("m") == []
    with pytest.raises(ModelNotFound, match="unknown model 'm'"):
        await engine.delete("m")
    assert [r for r, _ in await rows(engine, "delete")] == ["error", "ok", "ok"]  # newest first
    await engine.close()
    again = Engine(Store(store_path), model_roots=(str(tmp_path),), base_dir=str(tmp_path), default_device="cpu")
    await again.start()
    try:
        assert again.snapshot_models("m") == []  # gone after a restart
        await again.register(mlp("1"))  # and the name is free again
    finally:
        await again.close()


@pytest.mark.parametrize("setup, target, message", [
    ("loaded", "2", "model 'm' version 2: m:2 is READY; unload it first"),
    ("active", "1", "it is the active version; swap to another version first (2), or delete the model"),
    ("split", "2", "it takes 30 of the split's weight (change the split first)"),
    ("split", None, "it has a split"),
    ("loaded", None, "m:2 is READY; unload it first"),
])
async def test_a_version_in_use_is_refused_saying_why_and_nothing_changes(engine, setup, target, message):
    await engine.register(mlp("1"))
    await engine.register(mlp("2"))
    if setup == "loaded":
        await engine.load("m", "2")
    elif setup == "split":
        await engine.set_split("m", {"1": 70, "2": 30})
    before = engine.snapshot_models("m")
    with pytest.raises(Conflict, match=message.replace("(", r"\(").replace(")", r"\)")):
        await engine.delete("m", target)
    after = engine.snapshot_models("m")
    assert [(s["version"], s["state"], s["active"]) for s in after] == \
        [(s["version"], s["state"], s["active"]) for s in before]
    assert (await rows(engine, "delete"))[-1][0] == "error"


async def test_a_version_from_the_config_file_is_refused(tmp_path):
    from modelconsole.scheduler.config import parse_config

    cfg = parse_config({"models": [mlp("1")]}, str(tmp_path))
    eng = Engine.from_config(cfg, Store(tmp_path / "s.db"))
    await eng.start(cfg.models)
    try:
        with pytest.raises(Conflict, match="defined in the config file; remove it there"):
            await eng.delete("m")
    finally:
        await eng.close()


def test_delete_over_http(tmp_path):
    from serverutil import ServerThread

    from modelconsole.server.web import ServerSettings

    token = "t0k"
    with ServerThread(tmp_path, models=[], settings=ServerSettings(port=0, token=token)) as srv:
        def call(method: str, path: str, body: dict | None = None, auth: bool = True) -> tuple[int, dict]:
            req = urllib.request.Request(srv.server.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {token}"} if auth else {})})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        for v in ("1", "2"):
            assert call("POST", "/api/models", {"name": "m", "version": v, "source": "zoo:tiny-mlp"})[0] == 201
        assert call("DELETE", "/api/models/m/versions/2", auth=False)[0] == 401
        assert call("DELETE", "/api/models/m/versions/1") == (
            409, {"error": "model 'm' version 1: it is the active version; swap to another version first (2), "
                           "or delete the model"})
        assert call("DELETE", "/api/models/m/versions/x")[0] == 400
        assert call("DELETE", "/api/models/m/versions/9")[0] == 404
        assert call("DELETE", "/api/models/m/versions/2") == (200, {"name": "m", "deleted": ["2"]})
        assert call("DELETE", "/api/models/m") == (200, {"name": "m", "deleted": ["1"]})
        assert call("GET", "/api/models/m")[0] == 404
        entries = call("GET", "/api/audit?model=m")[1]["entries"]
        # the refusals (409, 404) and the two deletes: one row each; the 400 never reached the engine
        assert sorted(e["result"] for e in entries if e["action"] == "delete") == ["error", "error", "ok", "ok"]
