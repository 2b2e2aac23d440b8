"""The console's one view of an engine, with two implementations.

The console shows what ``snapshot()`` returns and changes things through the
control calls; it does not know whether the engine is in this process
(``LocalClient`` in ``console/local.py``, ``modelconsole`` with no
``--attach``) or behind a server (``RemoteClient`` here, ``modelconsole
--attach URL``).  Both give the same dicts:
the snapshot has the shape of ``GET /api/snapshot``, a control call answers
the version's snapshot as the server does, and a refusal is a ``ClientError``
carrying the server's status and message, whichever side refused.

This module must not import torch, the engine or the server: attach mode runs
on machines (and in processes) that have no business loading torch.  The
import-linter contracts in pyproject.toml hold it (and the UI modules) to that.
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

ACTOR = "console"  # the audit log's actor for everything the console changes
EVENT_QUEUE = 1000  # events buffered for the app; the oldest go first when it falls behind


class ClientError(Exception):
    """A control call refused or failed: ``message`` is what the operator should read.

    ``status`` is the HTTP status the server answered (the same status the
    engine's error kind carries in-process), or None when there was no answer
    (the server cannot be reached, or the console is read-only).
    """

    def __init__(self, status: int | None, message: str):
        super().__init__(message if status is None else f"{status}: {message}")
        self.status = status
        self.message = message


def _event(kind: str, message: str, level: str = "info", **data: Any) -> dict[str, Any]:
    """A console-made event, shaped like an engine event so the UI's log shows it the same way."""
    return {"kind": kind, "message": message, "model": None, "version": None, "level": level,
            "data": data, "ts": time.time(), "seq": None}


class EngineClient(abc.ABC):
    """What the console needs from an engine.  ``events()`` has one consumer (the app)."""

    url: str | None = None  # where it is attached; None: in-process
    connected: bool = False  # False while the server is unreachable
    read_only: bool = False

    def __init__(self, read_only: bool = False):
        self.read_only = read_only
        # Bounded so a UI that stops reading cannot grow memory without limit; when
        # full the oldest event goes (the snapshot still tells the current truth).
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(EVENT_QUEUE)
        self.dropped = 0  # events lost because the app read too slowly

    def _emit(self, event: dict[str, Any] | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Engine events as dicts (kind, message, model, version, level, data, ts, seq), plus
        console-made ones (``seq`` None): ``connection`` when the link drops or comes back,
        ``dropped`` when events were lost.  Ends after ``close()``."""
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def _check_writable(self, action: str) -> None:
        if self.read_only:
            raise ClientError(None, f"the console is read-only: cannot {action}")

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and take the first snapshot; a ClientError if that is impossible."""

    async def close(self) -> None:
        """Stop; ``events()`` ends."""
        self._emit(None)

    @abc.abstractmethod
    def snapshot(self) -> dict[str, Any] | None:
        """The latest full snapshot (the shape of ``GET /api/snapshot``); no I/O."""

    @abc.abstractmethod
    async def load(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def unload(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def evict(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def pin(self, name: str, version: str | None = None, pinned: bool = True,
                  node: str | None = None) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def set_priority(self, name: str, version: str | None, priority: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def delete(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Remove a registered version (None: the model name and every version) for good."""

    @abc.abstractmethod
    async def register(self, name: str, source: str, version: str | None = None,
                       options: dict[str, Any] | None = None) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def audit(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]: ...

    # versions: hot swap, A/B split, canary.  A routing is the shape of ``GET
    # /api/models/{name}/routing``: name, active, weights, shadow, metric_output, swap,
    # canary, arms (per-version requests, errors, error_rate, p50_ms, p95_ms, mean_output).

    @abc.abstractmethod
    async def swap(self, name: str, version: str) -> dict[str, Any]:
        """Load and warm ``version`` beside the active one, switch, drain and unload the old;
        answers ``{"name", "from", "to", "seconds"}`` once it is done."""

    @abc.abstractmethod
    async def set_split(self, name: str, weights: dict[str, float], shadow: list[str] | None = None,
                        metric_output: str | None = None) -> dict[str, Any]:
        """Route requests without a version by ``weights`` (version -> weight); answers the routing."""

    @abc.abstractmethod
    async def start_canary(self, name: str, version: str, **params: Any) -> dict[str, Any]:
        """Start a canary of ``version`` (params: steps, interval_s, max_error_rate, max_p95_ratio,
        min_requests); answers the routing."""

    @abc.abstractmethod
    async def stop_canary(self, name: str) -> dict[str, Any]:
        """Abort the running canary (its share goes back to 0); answers the routing."""

    @abc.abstractmethod
    async def routing(self, name: str) -> dict[str, Any]:
        """The name's routing now (no change; allowed read-only)."""


# --------------------------------------------------------------------------- in-process


async def _sse(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str, str | None]]:
    """(event, data, id) for each server-sent event.  Parsed by hand from raw chunks: a
    snapshot is one line that can outgrow aiohttp's readline limit."""
    buf = b""
    kind, eid = "message", None
    data: list[str] = []
    async for chunk in content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if not line:  # a blank line ends an event
                if data:
                    yield kind, "\n".join(data), eid
                kind, eid, data = "message", None, []
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                eid = value


class RemoteClient(EngineClient):
    """A modelconsole server over HTTP (aiohttp only, no torch).

    A background task keeps ``GET /api/events`` open: its ``snapshot`` events
    refresh the picture, its ``event`` events go to ``events()``.  When the link
    drops, ``connected`` turns False, a ``connection`` event says so, the last
    picture stays (the UI greys it), and the task reconnects by itself with
    backoff (0.5 s doubling to 5 s).  It resumes with ``Last-Event-ID`` so no
    event is lost while the server's history still has it; a server that
    restarted in between is recognised (its ``started`` changed) and replays its
    history from the beginning, since its event numbers started again at 1.
    """

    BACKOFF = (0.5, 5.0)

    def __init__(self, url: str, token: str | None = None, *, read_only: bool = False,
                 call_timeout_s: float = 300.0, stall_timeout_s: float = 15.0):
        super().__init__(read_only)
        self.url: str = url.rstrip("/")  # attached: always a URL (the base class allows None)
        self.connected = False
        self._headers = {"X-Modelconsole-Actor": ACTOR}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        # Loads can take minutes; a server that accepts nothing is known within 5 s.
        self._call_timeout = aiohttp.ClientTimeout(total=call_timeout_s, sock_connect=5)
        # The server sends a snapshot every second: silence this long means a dead link.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=stall_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._snapshot: dict[str, Any] | None = None
        self._last_seq = 0
        self._stopping = False  # the server said (SSE "stopping") that it is shutting down

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        """The first snapshot, then the event stream in the background; a ClientError (401, or
        status None when unreachable) if the server cannot be read at all."""
        self._session = aiohttp.ClientSession(headers=self._headers)
        try:
            await self._refresh()
        except BaseException:
            await self._session.close()
            self._session = None
            raise
        self.connected = True
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.connected = False
        await super().close()

    def snapshot(self) -> dict[str, Any] | None:
        return self._snapshot

    # ------------------------------------------------------------ the stream

    async def _refresh(self) -> bool:
        """GET /api/snapshot; True when it came from a server other than the last one."""
        snap = await self._request("GET", "/api/snapshot")
        old = self._snapshot
        restarted = old is not None and _started(old) != _started(snap)
        if old is None or restarted:
            # Events after this picture are what events() owes the app: resume after the
            # newest event the picture carries (first connect), or from the start of the
            # new server's numbering (it restarted: every event it has is new to us).
            self._last_seq = max((e["seq"] for e in snap["events"]), default=0) if old is None else 0
        self._snapshot = snap
        return restarted

    async def _follow(self) -> None:
        delay = self.BACKOFF[0]
        while True:
            restarted = False
            try:
                if not self.connected:
                    restarted = await self._refresh()
                await self._stream(restarted)
                reason = "the server closed the event stream"
            except asyncio.CancelledError:
                raise
            except ClientError as e:
                reason = e.message if e.status is None else str(e)
            except Exception as e:  # noqa: BLE001 - whatever broke the link, keep trying
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if self.connected:
                self.connected = False
                if self._stopping:  # the server said so before it went: not a lost link
                    message = f"{self.url} is shutting down; the console waits for it to start again"
                else:
                    message = f"lost {self.url} ({reason}); reconnecting"
                self._emit(_event("connection", message, "warning", url=self.url, reason=reason,
                                  stopping=self._stopping))
                delay = self.BACKOFF[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.BACKOFF[1])

    async def _stream(self, restarted: bool) -> None:
        assert self._session is not None
        headers = {"Last-Event-ID": str(self._last_seq)}
        async with self._session.get(self.url + "/api/events", headers=headers,
                                     timeout=self._stream_timeout) as r:
            if r.status != 200:
                raise ClientError(r.status, _error_message(await r.read(), r.reason))
            if not self.connected:
                self.connected = True
                note = " (the server restarted)" if restarted else ""
                if restarted or not self._stopping:  # a stopping server's last front end is no news
                    self._emit(_event("connection", f"reconnected to {self.url}{note}", url=self.url,
                                      restarted=restarted))
                self._stopping = False
            async for kind, data, eid in _sse(r.content):
                if kind == "stopping":
                    self._stopping = True
                elif kind == "snapshot":
                    self._snapshot = json.loads(data)
                elif kind == "event":
                    event = json.loads(data)
                    self._last_seq = max(self._last_seq, int(eid) if eid else event.get("seq") or 0)
                    self._emit(event)
                elif kind == "dropped":
                    count = json.loads(data).get("count", 0)
                    self._emit(_event("dropped", f"the server dropped {count} events: the console read "
                                      "too slowly", "warning", count=count))

    # ------------------------------------------------------------ control calls

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                       params: dict[str, str] | None = None) -> Any:
        if self._session is None:
            raise ClientError(None, f"not connected to {self.url} (start() first)")
        try:
            if body is None and method not in ("GET", "HEAD"):
                body = {}  # control calls are JSON (the server refuses others: no cross-site form posts)
            async with self._session.request(method, self.url + path, json=body, params=params,
                                             timeout=self._call_timeout) as r:
                raw = await r.read()
                if r.status >= 400:
                    raise ClientError(r.status, _error_message(raw, r.reason))
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ClientError(r.status, f"{self.url}{path} did not answer JSON: "
                                                "is this a modelconsole server?") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            reason = str(e) or type(e).__name__
            raise ClientError(None, f"cannot reach {self.url}: {reason}") from e

    async def _control(self, action: str, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        self._check_writable(action)
        snap = await self._request(method, path, body)
        self._merge(snap)
        return snap

    def _merge(self, version: dict[str, Any]) -> None:
        """Show a control call's answer at once, not at the next periodic snapshot."""
        old = self._snapshot
        if old is None:
            return
        models = [dict(m, **version) if (m["name"], m["version"]) == (version.get("name"), version.get("version"))
                  else m for m in old["models"]]
        self._snapshot = dict(old, models=models)

    def _model(self, name: str, action: str, node: str | None = None) -> str:
        """The control URL; ``node``: on a fleet, act on that node only (``?node=``)."""
        where = f"?node={quote(node, safe='')}" if node else ""
        return f"/api/models/{quote(name, safe='')}/{action}{where}"

    async def load(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]:
        return await self._control("load", "POST", self._model(name, "load", node), _version(version))

    async def unload(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]:
        return await self._control("unload", "POST", self._model(name, "unload", node), _version(version))

    async def evict(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]:
        return await self._control("evict", "POST", self._model(name, "evict", node), _version(version))

    async def pin(self, name: str, version: str | None = None, pinned: bool = True,
                  node: str | None = None) -> dict[str, Any]:
        action = "pin" if pinned else "unpin"
        return await self._control(action, "POST", self._model(name, action, node), _version(version))

    async def delete(self, name: str, version: str | None = None) -> dict[str, Any]:
        path = f"/api/models/{quote(name, safe='')}" + (f"/versions/{quote(version, safe='')}" if version else "")
        self._check_writable("delete")
        return await self._request("DELETE", path)

    async def set_priority(self, name: str, version: str | None, priority: int) -> dict[str, Any]:
        return await self._control("set priority", "PUT", self._model(name, "priority"),
                                   {"priority": priority, **(_version(version) or {})})

    async def register(self, name: str, source: str, version: str | None = None,
                       options: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "source": source, **(_version(version) or {})}
        if options:
            body["options"] = options
        return await self._control("register", "POST", "/api/models", body)

    async def audit(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        params = {"limit": str(limit), **({"model": model} if model is not None else {})}
        return (await self._request("GET", "/api/audit", params=params))["entries"]

    def _merge_routing(self, routing: dict[str, Any]) -> None:
        """Show a routing answer at once: the name's routing, and which version is active."""
        old = self._snapshot
        name = routing.get("name") if isinstance(routing, dict) else None
        if old is None or not name:
            return
        active = routing.get("active")
        models = old.get("models") or []
        if active is not None:
            models = [dict(m, active=str(m["version"]) == str(active)) if m.get("name") == name else m
                      for m in models]
        self._snapshot = dict(old, models=models, routing={**(old.get("routing") or {}), name: routing})

    async def _routing_control(self, action: str, method: str, path: str,
                               body: dict[str, Any] | None) -> dict[str, Any]:
        self._check_writable(action)
        routing = await self._request(method, path, body)
        self._merge_routing(routing)
        return routing

    async def swap(self, name: str, version: str) -> dict[str, Any]:
        self._check_writable("swap")
        result = await self._request("POST", self._model(name, "swap"), {"version": str(version)})
        try:  # the answer says what happened, not the routing now: read it
            self._merge_routing(await self.routing(name))
        except ClientError:
            pass  # the next snapshot tells
        return result

    async def set_split(self, name: str, weights: dict[str, float], shadow: list[str] | None = None,
                        metric_output: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"weights": {str(k): v for k, v in weights.items()}}
        if shadow:
            body["shadow"] = [str(v) for v in shadow]
        if metric_output:
            body["metric_output"] = metric_output
        return await self._routing_control("set a split", "PUT", self._model(name, "split"), body)

    async def start_canary(self, name: str, version: str, **params: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"version": str(version)}
        for key, value in params.items():
            if value is not None:
                body[key] = list(value) if key == "steps" else value
        return await self._routing_control("start a canary", "POST", self._model(name, "canary"), body)

    async def stop_canary(self, name: str) -> dict[str, Any]:
        return await self._routing_control("stop a canary", "DELETE", self._model(name, "canary"), None)

    async def routing(self, name: str) -> dict[str, Any]:
        return await self._request("GET", self._model(name, "routing"))


def _started(snap: dict[str, Any]) -> Any:
    return (snap.get("server") or {}).get("started")


def _version(version: str | int | None) -> dict[str, str] | None:
    return None if version is None else {"version": str(version)}


def _error_message(raw: bytes, fallback: str | None) -> str:
    """The server's ``{"error": ...}``, else whatever it said."""
    try:
        return json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip()[:200] or fallback or "no message"
