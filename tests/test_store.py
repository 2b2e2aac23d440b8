"""The SQLite store: restore after a restart, audit log, schema versioning, nothing half-written."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.store import SCHEMA_VERSION, Store, StoreError


def new_engine(path, root):
    return Engine(Store(path), model_roots=(str(root),), base_dir=str(root), default_device="cpu")


async def test_restore_after_restart(store_path, tmp_path, guarded_model):
    first = new_engine(store_path, tmp_path)
    await first.start()
    await first.register({"name": "tiny", "source": "zoo:tiny-mlp", "max_batch_size": 4, "priority": 1})
    await first.register({"name": "tiny", "source": "zoo:tiny-mlp", "version": 2, "args": {"hidden": 32}})
    await first.register(guarded_model)
    await first.load("tiny")
    await first.close()

    second = new_engine(store_path, tmp_path)
    await second.start()
    try:
        snap = {(m["name"], m["version"]): m for m in second.snapshot()["models"]}
        assert set(snap) == {("tiny", "1"), ("tiny", "2"), ("guarded", "1")}
        assert snap[("tiny", "1")]["active"] and not snap[("tiny", "2")]["active"]
        assert snap[("tiny", "1")]["config"]["max_batch_size"] == 4
        assert snap[("tiny", "2")]["config"]["args"] == {"hidden": 32}
        assert snap[("guarded", "1")]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        # the restored models really serve
        res = await second.infer("tiny", {"input": torch.ones(1, 64)}, version="2")
        assert res.outputs["logits"].shape == (1, 10)
        res = await second.infer("guarded", {"x": torch.ones(2, 4)})
        assert res.outputs["y"].shape == (2, 2)
        log = await second.audit_log()
        actions = [(row["action"], row["model"], row["version"], row["result"]) for row in reversed(log)]
        assert actions[:4] == [
            ("register", "tiny", "1", "ok"),
            ("register", "tiny", "2", "ok"),
            ("register", "guarded", "1", "ok"),
            ("load", "tiny", "1", "ok"),
        ]
    finally:
        await second.close()


async def test_config_models_are_baseline_not_copied(store_path, tmp_path):
    from modelconsole.scheduler.config import model_from_dict

    cfg = model_from_dict({"name": "cfgmodel", "source": "zoo:tiny-mlp"}, base_dir=str(tmp_path))
    eng = new_engine(store_path, tmp_path)
    await eng.start([cfg])
    assert eng.snapshot()["models"][0]["origin"] == "config"
    await eng.close()
    # restarted without that config: the model is gone, nothing stale in the store
    eng = new_engine(store_path, tmp_path)
    await eng.start()
    assert eng.snapshot()["models"] == []
    await eng.close()


async def test_stored_model_whose_source_vanished_is_reported_not_fatal(store_path, tmp_path, guarded_model):
    eng = new_engine(store_path, tmp_path)
    await eng.start()
    await eng.register(guarded_model)
    await eng.register({"name": "tiny", "source": "zoo:tiny-mlp"})
    await eng.close()
    (tmp_path / "guarded.pt").unlink()
    eng = new_engine(store_path, tmp_path)
    sub = eng.subscribe()
    await eng.start()
    try:
        assert [m["name"] for m in eng.snapshot()["models"]] == ["tiny"]
        events = []
        while not sub._queue.empty():
            events.append(sub._queue.get_nowait())
        failed = [e for e in events if e.kind == "restore_failed"]
        assert failed and "guarded" in failed[0].message and "no such file" in failed[0].message
        # the record is kept: put the file back and it returns
        assert len(await eng.store.models()) == 2
    finally:
        await eng.close()


async def test_schema_is_versioned_and_wal(store_path):
    async with Store(store_path) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        async with store.db.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone())[0] == "wal"
    # reopening an up-to-date file migrates nothing and keeps the data
    async with Store(store_path) as store:
        await store.audit("test", "noop")
    async with Store(store_path) as store:
        assert (await store.audit_log())[0]["action"] == "noop"


async def test_migrates_an_empty_old_file(tmp_path):
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()  # version 0: an empty database file
    async with Store(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        assert await store.models() == []


async def test_refuses_a_file_from_a_newer_version(tmp_path):
    path = tmp_path / "future.db"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    with pytest.raises(StoreError, match="newer than this modelconsole understands"):
        await Store(path).open()


async def test_failed_transaction_leaves_nothing_half_written(store_path):
    async with Store(store_path) as store:
        cfg = {"name": "m", "version": "1", "source": "zoo:tiny-mlp"}
        await store.save_model(cfg, "test", active_version="1")
        with pytest.raises(sqlite3.IntegrityError):
            await store.save_model(cfg, "test", active_version="1")  # duplicate primary key
        assert len(await store.models()) == 1
        # the audit row of the failed transaction was rolled back with it
        assert [r["action"] for r in await store.audit_log()] == ["register"]
        assert await store.routing() == {"m": "1"}
