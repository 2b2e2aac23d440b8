"""The TOML configuration: parsed into frozen dataclasses, checked key by key.

Every error names the file, the key path and what was expected, e.g.
``models.toml: models[2].max_batch_size: expected a positive integer, got "abc"``,
because the operator reading it at 3 a.m. should not have to guess.  Unknown
keys are errors too: a typo that silently does nothing is worse than a refusal.

The same checks serve models registered at run time (``model_from_dict``),
so a control call gets exactly the messages a config file does.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .tensors import DATATYPES, TensorSpec, parse_shape
from .trust import DEFAULT_TOKEN_ENV_PREFIX, Trust

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SOURCE_KINDS = ("zoo", "torchscript", "export", "safetensors", "state_dict", "hf", "remote")
REMOTE_KEYS = ("model", "remote_version", "token", "token_env", "timeout_s")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("FP32", "FP16", "BF16")


# Each replica is a worker thread (and on a GPU a device's share): a bound a registration cannot pass.
MAX_REPLICAS = 64


class ConfigError(ValueError):
    """A configuration (file or control call) is wrong; the message says where and why."""


@dataclass(frozen=True)
class ModelConfig:
    """One model version: where it comes from and how it is served."""

    name: str
    source: str
    version: str = "1"
    factory: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    device: str = "auto"
    dtype: str | None = None
    warmup: int = 1
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024
    priority: int = 2
    priority_levels: int = 3
    timeout_ms: float = 30_000.0
    rate_limit: dict[str, float] | None = None  # {"rps": float, "burst": int}
    cache: bool = False
    keep_alive: float | None = None  # idle seconds before unloading (None: stay until evicted)
    pin: bool = False  # never evicted, never unloaded for being idle
    latency_target_ms: float = 100.0  # drives urgency on a shared device
    estimate_mib: float | None = None  # the footprint to reserve before the first load (else derived)
    cuda_graphs: bool = False  # on a GPU: replay captured graphs per batch-size bucket (graphs.py)
    replicas: int = 1  # instances of this version kept loaded, each on its own device (replicas.py)
    max_replicas: int | None = None  # scale up to this many under load (None: exactly ``replicas``)
    # remote:URL sources (remote.py): the remote's model name and version, its token (given, or
    # the environment variable holding it; never shown), the per-call timeout
    model: str | None = None
    remote_version: str | None = None
    token: str | None = field(default=None, repr=False)
    token_env: str | None = None
    timeout_s: float = 30.0
    # hf: folders with a tokenizer (textenc.py, hftext.py): text in, labels/embeddings out
    tokenizer: bool | None = None  # None: on when the folder has a tokenizer.json
    max_length: int | None = None  # tokens (None: the tokenizer's and the model's limit, at most 512)
    truncation: bool = False  # a longer text is cut to max_length (off: refused with a 400)
    buckets: tuple[int, ...] | None = None  # the padded lengths (None: powers of two up to max_length)
    pooling: str = "mean"  # an encoder's embedding: "mean" over real tokens, or "cls"
    normalize: bool = False  # an encoder's embedding scaled to unit length
    # Where relative source paths and factory modules are looked up, and the
    # directories a source path must stay inside.
    base_dir: str = "."
    model_roots: tuple[str, ...] = ()
    # The operator's trust settings (trust.py), copied from the config like model_roots:
    # roots marked trusted = true, and [security] factories.
    trusted_roots: tuple[str, ...] = ()
    factories: tuple[str, ...] = ()
    # [security] token_env_prefix / token_env / remote_hosts: what a remote: model may read and reach
    token_env_prefix: str = DEFAULT_TOKEN_ENV_PREFIX
    token_envs: tuple[str, ...] = ()
    remote_hosts: tuple[str, ...] = ()

    @property
    def source_kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def source_ref(self) -> str:
        return self.source.split(":", 1)[1]

    @property
    def trust(self) -> Trust:
        return Trust(self.model_roots or (self.base_dir,), self.trusted_roots, self.factories,
                     self.token_env_prefix, self.token_envs, self.remote_hosts)

    @property
    def replica_limit(self) -> int:
        """The most replicas this version may have: ``max_replicas``, else ``replicas``."""
        return self.max_replicas if self.max_replicas is not None else self.replicas

    def to_dict(self, secrets: bool = False) -> dict[str, Any]:
        """The options as registered (JSON-able), for the API; ``secrets``: with a remote's token,
        for the store only (a snapshot, /v1/models, the audit log and the console never show it)."""
        d: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "device": self.device,
            "warmup": self.warmup,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms,
            "max_queue_size": self.max_queue_size,
            "priority": self.priority,
            "timeout_ms": self.timeout_ms,
            "priority_levels": self.priority_levels,
            "cache": self.cache,
            "pin": self.pin,
            "latency_target_ms": self.latency_target_ms,
            "cuda_graphs": self.cuda_graphs,
        }
        if self.keep_alive is not None:
            d["keep_alive"] = self.keep_alive
        if self.replicas != 1:
            d["replicas"] = self.replicas
        if self.max_replicas is not None:
            d["max_replicas"] = self.max_replicas
        if self.source_kind == "remote":
            for key in ("model", "remote_version", "token_env"):
                if getattr(self, key) is not None:
                    d[key] = getattr(self, key)
            d["timeout_s"] = self.timeout_s
            if self.token is not None:
                d["token"] = self.token if secrets else "***"
        if self.estimate_mib is not None:
            d["estimate_mib"] = self.estimate_mib
        if self.rate_limit:
            d["rate_limit"] = dict(self.rate_limit)
        if self.factory:
            d["factory"] = self.factory
        if self.args:
            d["args"] = dict(self.args)
        if self.dtype:
            d["dtype"] = self.dtype
        if self.source_kind == "hf":  # stored and restored as given: None stays "decide from the folder"
            if self.tokenizer is not None:
                d["tokenizer"] = self.tokenizer
            if self.max_length is not None:
                d["max_length"] = self.max_length
            if self.buckets is not None:
                d["buckets"] = list(self.buckets)
            if self.truncation:
                d["truncation"] = True
            if self.pooling != "mean":
                d["pooling"] = self.pooling
            if self.normalize:
                d["normalize"] = True
        if self.inputs is not None:
            d["inputs"] = [s.to_dict() for s in self.inputs]
        if self.outputs is not None:
            d["outputs"] = [s.to_dict() for s in self.outputs]
        return d


@dataclass(frozen=True)
class Listener:
    """What the config file's ``[server]`` and a running server's settings (``server.web.ServerSettings``)
    share: where it listens, who may call, and the bounds on what one request may send.  Declared
    once; ``listener_fields`` copies them from one to the other."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    infer_requires_token: bool = False  # clients' infer calls need the token too
    max_inflation_ratio: float = 100.0  # a compressed body may grow this many times (judged past 64 KiB decoded)
    body_timeout_s: float = 30.0  # a request body must arrive whole within this
    head_timeout_s: float = 15.0  # a new connection's first request head must arrive within this
    keepalive_timeout_s: float = 30.0  # idle kept-alive connections (and half-sent next heads) close after this
    ipc: str = "unix"  # how front-end processes reach the engine core: "unix" (a Unix socket) or "zmq"
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides IP literals, localhost and host ("*": any)


