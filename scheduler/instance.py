"""One model version: its lifecycle, its queue, its batches and its worker thread.

States: UNLOADED -> LOADING -> WARMING -> READY -> UNLOADING -> UNLOADED, and
FAILED (with the reason) when a load or warmup fails.  The engine's control
path drives the transitions (``load``/``unload``); the request path only
reads ``state`` and pushes requests.

The request path (all on the event loop, no torch):
``infer`` validates and queues; ``_dispatch`` forms a batch when the worker
is idle and the batch is full or its oldest request has waited
``max_queue_delay_ms``; the worker thread concatenates, runs the forward
pass, splits the outputs and hands the batch back in one callback
(``_batch_done``) that resolves every caller's future.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import operator
import time
import weakref
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from . import batchparts, hosttier, policy, snapshot, sources
from .cache import ResultCache
from .config import ModelConfig
from .errors import DeadlineExceeded, EngineError, InputError, ModelFailed, ModelUnavailable, QueueFull
from .events import EventBus
from .graphs import GraphRunner
from .queueing import Request, RequestQueue
from .ratelimit import RateLimit
from .shared import SharedDevice
from .states import FAILED, LOADING, READY, UNLOADED, UNLOADING, WARMING
from .stats import ModelStats
from .tensors import TensorSpec, random_tensor, validate_inputs
from .textenc import TextPlan
from .worker import Lane, ModelWorker, Pending, give_back, take_worker

log = logging.getLogger("modelconsole.instance")
_DEADLINE = operator.attrgetter("deadline")



# Batches a model on a GPU may have on its worker at once.  Two lets the loop
# form and hand over the next full batch while the GPU runs the current one,
# so the GPU never idles while the loop answers a batch's callers (a full
# second batch only: a half-empty one would just split the next batch in two).
# On the CPU the worker thread *is* the compute, so a second batch gains
# nothing and would only commit requests before a more urgent one arrives.
GPU_INFLIGHT = 2


class LoadFailed(EngineError):
    status = 500
    kind = "load_failed"


class InferResult:
    """The answer to one request: which model version served it and its outputs.

    Outputs are CPU tensors.  Fresh from the device they are inference-mode
    views into the batch's output (read-only outside ``torch.inference_mode``:
    clone one to modify it); from the cache they are private copies.
    """

    __slots__ = ("model", "version", "outputs", "metric")

    def __init__(self, model: str, version: str, outputs: dict[str, Any], metric: float | None = None):
        self.model = model
        self.version = version
        self.outputs = outputs
        self.metric = metric  # the mean of the output a split's arm tracks, when one was asked for

    def __repr__(self) -> str:
        return f"InferResult({self.model!r}, {self.version!r}, {list(self.outputs)})"


def resolve_device(spec: str) -> torch.device:
    """'auto' is the first GPU when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadFailed(f"device {spec}: no CUDA device on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise LoadFailed(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return device


def _as_outputs(result: Any, names: Sequence[str]) -> list[Any]:
    """The model's return value as a list in declared output order."""
    if isinstance(result, torch.Tensor) or type(result).__name__ == "ndarray":  # BYTES outputs are numpy
        outs = [result]
    elif isinstance(result, Mapping):
        missing = [n for n in names if n not in result]
        if missing:
            raise ModelFailed(f"model returned no output '{missing[0]}' (it returned {', '.join(map(str, result))})")
        outs = [result[n] for n in names]
    elif isinstance(result, (tuple, list)):
        outs = list(result)
    else:
        raise ModelFailed(f"model returned {type(result).__name__}, expected tensors")
    if len(outs) != len(names):
        raise ModelFailed(f"model returned {len(outs)} outputs, {len(names)} declared ({', '.join(names)})")
    return outs


class ModelInstance:
    def __init__(self, cfg: ModelConfig, events: EventBus, cache: ResultCache | None = None,
                 host_tier: hosttier.HostTier | None = None, torch_threads: int | None = None,
                 replica: int = 0, stats: ModelStats | None = None):
        self.cfg = cfg
        # replicas.py: replica 0 is the version itself (the primary); the others share its stats
        # and its replica_set, the list of every replica, primary first
        self.replica = replica
        self.replica_set: list[ModelInstance] = [self]
        self.torch_threads_setting = torch_threads  # None: policy.torch_threads chooses
        self.name = cfg.name
        self.version = cfg.version
        self.events = events
        self.state = UNLOADED
        self.reason: str | None = None
        self.text_plan: TextPlan | None = None  # takes text: how front ends tokenize it (textenc.py)
        try:
            self.inputs, self.outputs = sources.declared_specs(cfg)
            self.text_plan = sources.text_plan(cfg)
        except sources.SourceError:
            # registration checked it (Engine._check_source); a file changed since (a restart)
            # is the first load's to report
            self.inputs, self.outputs = cfg.inputs, cfg.outputs
        self.platform: str | None = sources.PLATFORMS.get(cfg.source_kind)  # the load confirms it
        self.device: torch.device | None = None
        self.weight_bytes = 0
        self.footprint_bytes = 0
        self.load_seconds: float | None = None
        self.loaded_at: float | None = None
        # when it was registered (the store's time for a restored version; a config file's
        # versions: when this process registered them)
        self.registered_at = time.time()
        self.warmup_runs = 0  # real forward passes run before READY (not counted in stats)
        self.version_key = f"{cfg.name}:{cfg.version}"
        self.key = self.version_key + (f"#{replica}" if replica else "")
        self.label = f"{cfg.name} v{cfg.version}" + (f" replica {replica}" if replica else "")
        self.host_tier = host_tier  # where its weights wait after an unload (None: dropped)
        self.trusted = sources.is_trusted(cfg)  # its file is in a root marked trusted = true
        self.load_source: str | None = None  # what the last load read: the source or "host tier"
        # residency: set by the engine's control path (memory.py), read by the policy
        self.device_index: int | None = None  # the managed device it holds memory on
        self.pinned = cfg.pin
        self.learned_footprint = 0  # measured at its last load: the next load's estimate
        self.loaded_mono = 0.0
        self.last_used = 0.0  # monotonic time of its last request
        self.waiting_for_room = 0  # requests whose lazy load waits for device memory (Engine._load_for_request)
        self.loaded_as_newcomer = False  # its current load was a newcomer's (memory.make_room; the churn guard)
        self.rate = policy.Ewma(half_life_s=policy.RATE_HALF_LIFE_S)  # requests per second, decayed
        self.shared: SharedDevice | None = None  # the managed device's slots, when it is shared
        self._granted = False  # holding a slot the shared device granted, not yet used
        self.last_run = 0.0  # monotonic time its last batch went to the worker
        self.p95_s: float | None = None  # measured p95 latency, refreshed every tick
        # set by the engine: evicts something idle on this model's device after a forward OOM
        self.on_oom: Any = None
        self._rate_seen = 0  # requests counted into rate so far
        self.stats = stats if stats is not None else ModelStats()
        self.queue = RequestQueue(cfg.priority_levels, cfg.max_queue_size)
        # the shared result cache, when this model uses it
        self.cache = cache if cfg.cache else None
        self._cache_prefix = f"{cfg.name}\0{cfg.version}\0".encode()
        self.limiter = (
            RateLimit(cfg.rate_limit["rps"], int(cfg.rate_limit["burst"])) if cfg.rate_limit else None
        )
        self.in_flight = 0  # requests inside batches handed to the worker
        self.served = 0  # requests this instance answered (its version's stats count every replica's)
        self.load_task: asyncio.Task | None = None  # shared by concurrent lazy loads
        self._module: Any = None
        self._worker: ModelWorker | Lane | None = None  # a GPU model's thread, or a CPU model's lane
        self._batches = 0  # batches handed to the worker and not yet answered
        self._max_batches = 1  # GPU_INFLIGHT on a GPU
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._soon = False  # a dispatch is scheduled for the end of this loop turn
        self._last_batch = 0  # requests in the last batch sent: >1 means concurrent traffic
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = float("inf")
        self._drained: asyncio.Event | None = None
        self.stalled = False  # a forward pass ran past its requests' deadlines and has not returned
        self._running: dict[int, tuple[list[Request], float]] = {}  # batches on the worker, when each went
        self._watch: asyncio.TimerHandle | None = None  # fires at the earliest deadline in flight
        self._watch_at = math.inf
        self._output_names: tuple[str, ...] = ()
        self._grouped = False
        self._cuda_base = 0
        self._graphs: GraphRunner | None = None  # captured CUDA graphs (cuda_graphs = true)

    # ------------------------------------------------------------ lifecycle

    async def load(self, device: torch.device | None = None) -> None:
        """Load, measure, warm up; READY on success, FAILED (and LoadFailed raised) otherwise.

        device: where the engine placed it (None: resolve the config's device).
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._set_state(LOADING)
        self.events.publish("loading", f"loading {self.label} from {self.cfg.source}",
                            model=self.name, version=self.version)
        worker = None
        try:
            if device is None:
                device = resolve_device(self.cfg.device)
            threads = policy.torch_threads(self.torch_threads_setting)
            worker = take_worker(f"{self.name}:{self.version}", device, loop, threads=threads)
            kept = self.host_tier.take(self.key) if self.host_tier is not None else None
            self.load_source = "host tier" if kept is not None else self.cfg.source
            loaded, footprint = await worker.call(lambda: self._load_on_thread(device, kept))
            self.device = device
            self._worker = worker
            self._max_batches = GPU_INFLIGHT if device.type == "cuda" else 1
            self._install(loaded, footprint)
            self._set_state(WARMING)
            self.warmup_runs = 0
            for _ in range(self.cfg.warmup):
                batch = [random_tensor(s) for s in self.input_specs]
                await worker.call(partial(self._forward, batch), inference=True)
                self.warmup_runs += 1
            self._graphs = None
            if self.cfg.cuda_graphs and device.type == "cuda" and self.cfg.max_batch_size > 0:
                names = self._output_names
                self._graphs = await worker.call(lambda: GraphRunner(
                    self._module, self.input_specs, lambda r: _as_outputs(r, names), device, self.cfg.max_batch_size),
                    inference=True)
            if device.type == "cuda" and (self.warmup_runs or self._graphs is not None):
                # what the model really holds once it has run: weights, plus the
                # workspaces and cached blocks its forward passes keep (nothing ran: the
                # load's own reading stands, and a reload saves a round trip to the worker)
                after = await worker.call(lambda: torch.cuda.memory_allocated(device))
                self.footprint_bytes = max(footprint, after - self._cuda_base)
        except Exception as e:  # noqa: BLE001 - a failed load is reported, never raised raw
            reason = e.message if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            if worker is not None:
                await self._free(worker)
            self._module = None
            self._worker = None
            self._set_state(FAILED, reason)
            self.events.publish("load_failed", f"{self.label} failed to load: {reason}",
                                model=self.name, version=self.version, level="error")
            raise LoadFailed(f"model {self.name} version {self.version} failed to load: {reason}") from e
        self.load_seconds = time.perf_counter() - started
        self.loaded_at = time.time()
        self.loaded_mono = time.monotonic()
        self._set_state(READY)
        self.events.publish(
            "loaded",
            f"{self.label} ready on {self.device_label} in {self.load_seconds:.2f}s from {self.load_source} "
            f"({self.footprint_bytes / 2**20:.1f} MiB)",
            model=self.name, version=self.version,
            data={"load_seconds": self.load_seconds, "footprint_bytes": self.footprint_bytes,
                  "load_source": self.load_source,
                  "device": str(self.device)},
        )

    def _load_on_thread(
        self, device: torch.device, kept: hosttier.Kept | None = None
    ) -> tuple[sources.LoadedModel, int]:
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self._cuda_base = before
        loaded = hosttier.to_device(kept, device) if kept is not None else sources.load_model(self.cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            footprint = torch.cuda.memory_allocated(device) - before
        else:
            footprint = loaded.weight_bytes
        return loaded, footprint

    def _install(self, loaded: sources.LoadedModel, footprint: int) -> None:
        self._module = loaded.module
        self.inputs = loaded.inputs
        self.outputs = loaded.outputs
        self.platform = loaded.platform
        self.weight_bytes = loaded.weight_bytes
        self.footprint_bytes = footprint
        self._output_names = tuple(s.name for s in self.outputs)
        # Variable non-batch dimensions: requests are grouped by shape so a batch concatenates.
        self._grouped = any(-1 in s.shape[1:] for s in self.inputs)

    async def unload(self, drain_timeout: float = 30.0, keep: bool = True) -> None:
        """Stop routing, let queued and in-flight work finish (bounded), then free.

        keep: move the weights to the host-memory tier (if there is one)
        instead of dropping them.
        """
        if self.state not in (READY, WARMING):
            if self.state == FAILED:
                self._set_state(UNLOADED)
            return
        self._set_state(UNLOADING)
        self.events.publish("unloading", f"unloading {self.label}",
                            model=self.name, version=self.version)
        if self.queue.size or self._batches:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout)
            except TimeoutError:
                pass
            finally:
                self._drained = None
        for req in self.queue.drain():
            self._answer_error(req, ModelUnavailable(f"model {self.name} version {self.version} was unloaded"))
        worker, self._worker = self._worker, None
        if worker is not None:
            await self._free(worker, keep=keep and self.host_tier is not None and self.host_tier.enabled)
        self._set_state(UNLOADED)
        self.events.publish("unloaded", f"{self.label} unloaded",
                            model=self.name, version=self.version,
                            data={"freed_bytes": self.footprint_bytes})

    async def _free(self, worker: ModelWorker | Lane, keep: bool = False) -> None:
        """Drop the module (or move it to the host tier) on its own thread, empty the CUDA cache."""
        device = worker.device
        tier = self.host_tier if keep else None
        loaded = sources.LoadedModel(self._module, self.input_specs, self.output_specs, self.weight_bytes,
                                     self.platform or "") if tier is not None and self._module is not None else None
        kept: list[hosttier.Kept] = []

        def free() -> None:
            nonlocal loaded
            cuda = device.type == "cuda"
            held = torch.cuda.memory_allocated(device) if cuda else 0
            if loaded is not None and tier is not None and tier.accepts(loaded):
                kept.append(hosttier.to_host(loaded))
            loaded = None  # its module reference too: what is left of the module is the instance's
            alive = weakref.ref(self._module) if self._module is not None else None
            self._module = None
            self._graphs = None
            if not cuda:
                # Only a module in a reference cycle outlives its last reference; a full collection
                # per unload walked the whole heap each time (1,000 models took a minute to stop).
                if alive is not None and alive() is not None:
                    gc.collect()
            elif held - torch.cuda.memory_allocated(device) < self.weight_bytes // 2:
                # Dropping the last references freed the tensors unless the module is in a
                # reference cycle; only then is the collector needed.  A full collection walks the
                # serving process's whole heap holding the GIL, and on a GPU that stall landed on
                # the other models' requests (a hot swap's p99).
                gc.collect()
            if cuda:
                torch.cuda.synchronize(device)
                # cuBLAS keeps a workspace per stream; this thread's stream is going away
                clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
                if clear is not None:
                    clear()
                torch.cuda.empty_cache()

        try:
            await worker.call(free)
        finally:
            give_back(worker)  # a CUDA worker waits as its device's spare for the next load
        if kept and tier is not None:
            for dropped in tier.put(self.key, kept[0]):
                self.events.publish("host_tier_dropped", f"{dropped} dropped from the host-memory tier (full)",
                                    data={"key": dropped})

    def _set_state(self, state: str, reason: str | None = None) -> None:
        self.state = state
        self.reason = reason

    # ------------------------------------------------------------ request path

    def prepare(
        self,
        inputs: Mapping[str, Any],
        priority: int | None,
        timeout_ms: float | None,
        outputs: Sequence[str] | None,
        now: float,
        batch_limit: int | None = None,
    ) -> Request:
        """Validate one request (raises InputError naming the field); no side effects.
        ``batch_limit``: rows allowed instead of ``max_batch_size`` (a chunk's stacked rows,
        each of whose requests the caller checked against ``max_batch_size``)."""
        cfg = self.cfg
        self.last_used = now
        tensors, size = validate_inputs(self.input_specs, inputs, batch_limit or cfg.max_batch_size)
        if outputs is not None:
            for o in outputs:
                if o not in self._output_names:
                    raise InputError(f"unknown output '{o}' (model outputs: {', '.join(self._output_names)})")
            outputs = tuple(outputs)
        levels = cfg.priority_levels
        if priority is None or (type(priority) is int and priority == 0):
            level = cfg.priority
        elif isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= levels:
            raise InputError(f"priority: expected an integer from 1 (most urgent) to {levels}, or 0 for the "
                             f"model's default, got {priority!r}")
        else:
            level = priority
        timeout = cfg.timeout_ms
        if timeout_ms is not None:
            if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or not timeout_ms > 0:
                raise InputError(f"timeout: expected a positive number of milliseconds, got {timeout_ms!r}")
            if timeout_ms < timeout:
                timeout = timeout_ms  # a request may only shorten the model's default
        group = tuple(t.shape[1:] for t in tensors) if self._grouped else None
        return Request(tensors, size, None, level, now + timeout / 1000.0, now, group, outputs)

    def cached(self, req: Request, digest: bytes | None = None) -> InferResult | None:
        """The cached answer to req, or None (and req remembers its key to store the result).
        ``digest``: the inputs' ``cache.input_digest``, when a front end computed it."""
        cache = self.cache
        assert cache is not None  # asked only of a version with a cache
        req.cache_key = key = ResultCache.key(self._cache_prefix, self.input_specs, req.tensors, digest)
        outs = cache.get(key)
        if outs is None:
            self.stats.cache_misses += 1
            return None
        stats = self.stats
        stats.cache_hits += 1
        stats.success += 1
        stats.record_latency(time.monotonic() - req.enqueued)
        if req.outputs is not None:
            outs = {k: outs[k] for k in req.outputs}
        return InferResult(self.name, self.version, outs)

    def cached_rows(self, req: Request, digests: Sequence[bytes | None] | None) -> list[tuple[int, InferResult]]:
        """The cached answers among a chunk's requests, as (place in ``req.parts``, answer);
        every request's cache key is kept on ``req.cache_keys`` so its result can be stored.
        ``digests``: each request's ``cache.input_digest``, when a front end computed them."""
        assert req.parts is not None
        keys: list[bytes] = []
        hits: list[tuple[int, InferResult]] = []
        stats, prefix, cache = self.stats, self._cache_prefix, self.cache
        assert cache is not None  # asked only of a version with a cache
        start = 0
        for k, rows in enumerate(req.parts):
            digest = digests[k] if digests is not None else None
            tensors = req.tensors if digest is not None else [t[start:start + rows] for t in req.tensors]
            key = ResultCache.key(prefix, self.input_specs, tensors, digest)
            keys.append(key)
            start += rows
            outs = cache.get(key)
            if outs is None:
                stats.cache_misses += 1
                continue
            stats.cache_hits += 1
            stats.success += 1
            stats.record_latency(time.monotonic() - req.enqueued)
            if req.outputs is not None:
                outs = {o: outs[o] for o in req.outputs}
            hits.append((k, InferResult(self.name, self.version, outs)))
        req.cache_keys = keys
        return hits

    def full(self) -> QueueFull:
        return QueueFull(f"model {self.name} queue is full ({self.queue.max_size} requests); retry later",
                         retry_after=1.0)

    def room(self) -> int:
        """Requests the queue takes before it is full."""
        return self.queue.max_size - self.queue.size

    def unavailable(self) -> ModelUnavailable:
        return ModelUnavailable(
            f"model {self.name} version {self.version} is {self.state}" + (f": {self.reason}" if self.reason else "")
        )

    def enqueue(self, req: Request) -> asyncio.Future[InferResult]:
        """Queue a validated request; the returned future is its one answer."""
        if self.state != READY:
            raise self.unavailable()
        if self.queue.size >= self.queue.max_size:
            raise self.full()
        loop = asyncio.get_running_loop()
        req.future = fut = loop.create_future()
        self.queue.push(req)
        if req.deadline < self._sweep_at:
            self._arm_sweep(loop, req.deadline)
        if self._batches == 0 and self._last_batch <= 1:
            self._dispatch(loop, time.monotonic())  # one request at a time: go now (c=1 latency)
        elif self._batches == 0:
            # Idle worker under concurrent traffic (the last batch had company): the batch goes
            # at the end of this loop turn, so that every request this turn brings (other
            # handlers woken by the same read, callers resumed by the last batch's answers)
            # rides along instead of waiting behind a batch of one.  It costs one loop hop
            # (~30-60 us at c=1, hence not there); it saves a worker handoff per request.
            if not self._soon:
                self._soon = True
                loop.call_soon(self._dispatch_soon)
        elif self._should_dispatch():
            self._dispatch(loop, time.monotonic())
        return fut

    def _dispatch_soon(self) -> None:
        self._soon = False
        if self._worker is not None and self.queue.size and self._should_dispatch():
            loop = asyncio.get_running_loop()
            self._dispatch(loop, time.monotonic())

    def _should_dispatch(self) -> bool:
        """Idle worker: yes.  Busy: only a full batch, and only up to _max_batches in flight."""
        b = self._batches
        return b == 0 or (b < self._max_batches and self.queue.samples >= (self.cfg.max_batch_size or 1))

    def _dispatch(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """Send the next batch to the worker if it is idle and the batch should go now."""
        cfg = self.cfg
        max_samples = cfg.max_batch_size or 1
        delay = cfg.max_queue_delay_ms / 1000.0
        if delay > 0 and self.queue.size:
            go_at = self.queue.oldest_enqueued() + delay
            if now < go_at and self.queue.samples < max_samples:
                if go_at < self._timer_at:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer_at = go_at
                    self._timer = loop.call_later(go_at - now, self._on_timer)
                return
        shared = self.shared
        if shared is not None and not self._granted and not shared.acquire(self):
            return  # the device is busy: shared.release() grants us a slot by urgency
        self._granted = False
        batch = self.queue.take_batch(max_samples, now, self._expire)
        if not batch:
            if shared is not None:
                shared.release()
            self._check_drained()
            return
        self.last_run = now
        self._last_batch = len(batch)
        # A batch handed over while another runs waits on the worker: its
        # deadlines are checked again when it starts (it left the queue's sweep).
        run = self._run_batch if self._batches == 0 else self._run_batch_if_live
        self._batches += 1
        self.in_flight += sum(r.count for r in batch)
        self._running[id(batch)] = (batch, now)
        self._watch_deadline(loop, min(map(_DEADLINE, batch)))
        worker = self._worker
        assert worker is not None  # _should_dispatch: only while loaded
        worker.submit(lambda: run(batch), lambda r, e: self._batch_done(batch, now, r, e))

    async def _retry_after_oom(self, batch: list[Request], formed: float) -> None:
        """Ask the engine to evict an idle model on this device, empty the cache, rerun the batch."""
        worker = self._worker
        try:
            if self.on_oom is not None:
                await self.on_oom(self)
            if worker is not None and self.device is not None and self.device.type == "cuda":
                await worker.call(torch.cuda.empty_cache, inference=True)
        except Exception as e:  # noqa: BLE001 - the retry still runs; the event says what happened
            self.events.publish("oom", f"{self.key}: making room after an OOM failed: {e}", level="error",
                                model=self.name, version=self.version)
        if worker is None or self._worker is not worker:
            self._batch_done(batch, formed, None, ModelUnavailable(f"model {self.key} was unloaded"), retried=True)
            return
        self._running[id(batch)] = (batch, formed)  # watched again while it reruns
        worker.submit(lambda: self._run_batch_if_live(batch),
                      lambda r, e: self._batch_done(batch, formed, r, e, retried=True))

    def granted(self) -> None:
        """The shared device gave this model a slot (called by SharedDevice.release)."""
        self._granted = True
        loop = asyncio.get_running_loop()
        self._dispatch(loop, time.monotonic())

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._batches == 0:
            loop = asyncio.get_running_loop()
            self._dispatch(loop, time.monotonic())

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = at
        # durations and deadlines use time.monotonic() only; the loop's own clock (uvloop's is cached
        # per iteration, in ms) is never mixed in: a timer may fire a moment early, and re-arms
        self._sweep = loop.call_later(max(0.0, at - time.monotonic()), self._on_sweep)

    def _on_sweep(self) -> None:
        """A deadline passed: answer every expired queued request now, not when a batch forms."""
        self._sweep = None
        self._sweep_at = float("inf")
        loop = asyncio.get_running_loop()
        nxt = self.queue.expire(time.monotonic(), self._expire)
        if nxt != float("inf"):
            self._arm_sweep(loop, nxt)
        self._check_drained()

    def _expire(self, req: Request) -> None:
        self._answer_error(req, DeadlineExceeded(
            f"model {self.name}: request timed out after waiting "
            f"{(req.deadline - req.enqueued) * 1000:.0f} ms in the queue"
        ))

    def _answer_error(self, req: Request, error: EngineError) -> None:
        if not req.future.done():
            req.future.set_exception(error)

    def _forward(self, tensors: list[Any]) -> list[Any]:
        """Run the model on one set of input tensors (worker thread, already in inference mode)."""
        if self._graphs is not None:
            return self._graphs.run(tensors)
        device = self.device
        assert device is not None  # runs only while loaded
        if device.type != "cpu":
            tensors = [t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in tensors]
        result = self._module(*tensors)
        outs = _as_outputs(result, self._output_names)
        if device.type != "cpu":
            outs = [o.cpu() if isinstance(o, torch.Tensor) else o for o in outs]
        return outs

    def _run_batch_if_live(self, batch: list[Request]) -> tuple[Sequence[dict[str, Any] | None], int] | Pending:
        """_run_batch for the requests still within their deadline; None for the others."""
        now = time.monotonic()
        live = [r for r in batch if r.deadline > now]
        if len(live) == len(batch):
            return self._run_batch(batch)

        def remap(result: tuple[list[dict[str, Any]], int]) -> tuple[Sequence[dict[str, Any] | None], int]:
            outs, compute_ns = result
            by_req = dict(zip(map(id, live), outs))
            return [by_req.get(id(r)) for r in batch], compute_ns

        result = self._run_batch(live) if live else ([], 0)
        if isinstance(result, Pending):
            pending = result
            return Pending(lambda: remap(pending.finish()))
        return remap(result)

    def _run_batch(self, batch: list[Request]) -> tuple[list[dict[str, Any]], int] | Pending:
        """Concatenate, forward, split (worker thread).  Returns per-request outputs."""
        t0 = time.perf_counter_ns()
        if len(batch) == 1:
            tensors = batch[0].tensors
        else:
            tensors = [
                torch.cat([r.tensors[i] for r in batch]) if isinstance(batch[0].tensors[i], torch.Tensor)
                else batchparts.concat_objects([r.tensors[i] for r in batch])
                for i in range(len(batch[0].tensors))
            ]
        graphs = self._graphs
        if graphs is not None:  # queue it on the GPU; the worker finishes it after starting the next
            handle = graphs.launch(tensors)
            return Pending(lambda: self._split(batch, graphs.collect(handle), t0))
        return self._split(batch, self._forward(tensors), t0)

    def _split(self, batch: list[Request], outs: list[Any], t0: int) -> tuple[list[dict[str, Any]], int]:
        """Each request's rows of the batch's outputs (worker thread)."""
        names = self._output_names
        if len(batch) == 1 and batch[0].parts is None:
            per_request = [dict(zip(names, outs))]
            batchparts.metric_means(batch, per_request)
            return per_request, time.perf_counter_ns() - t0
        total = sum(r.size for r in batch)
        for name, o in zip(names, outs):
            if getattr(o, "shape", (None,))[0] != total:
                raise ModelFailed(
                    f"output '{name}' has {getattr(o, 'shape', ['?'])[0]} rows for a batch of {total} samples"
                )
        sizes = [r.size for r in batch]
        parts = [o.split(sizes) if isinstance(o, torch.Tensor) else batchparts.split_objects(o, sizes) for o in outs]
        per_request = [dict(zip(names, row)) for row in zip(*parts)]
        batchparts.metric_means(batch, per_request)
        return per_request, time.perf_counter_ns() - t0

    def _batch_done(self, batch: list[Request], formed: float, result: Any, error: BaseException | None,
                    retried: bool = False) -> None:
        """Back on the loop: answer every request of the batch, then start the next one.

        Exception-safe: whatever goes wrong while answering, every request of
        the batch still gets one answer, the counters are settled and the next
        batch is dispatched (a model must never stop dispatching because one
        answer could not be built)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self._running.pop(id(batch), None)
        if error is not None and not retried and isinstance(error, torch.OutOfMemoryError):
            # Out of memory in a forward: free what we can and run this batch once more.
            self.events.publish("oom", f"{self.key}: out of memory running a batch of {len(batch)}; "
                                "freeing memory and retrying it once", model=self.name, version=self.version,
                                level="warning")
            loop.create_task(self._retry_after_oom(batch, formed))
            return
        try:
            if self.stalled:
                self.stalled = False
                self.events.publish("model_recovered", f"{self.key}: the overdue forward pass finished; "
                                    "serving again", model=self.name, version=self.version)
            if error is None:
                self._answer_batch(batch, formed, result, now)
            else:
                self._fail_batch(batch, error)
        except Exception as e:  # noqa: BLE001 - answering failed: each request still gets an answer
            log.exception("answering a batch of %s failed", self.key)
            failure = ModelFailed(f"model {self.name} version {self.version}: answering the batch failed: "
                                  f"{type(e).__name__}: {e}")
            for req in batch:
                self._answer_error(req, failure)
        finally:
            self._batches -= 1
            self.in_flight -= sum(r.count for r in batch)
            if self.shared is not None:
                # compete for the freed slot on urgency, like every other waiting model
                self.shared.release(self if self.queue.size and self._should_dispatch() else None)
            if self.queue.size and self._worker is not None and self._should_dispatch():
                self._dispatch(loop, now)
            else:
                self._check_drained()

    def _answer_batch(self, batch: list[Request], formed: float, result: Any, now: float) -> None:
        per_request, compute_ns = result
        stats = self.stats
        samples = answered = 0
        waited = 0.0
        name, version, cache = self.name, self.version, self.cache
        for req, outs in zip(batch, per_request):
            if outs is None:  # its deadline passed while the batch waited on the worker
                self._expire(req)
                continue
            samples += req.size  # it ran
            if req.future.done():  # answered already: its deadline passed while the forward ran
                continue
            try:
                if cache is not None:
                    if req.cache_key is not None:
                        cache.put(req.cache_key, outs, (name, version))
                    elif req.cache_keys is not None:
                        batchparts.cache_rows(cache, req, outs, (name, version))
                if req.outputs is not None:
                    outs = {k: outs[k] for k in req.outputs}
                req.future.set_result(InferResult(name, version, outs, req.metric_mean))
            except Exception as e:  # noqa: BLE001 - this request fails, the rest of the batch goes on
                self._answer_error(req, ModelFailed(f"model {name} version {version}: cannot answer: "
                                                    f"{type(e).__name__}: {e}"))
                continue
            n = req.count  # a chunk: each of its requests is answered, and measured, as one
            answered += n
            waited += (formed - req.enqueued) * n
            latency = now - req.enqueued
            for _ in range(n):
                stats.record_latency(latency)
        stats.success += answered
        self.served += answered
        if samples:
            stats.record_batch(samples, int(waited * 1e9), compute_ns)

    def _fail_batch(self, batch: list[Request], error: BaseException) -> None:
        message = error.message if isinstance(error, EngineError) else f"{type(error).__name__}: {error}"
        self.events.publish("model_error", f"{self.name} v{self.version}: batch of {len(batch)} failed: {message}",
                            model=self.name, version=self.version, level="error")
        # the engine's own kinds pass as they are (a remote: model's 502 or 504, its open circuit's 503)
        failure = error if isinstance(error, EngineError) else \
            ModelFailed(f"model {self.name} version {self.version} failed: {message}")
        for req in batch:
            self._answer_error(req, failure)

    def _watch_deadline(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        """Arm the in-flight watch for ``at`` unless it already fires sooner.  One timer per model,
        re-armed only for an earlier deadline (each batch costs a comparison, not a timer)."""
        if at < self._watch_at:
            if self._watch is not None:
                self._watch.cancel()
            self._watch_at = at
            self._watch = loop.call_later(max(0.0, at - time.monotonic()) + 0.005, self._on_watch)

    def _on_watch(self) -> None:
        """A deadline of a batch in flight has come: a forward pass that has not returned by a
        request's deadline must not leave it without an answer (504), and marks the model stalled."""
        self._watch, self._watch_at = None, math.inf
        now = time.monotonic()
        nxt = math.inf
        for batch, started in list(self._running.values()):
            expired = [r for r in batch if r.deadline <= now and not r.future.done()]
            for req in expired:
                self._answer_error(req, DeadlineExceeded(
                    f"model {self.name}: request timed out: the forward pass has run {now - started:.1f} s "
                    "and has not returned (the model is marked stalled)"))
            if expired and not self.stalled:
                self.stalled = True
                self.events.publish("model_stalled", f"{self.key}: a forward pass has run {now - started:.1f} s, "
                                    "past its requests' deadlines; they were answered 504 and the model shows "
                                    "unhealthy until it returns", model=self.name, version=self.version,
                                    level="error")
            nxt = min([nxt, *(r.deadline for r in batch if not r.future.done())])
        if nxt != math.inf:
            self._watch_deadline(asyncio.get_running_loop(), nxt)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._batches and not self.queue.size:
            self._drained.set()

    # ------------------------------------------------------------ observation

    @property
    def queued(self) -> int:
        return self.queue.size

    @property
    def device_label(self) -> str:
        """Where it runs, one spelling for the snapshot, the events and the console: ``gpu0`` for a
        budgeted device (real or simulated: a simulated one's torch device reads ``cpu``), else the
        torch device it was loaded on, else ``—`` (nothing loaded; the config's ``device`` says where
        it would go)."""
        if self.cfg.source_kind == "remote":
            from urllib.parse import urlsplit

            return "→" + urlsplit(self.cfg.source_ref).netloc  # it runs there, on no device of ours
        if self.device_index is not None:
            return f"gpu{self.device_index}"
        if self.device is not None and self.state in (READY, WARMING, UNLOADING, LOADING):
            return str(self.device)
        return "—"

    def busy(self) -> bool:
        return bool(self.queue.size or self._batches or self.state in (LOADING, WARMING))

    def requests_total(self) -> int:
        return self.stats.success + sum(self.stats.failures.values())

    def tick(self, now: float) -> None:
        """Fold the requests seen since the last tick into the rate EWMA (off the hot path)."""
        total = self.requests_total()
        self.rate.add_event(now, total - self._rate_seen)
        self._rate_seen = total
        self.stats.sample_rates(now)
        p95 = self.stats.latency_ms()["p95"]
        self.p95_s = p95 / 1000.0 if p95 is not None else None

    def residency(self, now: float, nbytes: int | None = None) -> policy.Residency:
        """What the eviction policy knows about this model, all measured where it can be."""
        held = self.footprint_bytes if nbytes is None else nbytes
        reload = self.load_seconds if self.load_seconds else policy.estimated_reload_seconds(held)
        return policy.Residency(
            key=self.key,
            bytes=max(1, held),
            request_rate=self.rate.rate(now),
            reload_seconds=reload,
            base_priority=self.cfg.priority,
            pinned=self.pinned,
            busy=self.busy(),
            loaded_at=self.loaded_mono,
            # 0.0 is "never": the monotonic clock's zero is an arbitrary past (boot), not a use
            last_used=self.last_used if self.last_used > 0.0 else -math.inf,
            loaded_as_newcomer=self.loaded_as_newcomer,
        )

    def snapshot(self) -> dict[str, Any]:
        return snapshot.version_snapshot(self)

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The inputs: declared at registration or known from the load, before any request runs."""
        assert self.inputs is not None, f"{self.key}: its inputs are not known yet"
        return self.inputs

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        assert self.outputs is not None, f"{self.key}: its outputs are not known yet"
        return self.outputs

    @property
    def cuda_graph_sizes(self) -> list[int] | None:
        """The batch sizes captured as CUDA graphs; None when it runs eagerly."""
        return self._graphs.sizes if self._graphs is not None else None

    @property
    def module(self) -> Any:
        """The loaded module (None when unloaded): for the views that read its counters."""
        return self._module
