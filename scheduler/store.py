"""The embedded SQLite store (aiosqlite, WAL): what the operator changed.

It holds the models registered at run time (their versions and options),
each model name's active version, pins and priorities, A/B splits and
canaries (``update_routing``), and an append-only audit log of every
control action.  The config file is the baseline and is not copied here; the
store layers the operator's changes over it and is restored at start.

Each change is one transaction, committed before the change is acknowledged:
a crash leaves either the old state or the new one, never half of it.  One
connection serves every caller, and SQLite transactions do not nest, so
transactions (and reads) take turns on one asyncio lock: two control calls at
once each get their own BEGIN ... COMMIT, and a failing call's ROLLBACK can
only undo its own statements.  The
schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` moves a
database from version i to i+1, so an older file upgrades in place.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiosqlite

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: models, routing, audit log
    """
    CREATE TABLE models (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        config TEXT NOT NULL,
        registered_at REAL NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE routing (
        name TEXT PRIMARY KEY,
        active_version TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        model TEXT,
        version TEXT,
        params TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX audit_model ON audit (model, ts);
    """,
    # 1 -> 2: pinned model versions
    """
    CREATE TABLE pins (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        pinned_at REAL NOT NULL,
        PRIMARY KEY (name, version)
    );
    """,
    # 2 -> 3: base priorities the operator set at run time (over the config's)
    """
    CREATE TABLE priorities (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        priority INTEGER NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (name, version)
    );
    """,
    # 3 -> 4: A/B splits (weights in the order given, shadow versions, the tracked output)
    # and canaries (their plan and progress as one JSON record per model name)
    """
    CREATE TABLE splits (
        name TEXT PRIMARY KEY,
        weights TEXT NOT NULL,
        shadow TEXT NOT NULL,
        metric_output TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE canaries (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 4 -> 5: a fleet's canaries, run by its controller (cluster/canary.py), apart from one
    # engine's own (which that engine resumes at start)
    """
    CREATE TABLE fleet_canaries (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    """The store under the user's data directory (XDG on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("modelconsole", appauthor=False)) / "modelconsole.db"


_UPSERT_ACTIVE = ("INSERT INTO routing (name, active_version, updated_at) VALUES (?,?,?) "
                  "ON CONFLICT(name) DO UPDATE SET active_version=excluded.active_version, "
                  "updated_at=excluded.updated_at")


class StoreError(RuntimeError):
    pass


KEEP: Any = object()  # update_routing: leave this part as it is


class Store:
    """One SQLite file; every public method is one committed transaction."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the one connection

    async def open(self) -> Store:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._migrate()
        except Exception as e:
            await self.close()
            raise StoreError(f"store {self.path}: {e}") from e
        return self

    async def close(self) -> None:
        """After the transaction under way (if any) has finished."""
        async with self._lock:
            if self._db is not None:
                await self._db.close()
                self._db = None

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def schema_version(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
            return int(row[0]) if row is not None else 0

    async def _migrate(self) -> None:
        current = await self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"schema version {current} is newer than this modelconsole understands ({SCHEMA_VERSION})"
            )
        for version in range(current, SCHEMA_VERSION):
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        await self.db.execute(statement)
                await self.db.execute(f"PRAGMA user_version = {version + 1}")
                await self.db.execute("COMMIT")
            except Exception:
                await self.db.execute("ROLLBACK")
                raise

    async def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        """Run statements in one transaction: all of them or none, never interleaved with another's."""
        async with self._lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    await db.execute(sql, params)
                await db.execute("COMMIT")
            except BaseException:
                # cancelled or failed: undo this transaction only (nobody else's is open)
                await asyncio.shield(db.execute("ROLLBACK"))
                raise

    async def _fetch(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A read, between transactions (never seeing another caller's uncommitted rows)."""
        async with self._lock:
            async with self.db.execute(sql, params) as cur:
                return [tuple(r) for r in await cur.fetchall()]

    @staticmethod
    def _audit_row(
        actor: str, action: str, model: str | None, version: str | None, params: dict, result: str, detail: str | None
    ) -> tuple[str, tuple]:
        return (
            "INSERT INTO audit (ts, actor, action, model, version, params, result, detail) VALUES (?,?,?,?,?,?,?,?)",
            (time.time(), actor, action, model, version, json.dumps(params, sort_keys=True), result, detail),
        )

    async def audit(
        self,
        actor: str,
        action: str,
        model: str | None = None,
        version: str | None = None,
        params: dict | None = None,
        result: str = "ok",
        detail: str | None = None,
    ) -> None:
        await self._tx([self._audit_row(actor, action, model, version, params or {}, result, detail)])

    async def save_model(
        self, config: dict[str, Any], actor: str, active_version: str | None = None
    ) -> None:
        """Register a model version (and maybe make it active), with its audit row, atomically."""
        now = time.time()
        statements = [
            (
                "INSERT INTO models (name, version, config, registered_at) VALUES (?,?,?,?)",
                (config["name"], config["version"], json.dumps(config, sort_keys=True), now),
            ),
            self._audit_row(actor, "register", config["name"], config["version"],
                            {k: ("***" if k == "token" else v) for k, v in config.items()}, "ok", None),
        ]
        if active_version is not None:
            statements.append(
                (
                    _UPSERT_ACTIVE,
                    (config["name"], active_version, now),
                )
            )
        await self._tx(statements)

    async def delete_model(self, name: str, version: str, actor: str, new_active: str | None = None) -> None:
        """A version gone for good: its row, pin, priority (and its name's routing row when it was
        the active one; ``new_active`` takes its place), with the audit row, in one transaction."""
        statements = [
            ("DELETE FROM models WHERE name=? AND version=?", (name, version)),
            ("DELETE FROM routing WHERE name=? AND active_version=?", (name, version)),
            ("DELETE FROM pins WHERE name=? AND version=?", (name, version)),
            ("DELETE FROM priorities WHERE name=? AND version=?", (name, version)),
            self._audit_row(actor, "delete", name, version, {}, "ok", None),
        ]
        if new_active is not None:
            statements.insert(2, (_UPSERT_ACTIVE, (name, new_active, time.time())))
        await self._tx(statements)

    async def delete_name(self, name: str, actor: str) -> None:
        """A model name and every version of it, with its split and canary records."""
        await self._tx([
            ("DELETE FROM models WHERE name=?", (name,)),
            ("DELETE FROM routing WHERE name=?", (name,)),
            ("DELETE FROM pins WHERE name=?", (name,)),
            ("DELETE FROM priorities WHERE name=?", (name,)),
            ("DELETE FROM splits WHERE name=?", (name,)),
            ("DELETE FROM canaries WHERE name=?", (name,)),
            ("DELETE FROM fleet_canaries WHERE name=?", (name,)),
            self._audit_row(actor, "delete", name, None, {}, "ok", None),
        ])

    async def set_pin(self, name: str, version: str, pinned: bool, actor: str) -> None:
        sql = ("INSERT OR REPLACE INTO pins (name, version, pinned_at) VALUES (?,?,?)", (name, version, time.time())) \
            if pinned else ("DELETE FROM pins WHERE name=? AND version=?", (name, version))
        await self._tx([sql, self._audit_row(actor, "pin" if pinned else "unpin", name, version, {}, "ok", None)])

    async def set_priority(self, name: str, version: str, priority: int, previous: int, actor: str) -> None:
        await self._tx([
            ("INSERT OR REPLACE INTO priorities (name, version, priority, updated_at) VALUES (?,?,?,?)",
             (name, version, priority, time.time())),
            self._audit_row(actor, "priority", name, version, {"priority": priority, "previous": previous}, "ok", None),
        ])

    async def priorities(self) -> dict[tuple[str, str], int]:
        return {(n, v): p for n, v, p in await self._fetch("SELECT name, version, priority FROM priorities")}

    async def pins(self) -> list[tuple[str, str]]:
        return [(n, v) for n, v in await self._fetch("SELECT name, version FROM pins ORDER BY pinned_at")]

    async def models(self) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT config FROM models ORDER BY registered_at, name, version")
        return [json.loads(row[0]) for row in rows]

    async def registered_times(self) -> dict[tuple[str, str], float]:
        """(name, version) -> when it was registered."""
        return {(n, v): t for n, v, t in await self._fetch("SELECT name, version, registered_at FROM models")}

    async def routing(self) -> dict[str, str]:
        return {name: version for name, version in await self._fetch("SELECT name, active_version FROM routing")}

    async def update_routing(
        self,
        name: str,
        actor: str,
        action: str,
        version: str | None = None,
        params: dict | None = None,
        *,
        active: str | None = None,
        split: dict[str, Any] | None = KEEP,
        canary: dict[str, Any] | None = KEEP,
        result: str = "ok",
        detail: str | None = None,
    ) -> None:
        """Change a model name's routing and write its audit row, in one transaction.

        active: the new active version (None: unchanged).  split: {"weights",
        "shadow", "metric_output"} to store, None to delete, KEEP to leave.
        canary: the canary record to store, None to delete, KEEP to leave.
        """
        now = time.time()
        statements: list[tuple[str, tuple]] = []
        if active is not None:
            statements.append((
                _UPSERT_ACTIVE,
                (name, active, now)))
        if split is None:
            statements.append(("DELETE FROM splits WHERE name=?", (name,)))
        elif split is not KEEP:
            statements.append((
                "INSERT OR REPLACE INTO splits (name, weights, shadow, metric_output, updated_at) VALUES (?,?,?,?,?)",
                (name, json.dumps(dict(split.get("weights") or {})), json.dumps(list(split.get("shadow") or [])),
                 split.get("metric_output"), now)))
        if canary is None:
            statements.append(("DELETE FROM canaries WHERE name=?", (name,)))
        elif canary is not KEEP:
            statements.append(("INSERT OR REPLACE INTO canaries (name, state, updated_at) VALUES (?,?,?)",
                               (name, json.dumps(canary, sort_keys=True), now)))
        statements.append(self._audit_row(actor, action, name, version, params or {}, result, detail))
        await self._tx(statements)

    async def splits(self) -> dict[str, dict[str, Any]]:
        """name -> {"weights": {version: weight} (in the order given), "shadow": [...], "metric_output"}."""
        rows = await self._fetch("SELECT name, weights, shadow, metric_output FROM splits")
        return {n: {"weights": json.loads(w), "shadow": json.loads(s), "metric_output": m} for n, w, s, m in rows}

    async def canaries(self) -> dict[str, dict[str, Any]]:
        return {n: json.loads(s) for n, s in await self._fetch("SELECT name, state FROM canaries")}

    async def save_fleet_canary(self, name: str, record: dict[str, Any], actor: str, action: str,
                                version: str | None, detail: str | None = None) -> None:
        """A fleet canary's record and its audit row, in one transaction."""
        await self._tx([
            ("INSERT OR REPLACE INTO fleet_canaries (name, state, updated_at) VALUES (?,?,?)",
             (name, json.dumps(record, sort_keys=True), time.time())),
            self._audit_row(actor, action, name, version, {"share": record.get("share"),
                                                           "state": record.get("state")}, "ok", detail),
        ])

    async def fleet_canaries(self) -> dict[str, dict[str, Any]]:
        return {n: json.loads(s) for n, s in await self._fetch("SELECT name, state FROM fleet_canaries")}

    async def audit_log(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, ts, actor, action, model, version, params, result, detail FROM audit"
        params: tuple = ()
        if model is not None:
            sql += " WHERE model=?"
            params = (model,)
        sql += " ORDER BY id DESC LIMIT ?"
        rows = await self._fetch(sql, params + (limit,))
        keys = ("id", "ts", "actor", "action", "model", "version", "params", "result", "detail")
        out = []
        for row in rows:
            item = dict(zip(keys, row))
            item["params"] = json.loads(item["params"])
            out.append(item)
        return out
