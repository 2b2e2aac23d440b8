"""``remote:URL`` — a registered model whose forward pass is a KServe V2 call to another server.

It is a model like any other to the engine: queued, batched (a batch is one
remote call), rate-limited, cached, split and canaried; it holds no device
memory (it runs on the ``cpu`` device, outside every GPU budget).  Its own
config carries where and how to call: ``model`` (the remote's name; default
this model's name), ``remote_version``, ``token`` or ``token_env`` (never
shown: not in snapshots, ``/v1/models``, the audit log or the console),
``timeout_s``.

Failures are the engine's error kinds, naming the remote: unreachable or a
5xx, 502 (``RemoteError``); no answer within ``timeout_s``, 504; other
tensors than registered, 502.  After ``CIRCUIT_FAILURES`` failures in a row
the circuit opens: requests fail at once with 503 and ``Retry-After`` for
``CIRCUIT_OPEN_S``, then one request goes through (half open) and closes it on
success.  Calls run on the model's worker thread (urllib: the engine layer
imports no HTTP stack), one batch at a time.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import wire
from .errors import DeadlineExceeded, ModelUnavailable, RemoteError
from .tensors import TensorSpec

CIRCUIT_FAILURES = 5
CIRCUIT_OPEN_S = 5.0
MAX_ANSWER_BYTES = 1 << 30


@dataclass
class Circuit:
    """Consecutive failures open it for ``open_s``; then one trial call may close it.  Pure state:
    the caller passes the time."""

    failures_to_open: int = CIRCUIT_FAILURES
    open_s: float = CIRCUIT_OPEN_S
    failures: int = 0
    opened_at: float | None = None
    _trial: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def admit(self, now: float) -> float | None:
        """None to go ahead; else the seconds until a trial call may go."""
        with self._lock:
            if self.opened_at is None:
                return None
            left = self.opened_at + self.open_s - now
            if left > 0 or self._trial:
                return max(left, 0.5)
            self._trial = True  # half open: this call is the trial
            return None

    def success(self) -> None:
        with self._lock:
            self.failures, self.opened_at, self._trial = 0, None, False

    def failure(self, now: float) -> None:
        with self._lock:
            self.failures += 1
            if self._trial or self.failures >= self.failures_to_open:
                self.opened_at, self._trial = now, False

    @property
    def state(self) -> str:
        return "closed" if self.opened_at is None else "open"


@dataclass(frozen=True)
class Target:
    url: str  # scheme://host:port, no trailing slash
    model: str
    version: str | None
    token: str | None
    timeout_s: float

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def path(self, suffix: str) -> str:
        return wire.model_url(self.url, self.model, self.version, suffix)


def call(target: Target, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP exchange; (status, body, headers) for any answer, OSError/TimeoutError without one."""
    h = dict(headers or {})
    if target.token:
        h["Authorization"] = f"Bearer {target.token}"
    req = urllib.request.Request(path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=target.timeout_s) as r:  # noqa: S310 - http(s) checked at config
            return r.status, r.read(MAX_ANSWER_BYTES), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(1 << 20), dict(e.headers or {})