def listener_fields(source: Listener) -> dict[str, Any]:
    """``source``'s ``Listener`` fields, to build the other kind from."""
    return {f.name: getattr(source, f.name) for f in fields(Listener)}


@dataclass(frozen=True)
class ServerConfig(Listener):
    max_body_mib: float = 64.0  # the largest request body accepted (decoded)
    torch_threads: int | None = None  # intra-op threads per model worker (None: policy.torch_threads; 0: torch's)
    workers: int | None = None  # front-end processes with --serve (None: policy.frontend_workers; 0: one process)
    grpc_port: int | None = 8001  # KServe V2 over gRPC with --serve (None: off; the console only with --grpc-port)
    ipc_spin_us: float | None = None  # --workers at low load: stay awake this long (None: policy.ipc_spin_us)
    gil_switch_us: float | None = None  # --serve: sys.setswitchinterval for the engine's process (None: Python's)


MAX_SPIN_US = 10_000  # a loop blocked longer than this would delay its other connections too much


@dataclass(frozen=True)
class StoreConfig:
    path: str | None = None  # None: the user's data directory


@dataclass(frozen=True)
class ClusterConfig:
    """``--cluster ray[://ADDRESS]`` (docs/cluster.md)."""

    ray_address: str | None = None  # "ray" (the local cluster) or "ray://HOST:PORT"; None: no cluster
    control_port: int = 8010  # the controller's own HTTP app (the control plane front ends forward to)
    frontend_port: int | None = None  # each node's front end (None: [server] port); 0: any free port


