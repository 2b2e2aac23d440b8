"""``Model``: a handle on one served model, in the style of SuperDuperDB's ``RemoteModel``.

Code holds one object per model and calls ``predict``; where the model runs is
the handle's business:

- with ``url``: KServe V2 over HTTP with binary tensors to a modelconsole (or
  any V2 server). Nothing here imports torch on this path (numpy only), so a
  thin client process stays thin.
- without: the engine of this process: the newest running one (what
  ``Engine.from_config`` started), or one the handle starts itself, lazily, on
  a thread of its own, from ``config`` (a TOML path): ``inprocess.py``, the one
  client module that reaches the engine, and only then. Tensors cross by
  reference, nothing is copied to a server.

Errors are the engine's error kinds on both paths: the same class and the same
message (a modelconsole server names the kind in ``X-Modelconsole-Error-Kind``).
``to_ref()`` is a small JSON-able dict (name, version, where) that another
process turns back into a working handle with ``Model.from_ref``; a token is
never in it (pass ``token=`` again, or set ``MODELCONSOLE_TOKEN``).
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from modelconsole.scheduler import wire

from .inprocess import local_engine, local_infer

Arrays = dict[str, np.ndarray]


class Model:
    """One model version, local or remote; see the module docstring."""

    def __init__(self, name: str, version: str | None = None, url: str | None = None, token: str | None = None,
                 *, config: str | None = None, timeout_s: float = 60.0) -> None:
        if url is not None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"url: expected http(s)://HOST:PORT, got {url!r}")
        self.name = name
        self.version = None if version is None else str(version)
        self.url = url.rstrip("/") if url else None
        self.token = token if token is not None else os.environ.get("MODELCONSOLE_TOKEN")
        self.config = str(config) if config is not None else None
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        where = self.url or "this process"
        return f"Model({self.name!r}, version={self.version!r}, at {where})"

    # ------------------------------------------------------------------ references

    def to_ref(self) -> dict[str, Any]:
        """A small JSON-able reference (never the weights, never the token)."""
        ref: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.url is not None:
            ref["url"] = self.url
        elif self.config is not None:
            ref["config"] = os.path.abspath(self.config)
        return ref

    @classmethod
    def from_ref(cls, ref: Mapping[str, Any], token: str | None = None) -> Model:
        unknown = set(ref) - {"name", "version", "url", "config"}
        if unknown or not isinstance(ref.get("name"), str):
            raise ValueError(f"not a model reference: {dict(ref)!r} (expected name, version, and url or config)")
        return cls(ref["name"], ref.get("version"), ref.get("url"), token, config=ref.get("config"))

    # ------------------------------------------------------------------ predicting

    def predict(self, inputs: Mapping[str, Any] | str | Sequence[str]) -> Arrays:
        """The model's outputs for ``inputs`` (name -> array with the batch first), as numpy.

        A text model (an hf: folder with a tokenizer) takes a string, or a list of them: one row
        each, sent as the ``text`` input; its ``label`` output comes back as ``str``."""
        if not isinstance(inputs, Mapping):
            return _readable(self.predict(as_text(inputs)))
        if self.url is not None:
            return self._remote_sync(inputs)
        engine, loop = local_engine(self.config)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("predict() would wait on the event loop the engine runs on: "
                               "await model.apredict(...) there instead")
        call = local_infer(engine, self.name, self.version, inputs)
        return asyncio.run_coroutine_threadsafe(call, loop).result()

    async def apredict(self, inputs: Mapping[str, Any] | str | Sequence[str]) -> Arrays:
        if not isinstance(inputs, Mapping):
            return _readable(await self.apredict(as_text(inputs)))
        if self.url is not None:
            return await self._remote_async(inputs)
        engine, loop = local_engine(self.config)
        call = local_infer(engine, self.name, self.version, inputs)
        if asyncio.get_running_loop() is loop:
            return await call
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, loop))

    def predict_batches(self, items: Iterable[Mapping[str, Any]], batch_size: int) -> Iterator[Arrays]:
        """Each item's outputs, in order: up to ``batch_size`` items (each with its own batch
        dimension first) are concatenated into one call and the answer split back."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
        pending: list[dict[str, np.ndarray]] = []
        for item in items:
            pending.append({k: wire.as_array(v) for k, v in item.items()})
            if len(pending) == batch_size:
                yield from self._batch(pending)
                pending = []
        if pending:
            yield from self._batch(pending)

    def _batch(self, items: list[dict[str, np.ndarray]]) -> Iterator[Arrays]:
        names = list(items[0])
        if any(list(i) != names for i in items):
            raise ValueError("predict_batches: every item needs the same input names")
        sizes = [len(i[names[0]]) for i in items]
        out = self.predict({n: np.concatenate([i[n] for i in items]) for n in names})
        bounds = np.cumsum(sizes)[:-1]
        parts = {k: np.split(v, bounds) for k, v in out.items()}
        for j in range(len(items)):
            yield {k: parts[k][j] for k in out}

    # ------------------------------------------------------------------ over the wire

    def _infer_url(self) -> str:
        assert self.url is not None
        return wire.model_url(self.url, self.name, self.version, "/infer")

    def _headers(self, header_length: int) -> dict[str, str]:
        h = {"Content-Type": wire.CONTENT_TYPE, wire.HEADER: str(header_length)}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> Arrays:
        if status != 200:
            raise wire.error_from_answer(status, body, headers)
        length = headers.get(wire.HEADER)
        return wire.decode_response(body, int(length) if length else None)

    def _remote_sync(self, inputs: Mapping[str, Any]) -> Arrays:
        body, head = wire.encode_request(inputs)
        req = urllib.request.Request(self._infer_url(), data=body, method="POST", headers=self._headers(head))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:  # noqa: S310 - http(s) checked above
                return self._answer(r.status, r.read(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return self._answer(e.code, e.read(), dict(e.headers or {}))

    async def _remote_async(self, inputs: Mapping[str, Any]) -> Arrays:
        import aiohttp

        body, head = wire.encode_request(inputs)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(self._infer_url(), data=body, headers=self._headers(head)) as r:
            return self._answer(r.status, await r.read(), dict(r.headers))


def as_text(texts: str | Sequence[str]) -> dict[str, np.ndarray]:
    """One string, or a list of them, as a text model's ``text`` input (one row each)."""
    rows = [texts] if isinstance(texts, str) else list(texts)
    if not rows or not all(isinstance(t, str) for t in rows):
        raise ValueError("predict: expected a string, a non-empty list of strings, or a mapping of input names "
                         "to arrays")
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return {"text": array}


def _readable(outputs: Arrays) -> Arrays:
    """BYTES outputs (a classifier's ``label``) as ``str``."""
    return {k: np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object])(v)
            if v.dtype == object and v.size else v for k, v in outputs.items()}