def fetch_specs(target: Target, where: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The remote model's inputs and outputs from its V2 metadata (the server must be ready)."""
    import json

    try:
        ready, _, _ = call(target, "GET", f"{target.url}/v2/health/ready")
        if ready != 200:  # the server, not the model: a modelconsole loads its models on demand
            raise RemoteError(f"{where}: {target.host} is not ready (GET /v2/health/ready answered {ready})")
        status, body, headers = call(target, "GET", target.path(""))
    except (OSError, TimeoutError) as e:
        raise RemoteError(f"{where}: cannot reach {target.host}: {e}") from None
    if status != 200:
        raise RemoteError(f"{where}: {target.host} answered HTTP {status} for {target.model}: "
                          f"{wire.error_from_answer(status, body, headers).message}")
    try:
        meta = json.loads(body)
        ins = tuple(TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in meta["inputs"])
        outs = tuple(TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in meta["outputs"])
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteError(f"{where}: {target.host}'s metadata for {target.model} is not V2: {e}") from None
    return ins, outs


class RemoteModule(nn.Module):
    """The forward pass of a ``remote:`` model: the batch's tensors to the remote, its answer back,
    checked against the registered outputs (names, datatypes, shapes)."""

    def __init__(self, target: Target, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 where: str, circuit: Circuit | None = None) -> None:
        super().__init__()
        self.target = target
        self.input_specs = inputs
        self.output_specs = outputs
        self.where = where
        self.circuit = circuit or Circuit()
        self.last_call_ms: float | None = None  # the last call's round trip
        self.last_remote_ms: float | None = None  # of which the remote's engine, when it reports it
        self._conn: http.client.HTTPConnection | None = None  # kept alive: one batch at a time (worker)

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        """POST over the kept-alive connection (opened again once if the server closed it)."""
        t = self.target
        if t.token:
            headers = dict(headers, Authorization=f"Bearer {t.token}")
        parts = urllib.parse.urlsplit(path)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in (0, 1):
            if self._conn is None:
                split = urllib.parse.urlsplit(t.url)
                cls = http.client.HTTPSConnection if split.scheme == "https" else http.client.HTTPConnection
                self._conn = cls(split.hostname or "", split.port, timeout=t.timeout_s)
            conn = self._conn
            try:
                conn.request("POST", target, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read(MAX_ANSWER_BYTES)
                if r.will_close:
                    conn.close()
                    self._conn = None
                return r.status, data, dict(r.getheaders())
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest):
                conn.close()
                self._conn = None
                if attempt:
                    raise
            except OSError:
                conn.close()
                self._conn = None
                raise
        raise AssertionError("unreachable")

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = self.target
        wait = self.circuit.admit(time.monotonic())
        if wait is not None:
            raise ModelUnavailable(f"{self.where}: the remote {t.host} failed {self.circuit.failures} times in a "
                                   f"row; not calling it for {wait:.1f} s more", retry_after=wait)
        body, head = wire.encode_request({s.name: x.detach().cpu().numpy() for s, x in zip(self.input_specs, tensors)},
                                         [s.name for s in self.output_specs])
        started = time.perf_counter()
        try:
            status, answer, headers = self._post(t.path("/infer"), body,
                                                 {"Content-Type": wire.CONTENT_TYPE, wire.HEADER: str(head)})
        except TimeoutError:
            self.circuit.failure(time.monotonic())
            raise DeadlineExceeded(f"{self.where}: the remote {t.host} did not answer within {t.timeout_s:g} s") \
                from None
        except OSError as e:
            self.circuit.failure(time.monotonic())
            raise RemoteError(f"{self.where}: cannot reach the remote {t.host}: {e}") from None
        self.last_call_ms = (time.perf_counter() - started) * 1e3
        self.last_remote_ms = _float(headers.get(wire.ENGINE_MS_HEADER))  # a modelconsole says its share
        if status != 200:
            error = wire.error_from_answer(status, answer, headers)
            if status >= 500:
                self.circuit.failure(time.monotonic())
            else:
                self.circuit.success()  # it answered: the remote is up, the request was wrong for it
            raise RemoteError(f"{self.where}: the remote {t.host} answered {status} ({error.kind}): {error.message}")
        try:
            outs = wire.decode_response(answer, _int(headers.get(wire.HEADER)))
        except wire.WireError as e:
            self.circuit.failure(time.monotonic())
            raise RemoteError(f"{self.where}: the remote {t.host} answered something else than V2: {e}") from None
        self.circuit.success()
        result = []
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() else None
        for spec in self.output_specs:
            a = outs.get(spec.name)
            if a is None:
                raise RemoteError(f"{self.where}: the remote {t.host} answered {', '.join(outs) or 'no outputs'}, "
                                  f"not the registered output '{spec.name}'")
            if wire.NUMPY_TO_V2.get(a.dtype) != spec.datatype or not spec.accepts_shape(tuple(a.shape)) \
                    or (batch is not None and spec.shape and spec.shape[0] == -1 and a.shape[0] != batch):
                raise RemoteError(f"{self.where}: the remote {t.host} answered '{spec.name}' as "
                                  f"{wire.NUMPY_TO_V2.get(a.dtype, a.dtype)} {list(a.shape)}; registered "
                                  f"{spec.datatype} {list(spec.shape)}")
            result.append(torch.from_numpy(np.array(a)))
        return tuple(result)


def _float(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None