@dataclass(frozen=True)
class GpuConfig:
    default_device: str = "auto"
    simulate: str | None = None  # e.g. "2x24GiB": simulated devices (models run on the CPU)
    memory_fraction: float = 1.0  # of each device's total that models may use
    budget_gib: float | None = None  # an absolute cap per device
    reserve_mib: float = 512.0  # kept back per device (context, fragmentation)
    host_tier_gib: float = 0.0  # pinned host memory for evicted models' weights (0: off)
    unload_wait_s: float = 5.0  # how long an unload waits for the device to show memory back
    min_residency_s: float = 30.0  # churn guard: a model this young is not evicted for another
    device_slots: int = 2  # batches running at once on one device; beyond, the most urgent goes next


@dataclass(frozen=True)
class HostConfig:
    """``[host]``: host memory as a budget for CPU models, their replicas, the host tier and the cache."""

    budget_gib: float | None = None  # an absolute cap (None: the host's memory, or its cgroup limit)
    reserve_mib: float = 1024.0  # kept back for the interpreter, torch, buffers and everything else


@dataclass(frozen=True)
class CacheConfig:
    max_bytes: int = 256 * 2**20  # the result cache's bound, across all models


@dataclass(frozen=True)
class Config:
    path: str | None
    server: ServerConfig
    store: StoreConfig
    gpu: GpuConfig
    cache: CacheConfig
    models: tuple[ModelConfig, ...]
    model_roots: tuple[str, ...]
    trusted_roots: tuple[str, ...] = ()  # model roots marked trusted = true
    factories: tuple[str, ...] = ()  # [security] factories
    base_dir: str = "."  # the config file's directory: relative paths and factory modules start here
    cluster: ClusterConfig = ClusterConfig()
    host: HostConfig = HostConfig()
    # [security] token_env_prefix / token_env / remote_hosts (trust.py)
    token_env_prefix: str = DEFAULT_TOKEN_ENV_PREFIX
    token_envs: tuple[str, ...] = ()
    remote_hosts: tuple[str, ...] = ()

    @property
    def trust(self) -> Trust:
        return Trust(self.model_roots, self.trusted_roots, self.factories, self.token_env_prefix, self.token_envs,
                     self.remote_hosts)


# ---------------------------------------------------------------- checkers
# Each checker takes (key path, value) and returns the cleaned value or raises
# ConfigError naming the path.


def _show(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {_show(value)}")


def _int(minimum: int, what: str, maximum: float = math.inf) -> Callable[[str, Any], int]:
    def check(path: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
            raise _fail(path, what, v)
        return v

    return check


def _number(minimum: float, what: str, strict: bool = False) -> Callable[[str, Any], float]:
    def check(path: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum or (strict and v == minimum):
            raise _fail(path, what, v)
        return float(v)

    return check


def _str(path: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(path, "a non-empty string", v)
    return v


def _spin_us(path: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_SPIN_US:
        raise _fail(path, f"microseconds from 0 (never spin) to {MAX_SPIN_US}", v)
    return float(v)


def _switch_us(path: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 100 <= v <= 100_000:
        raise _fail(path, "microseconds from 100 to 100000", v)
    return float(v)


def _ipc(path: str, v: Any) -> str:
    if v not in ("unix", "zmq"):
        raise _fail(path, '"unix" or "zmq"', v)
    return v


def _name(path: str, v: Any) -> str:
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise _fail(path, "a name of letters, digits, '_', '.', '-' (starting with a letter or digit)", v)
    return v


def _version(path: str, v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return str(v)
    if isinstance(v, str) and re.fullmatch(r"[1-9][0-9]{0,8}", v):
        return v
    raise _fail(path, 'a positive integer version such as "1"', v)


def _device(path: str, v: Any) -> str:
    if not isinstance(v, str) or not DEVICE_RE.match(v):
        raise _fail(path, '"auto", "cpu", "cuda" or "cuda:N"', v)
    return v


def _secret(path: str, v: Any) -> str:
    if not isinstance(v, str) or not v or any(ord(c) < 33 or ord(c) == 127 for c in v):
        raise ConfigError(f"{path}: expected a token without spaces or control characters")
    return v


def _env_name(path: str, v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", v):
        raise _fail(path, "an environment variable's name (e.g. REMOTE_TOKEN)", v)
    return v


def _remote_url(path: str, url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.path not in ("", "/") or parts.username or parts.password:
        raise ConfigError(f"{path}: a remote: source is remote:http(s)://HOST[:PORT] (no path, query or "
                          f"credentials; the token goes in token or token_env), got {url!r}")


def _source(path: str, v: Any) -> str:
    if not isinstance(v, str) or ":" not in v or v.split(":", 1)[0] not in SOURCE_KINDS or not v.split(":", 1)[1]:
        raise _fail(path, "a source like zoo:NAME, torchscript:PATH, export:PATH, safetensors:PATH, "
                    "state_dict:PATH, hf:FOLDER or remote:http(s)://HOST:PORT", v)
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ConfigError(f"{path}: expected a path without control characters (NUL, newline...), "
                          f"got {v!r}")
    return v


def _factory(path: str, v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", v):
        raise _fail(path, '"package.module:callable"', v)
    return v


def _dtype(path: str, v: Any) -> str:
    if v not in DTYPES:
        raise _fail(path, "one of " + ", ".join(DTYPES), v)
    return v


def _buckets(path: str, v: Any) -> tuple[int, ...]:
    """Padded lengths: a non-empty list of distinct positive integers, ascending."""
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                    for x in v):
        raise _fail(path, "a list of positive token counts, e.g. [32, 64, 128]", v)
    if any(a >= b for a, b in zip(v, v[1:])):
        raise _fail(path, "ascending token counts without repeats", v)
    return tuple(v)


def _pooling(path: str, v: Any) -> str:
    if v not in ("mean", "cls"):
        raise _fail(path, '"mean" or "cls"', v)
    return str(v)


def _bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, "true or false", v)
    return v


_UNITS = {"B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def _size(path: str, v: Any) -> int:
    """A byte count: an integer, or a string like "512MiB" / "2 GiB"."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", v)
        if m and (m.group(2).upper() or "B") in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper() or "B"])
    raise _fail(path, 'a size in bytes or a string like "512MiB"', v)


def _fraction(path: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise _fail(path, "a fraction greater than 0 and at most 1", v)
    return float(v)


def _simulate(path: str, v: Any) -> str:
    from modelconsole.gpu.devices import parse_simulate

    if not isinstance(v, str):
        raise _fail(path, 'a device list like "2x24GiB"', v)
    try:
        parse_simulate(v)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return v


def _rate_limit(path: str, v: Any) -> dict[str, float]:
    if not isinstance(v, dict):
        raise _fail(path, "a table { rps = 100, burst = 10 }", v)
    for k in v:
        if k not in ("rps", "burst"):
            raise ConfigError(f"{path}.{k}: unknown key (expected rps, burst)")
    if "rps" not in v:
        raise ConfigError(f"{path}.rps: missing (requests per second)")
    rps = _number(0, "a positive number of requests per second", strict=True)(f"{path}.rps", v["rps"])
    burst = _int(1, "a positive integer")(f"{path}.burst", v.get("burst", max(1, int(rps))))
    return {"rps": rps, "burst": burst}


def _table(path: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(path, "a table", v)
    return dict(v)


def _specs(path: str, v: Any) -> tuple[TensorSpec, ...]:
    if not isinstance(v, list) or not v:
        raise _fail(path, 'a non-empty list of { name = "x", datatype = "FP32", shape = [-1, 16] }', v)
    out = []
    seen = set()
    for i, item in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise _fail(p, 'a table { name = "x", datatype = "FP32", shape = [-1, 16] }', item)
        for k in item:
            if k not in ("name", "datatype", "shape"):
                raise ConfigError(f"{p}.{k}: unknown key (expected name, datatype, shape)")
        for k in ("name", "datatype", "shape"):
            if k not in item:
                raise ConfigError(f"{p}.{k}: missing (every tensor needs name, datatype and shape)")
        name = _str(f"{p}.name", item["name"])
        if name in seen:
            raise ConfigError(f"{p}.name: duplicate tensor name \"{name}\"")
        seen.add(name)
        if item["datatype"] not in DATATYPES:
            raise _fail(f"{p}.datatype", "one of " + ", ".join(DATATYPES), item["datatype"])
        try:
            shape = parse_shape(item["shape"])
        except ValueError as e:
            raise ConfigError(f"{p}.shape: {e}") from None
        out.append(TensorSpec(name, item["datatype"], shape))
    return tuple(out)


_MODEL_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "name": _name,
    "source": _source,
    "version": _version,
    "factory": _factory,
    "args": _table,
    "inputs": _specs,
    "outputs": _specs,
    "device": _device,
    "dtype": _dtype,
    "warmup": _int(0, "a non-negative integer"),
    "max_batch_size": _int(0, "a non-negative integer (0 turns batching off)"),
    "max_queue_delay_ms": _number(0, "a non-negative number of milliseconds"),
    "max_queue_size": _int(1, "a positive integer"),
    "priority": _int(1, "a positive integer (1 is most urgent)"),
    "priority_levels": _int(1, "a positive integer"),
    "rate_limit": _rate_limit,
    "cache": _bool,
    "keep_alive": _number(0, "a non-negative number of idle seconds"),
    "pin": _bool,
    "latency_target_ms": _number(0, "a positive number of milliseconds", strict=True),
    "estimate_mib": _number(0, "a positive number of MiB", strict=True),
    "cuda_graphs": _bool,
    "timeout_ms": _number(0, "a positive number of milliseconds", strict=True),
    "replicas": _int(1, f"an integer from 1 to {MAX_REPLICAS} (instances kept loaded)", MAX_REPLICAS),
    "max_replicas": _int(1, f"an integer from 1 to {MAX_REPLICAS} (the most instances under load)", MAX_REPLICAS),
    "model": _name,
    "remote_version": _version,
    "token": _secret,
    "token_env": _env_name,
    "timeout_s": _number(0, "a positive number of seconds", strict=True),
    "tokenizer": _bool,
    "max_length": _int(1, "a positive number of tokens", 1 << 20),
    "truncation": _bool,
    "buckets": _buckets,
    "pooling": _pooling,
    "normalize": _bool,
}
TEXT_KEYS = ("tokenizer", "max_length", "truncation", "buckets", "pooling", "normalize")
MODEL_KEYS = tuple(_MODEL_KEYS)


def model_from_dict(
    raw: Any, path: str = "model", base_dir: str = ".", model_roots: tuple[str, ...] = (),
    trust: Trust | None = None,
) -> ModelConfig:
    """Check one model table (config file or control call) and build its config.

    ``trust`` (the config's trusted roots and factory allowlist) travels with
    the model; a control call cannot set it."""
    if not isinstance(raw, dict):
        raise _fail(path, "a table", raw)
    for key in raw:
        if key not in _MODEL_KEYS:
            raise ConfigError(f"{path}.{key}: unknown key (expected one of: {', '.join(MODEL_KEYS)})")
    for key in ("name", "source"):
        if key not in raw:
            raise ConfigError(f"{path}.{key}: missing (every model needs a name and a source)")
    values = {key: check(f"{path}.{key}", raw[key]) for key, check in _MODEL_KEYS.items() if key in raw}
    kind = values["source"].split(":", 1)[0]
    if kind in ("safetensors", "state_dict") and "factory" not in values:
        raise ConfigError(f"{path}.factory: missing (a {kind} source needs factory = \"module:callable\")")
    if kind not in ("safetensors", "state_dict") and "factory" in values:
        raise ConfigError(f"{path}.factory: only used with safetensors and state_dict sources, not {kind}")
    if kind == "remote":
        _remote_url(f"{path}.source", values["source"].split(":", 1)[1])
        if values.get("device", "cpu") not in ("cpu", "auto"):
            raise ConfigError(f"{path}.device: a remote model runs on its server; leave device out (or cpu)")
        values["device"] = "cpu"  # no GPU memory budget here
        if "token" in values and "token_env" in values:
            raise ConfigError(f"{path}.token: give token or token_env, not both")
    else:
        extra = [k for k in REMOTE_KEYS if k in values]
        if extra:
            raise ConfigError(f"{path}.{extra[0]}: only used with remote: sources, not {kind}")
    extra = [k for k in TEXT_KEYS if k in values]
    if extra and kind != "hf":
        raise ConfigError(f"{path}.{extra[0]}: only used with hf: sources (text in), not {kind}")
    if "buckets" in values and "max_length" in values and values["buckets"][-1] > values["max_length"]:
        raise ConfigError(f"{path}.buckets: expected every bucket at most max_length ({values['max_length']}), "
                          f"got {values['buckets'][-1]}")
    if "dtype" in values and kind not in ("zoo", "safetensors", "state_dict"):
        raise ConfigError(f"{path}.dtype: only zoo, safetensors and state_dict models can be cast, not {kind}")
    trust = trust or Trust()
    cfg = ModelConfig(base_dir=base_dir, model_roots=model_roots or trust.model_roots or (base_dir,),
                      trusted_roots=trust.trusted_roots, factories=trust.factories,
                      token_env_prefix=trust.token_env_prefix, token_envs=trust.token_envs,
                      remote_hosts=trust.remote_hosts, **values)
    if cfg.priority > cfg.priority_levels:
        raise ConfigError(
            f"{path}.priority: expected a level from 1 to priority_levels ({cfg.priority_levels}), got {cfg.priority}"
        )
    if cfg.max_replicas is not None and cfg.max_replicas < cfg.replicas:
        raise ConfigError(f"{path}.max_replicas: expected at least replicas ({cfg.replicas}), got {cfg.max_replicas}")
    if cfg.max_batch_size > 0:
        for label, specs in (("inputs", cfg.inputs), ("outputs", cfg.outputs)):
            for i, s in enumerate(specs or ()):
                if not s.shape or s.shape[0] != -1:
                    raise ConfigError(
                        f"{path}.{label}[{i}].shape: expected -1 as the first (batch) dimension "
                        f"because max_batch_size > 0, got {list(s.shape)}"
                    )
    return cfg


def _section(raw: dict, key: str, allowed: dict[str, Callable[[str, Any], Any]]) -> dict[str, Any]:
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise _fail(key, "a table", table)
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key (expected one of: {', '.join(allowed)})")
    return {k: check(f"{key}.{k}", table[k]) for k, check in allowed.items() if k in table}


def _port(path: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise _fail(path, "a port number 0-65535", v)
    return v


def cluster_address(path: str, v: Any) -> str:
    """``ray`` (join the Ray cluster this machine belongs to), ``ray://HOST:PORT``, or ``local:N``
    (N loopback Ray nodes on this machine, 1 to 16)."""
    if v == "ray" or (isinstance(v, str) and re.fullmatch(r"ray://[A-Za-z0-9_.:\[\]-]+:\d{1,5}", v)):
        return v
    if isinstance(v, str) and (m := re.fullmatch(r"local:(\d{1,2})", v)) and 1 <= int(m.group(1)) <= 16:
        return v
    raise _fail(path, '"ray", "ray://HOST:PORT" (the Ray cluster\'s GCS address) or "local:N" (N from 1 to 16)', v)


def grpc_port(path: str, v: Any) -> int | None:
    """A gRPC port, or "off"."""
    if v == "off":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise _fail(path, 'a port number 0-65535 or "off"', v)
    return v


def _host_list(path: str, v: Any) -> tuple[str, ...]:
    """Host names (``models.example.com``), or ``"*"`` for any."""
    if not isinstance(v, list) or not all(
            isinstance(h, str) and (h == "*" or re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?", h)) for h in v):
        raise _fail(path, 'a list of host names (e.g. ["models.example.com"]) or ["*"]', v)
    return tuple(h.lower() for h in v)


def parse_config(raw: dict[str, Any], base_dir: str, path: str | None = None) -> Config:
    """Check a parsed TOML document; ConfigError messages carry key paths (no file)."""
    top = {"model_roots", "server", "store", "gpu", "cache", "models", "security", "cluster", "host"}
    for key in raw:
        if key not in top:
            raise ConfigError(f"{key}: unknown key (expected one of: {', '.join(sorted(top))})")
    base = Path(base_dir).resolve()
    roots, trusted = _model_roots(raw.get("model_roots", ["."]), base)
    security = _section(raw, "security", {"factories": _factory_list, "token_env_prefix": _env_prefix,
                                          "token_env": _env_list, "remote_hosts": _remote_host_list})
    trust = Trust(roots, trusted, tuple(security.get("factories", ())),
                  security.get("token_env_prefix", DEFAULT_TOKEN_ENV_PREFIX), security.get("token_env", ()),
                  security.get("remote_hosts", ()))
    server = ServerConfig(**_section(raw, "server", {
        "host": _str, "port": _port, "token": _str, "infer_requires_token": _bool,
        "max_body_mib": _number(0, "a positive number of MiB", strict=True),
        "max_inflation_ratio": _number(1, "a number of times, at least 1"),
        "body_timeout_s": _number(0, "a positive number of seconds", strict=True),
        "head_timeout_s": _number(0, "a positive number of seconds", strict=True),
        "keepalive_timeout_s": _number(0, "a positive number of seconds", strict=True),
        "torch_threads": _int(0, "a non-negative integer (0 leaves torch's default)"),
        "workers": _int(0, "a non-negative integer (0: one process)"),
        "grpc_port": grpc_port,
        "ipc": _ipc,
        "ipc_spin_us": _spin_us,
        "gil_switch_us": _switch_us,
        "allowed_hosts": _host_list,
    }))
    store = StoreConfig(**_section(raw, "store", {"path": _str}))
    if store.path is not None and store.path != ":memory:":
        store = StoreConfig(path=str((base / store.path).resolve()))
    gpu = GpuConfig(**_section(raw, "gpu", {
        "default_device": _device,
        "simulate": _simulate,
        "memory_fraction": _fraction,
        "budget_gib": _number(0, "a positive number of GiB", strict=True),
        "reserve_mib": _number(0, "a non-negative number of MiB"),
        "host_tier_gib": _number(0, "a non-negative number of GiB"),
        "unload_wait_s": _number(0, "a non-negative number of seconds"),
        "min_residency_s": _number(0, "a non-negative number of seconds"),
        "device_slots": _int(1, "a positive integer"),
    }))
    cache = CacheConfig(**_section(raw, "cache", {"max_bytes": _size}))
    host = HostConfig(**_section(raw, "host", {
        "budget_gib": _number(0, "a positive number of GiB", strict=True),
        "reserve_mib": _number(0, "a non-negative number of MiB"),
    }))
    cluster = ClusterConfig(**_section(raw, "cluster", {
        "ray_address": cluster_address, "control_port": _port, "frontend_port": _port}))
    models_raw = raw.get("models", [])
    if not isinstance(models_raw, list):
        raise _fail("models", "an array of tables ([[models]])", models_raw)
    models = []
    seen: set[tuple[str, str]] = set()
    for i, m in enumerate(models_raw):
        cfg = model_from_dict(m, f"models[{i}]", str(base), roots, trust)
        if "device" not in m:
            cfg = replace(cfg, device=gpu.default_device)
        if (cfg.name, cfg.version) in seen:
            raise ConfigError(f"models[{i}]: duplicate model {cfg.name} version {cfg.version}")
        seen.add((cfg.name, cfg.version))
        models.append(cfg)
    return Config(path, server, store, gpu, cache, tuple(models), roots, trusted, trust.factories, str(base),
                  cluster, host, trust.token_env_prefix, trust.token_envs, trust.remote_hosts)


def _model_roots(v: Any, base: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``model_roots = ["models", { path = "exports", trusted = true }]`` -> (roots, trusted roots)."""
    what = 'a non-empty list of directory paths or tables { path = "dir", trusted = true }'
    if not isinstance(v, list) or not v:
        raise _fail("model_roots", what, v)
    roots, trusted = [], []
    for i, item in enumerate(v):
        p = f"model_roots[{i}]"
        if isinstance(item, dict):
            for k in item:
                if k not in ("path", "trusted"):
                    raise ConfigError(f"{p}.{k}: unknown key (expected path, trusted)")
            if "path" not in item:
                raise ConfigError(f"{p}.path: missing (the directory)")
            root_path = _str(f"{p}.path", item["path"])
            is_trusted = _bool(f"{p}.trusted", item.get("trusted", False))
        elif isinstance(item, str) and item:
            root_path, is_trusted = item, False
        else:
            raise _fail(p, what, item)
        if "\0" in root_path:
            raise _fail(p, "a directory path without NUL bytes", root_path)
        resolved = str((base / root_path).resolve())
        roots.append(resolved)
        if is_trusted:
            trusted.append(resolved)
    return tuple(roots), tuple(trusted)


def _env_prefix(path: str, v: Any) -> str:
    """[security] token_env_prefix: the start of the variables remote models may read ("": none by prefix)."""
    if not isinstance(v, str) or (v and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", v)):
        raise _fail(path, 'the start of environment variable names, e.g. "MODELCONSOLE_REMOTE_" ("" for none)', v)
    return v


def _env_list(path: str, v: Any) -> tuple[str, ...]:
    """[security] token_env: variables remote models may read, by name."""
    if not isinstance(v, list):
        raise _fail(path, 'a list of environment variable names, e.g. ["PARTNER_TOKEN"]', v)
    return tuple(_env_name(f"{path}[{i}]", item) for i, item in enumerate(v))


def _remote_host_list(path: str, v: Any) -> tuple[str, ...]:
    """[security] remote_hosts: names, addresses or CIDR blocks a remote model may reach anyway."""
    import ipaddress

    if not isinstance(v, list):
        raise _fail(path, 'a list of host names, addresses or CIDR blocks, e.g. ["10.0.0.0/8"]', v)
    for i, item in enumerate(v):
        ok = isinstance(item, str) and bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?", item))
        if isinstance(item, str) and not ok:
            try:
                ipaddress.ip_network(item, strict=False)
                ok = True
            except ValueError:
                ok = False
        if not ok:
            raise _fail(f"{path}[{i}]", "a host name, an address or a CIDR block", item)
    return tuple(v)


def _factory_list(path: str, v: Any) -> tuple[str, ...]:
    """[security] factories: ``"package.module:callable"`` or a whole ``"package.module"``."""
    if not isinstance(v, list):
        raise _fail(path, 'a list like ["torchvision.models:resnet50", "mypackage.models"]', v)
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*(:[A-Za-z][\w.]*)?", item):
            raise _fail(f"{path}[{i}]", '"package.module:callable" or "package.module"', item)
        out.append(item)
    return tuple(out)


def load_config(path: str | Path) -> Config:
    """Read and check a TOML file; every ConfigError message starts with the file name."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return parse_config(raw, str(p.resolve().parent), str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


DEMO_MODELS: tuple[dict[str, Any], ...] = (
    {"name": "tiny-mlp", "source": "zoo:tiny-mlp"},
    {"name": "small-cnn", "source": "zoo:small-cnn"},
    {"name": "encoder", "source": "zoo:encoder", "args": {"layers": 2, "d_model": 256, "heads": 4, "seq": 64}},
)


def with_demo_devices(config: Config, simulate: str = "2x8GiB") -> Config:
    """The demo's config on a machine with no CUDA device: simulated GPUs, so the console's
    GPU panel is live (the models still run on the CPU).  Unchanged where there is a GPU or
    the config already simulates."""
    import torch

    if config.gpu.simulate is not None or torch.cuda.is_available():
        return config
    return replace(config, gpu=replace(config.gpu, simulate=simulate))


def demo_config() -> Config:
    """What modelconsole serves with no config file: the demo zoo."""
    return parse_config({"models": [dict(m) for m in DEMO_MODELS]}, ".", None)
