"""Where a loaded model's torch code runs: its worker (the event loop never runs torch).

The event loop hands a job (a load, a batch, a free) to the model's worker and
gets the answer back through one ``call_soon_threadsafe`` per job — per
*batch*, not per request, which is what keeps the loop cheap under load.  A
model's jobs run one at a time, in the order given.

* On a GPU a model has a thread of its own (``ModelWorker``) holding a CUDA
  stream, so several models on one device run concurrently; a freed model's
  thread waits as its device's spare for the next load there.
* On the CPU a thread per model would cost a thread per loaded model (1,000
  loaded models held 1,018 threads) for no gain: the cores are shared anyway.
  CPU models get a lane (``Lane``) on their event loop's CPU pool instead: a
  bounded set of threads, each taking one job of one lane at a time, round
  robin, so a model's jobs stay in order and no model starves the others.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch


class _Calls:
    """``call`` over ``submit``: what both kinds of worker share."""

    _loop: asyncio.AbstractEventLoop

    def submit(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        raise NotImplementedError

    def call(self, fn: Callable[[], Any], inference: bool = False) -> asyncio.Future[Any]:
        """Run fn() on the thread and await its result (loads, warmup, frees).

        The thread lives in inference mode (entered once: it costs microseconds
        per entry on the hot path); loads run with it off, so that the
        parameters they create are ordinary tensors.
        """
        fut = self._loop.create_future()
        if not inference:
            inner = fn

            def fn() -> Any:
                with torch.inference_mode(False):
                    return inner()

        def done(result: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self.submit(fn, done)
        return fut


class ModelWorker(_Calls):
    """A thread of the model's own (a GPU model: its CUDA stream)."""

    def __init__(self, name: str, device: torch.device, loop: asyncio.AbstractEventLoop, threads: int = 0):
        self.device = device
        self.threads = threads  # torch intra-op threads on this thread; 0 leaves torch's default
        self._loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"model:{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run fn() on the thread; done(result, error) is then called on the event loop."""
        self._jobs.put((fn, done))

    def stop(self) -> None:
        """Finish the jobs already given, then end the thread."""
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        if self.threads > 0:
            # per thread: OpenMP keeps the team size in each thread's own settings, so the
            # main thread's (or the environment's) count would not reach this one otherwise
            torch.set_num_threads(self.threads)
        stream_ctx = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            stream_ctx = torch.cuda.stream(torch.cuda.Stream(self.device))
            stream_ctx.__enter__()
        mode = torch.inference_mode()
        mode.__enter__()
        try:
            self._serve()
        finally:
            mode.__exit__(None, None, None)
            if stream_ctx is not None:
                stream_ctx.__exit__(None, None, None)

    def _serve(self) -> None:
        """Run jobs in order; keep one Pending job's device work overlapped with the next job's start.

        A job that returns a ``Pending`` has queued its work on the device
        without waiting for it.  Before finishing it (waiting), the worker
        starts the next job if one is already queued, so the device goes
        from one batch to the next without idling while this thread copies,
        splits and hands results back.
        """
        call_soon = self._loop.call_soon_threadsafe
        held: tuple[Pending, Callable] | None = None  # started, not yet finished
        stopping = False
        while True:
            if held is None:
                if stopping:
                    return
                job = self._jobs.get()
            else:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    job = _NONE
            started: tuple[Pending, Callable] | None = None
            ready: tuple[Callable, Any, BaseException | None] | None = None
            if job is None:
                stopping = True
            elif job is not _NONE:
                fn, done = job
                try:
                    result, error = fn(), None
                except BaseException as e:  # noqa: BLE001 - every failure is answered
                    result, error = None, e
                if error is None and isinstance(result, Pending):
                    started = (result, done)
                else:
                    ready = (done, result, error)
            if held is not None:  # answers go back in the order the jobs came
                pending, done = held
                try:
                    result, error = pending.finish(), None
                except BaseException as e:  # noqa: BLE001
                    result, error = None, e
                if not self._deliver(call_soon, done, result, error):
                    return
            if ready is not None and not self._deliver(call_soon, *ready):
                return
            held = started

    @staticmethod
    def _deliver(call_soon: Callable, done: Callable, result: Any, error: BaseException | None) -> bool:
        try:
            call_soon(done, result, error)
            return True
        except RuntimeError:
            return False  # the loop is closed: nobody is waiting any more


# A freed model's CUDA worker is kept as its device's spare for the next load there: the thread,
# its CUDA stream and its settings are up already.  A reload from the host tier is a ~10 ms copy,
# and starting a thread with its stream was 0.5-0.7 ms of it (docs/benchmarks.md, the hf: reload figures).
# One spare per (device, torch threads, event loop); CPU workers just stop.
_SPARES: dict[tuple[str, int, int], ModelWorker] = {}
_SPARES_LOCK = threading.Lock()


def cpu_pool_size() -> int:
    """Threads of a CPU pool: the cores, and at least 8, so a few models blocked in a long forward
    (or a load waiting on its file) do not hold up the rest."""
    return max(8, os.cpu_count() or 1)


class CpuPool:
    """A bounded set of threads serving the lanes of one event loop's CPU models (see the module
    docstring).  Threads start as work needs them, up to ``size``, and live as long as the pool."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, size: int) -> None:
        self._loop = loop
        self.threads = threads
        self.size = size
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # lanes with a job waiting (None: a thread ends)
        self._workers: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a lane
        self._waiting = 0  # lanes in _ready
        self._lock = threading.Lock()
        self.lanes = 0  # live lanes (guarded by _POOLS_LOCK): the last one to stop ends the pool

    def schedule(self, lane: Lane) -> None:
        with self._lock:
            self._waiting += 1
            if self._waiting > self._idle and len(self._workers) < self.size:
                # more lanes waiting than idle threads: one more thread, up to the bound
                t = threading.Thread(target=self._run, name=f"cpu-pool-{len(self._workers)}", daemon=True)
                self._workers.append(t)
                self._idle += 1
                t.start()
        self._ready.put(lane)

    def stop(self) -> None:
        for _ in self._workers:
            self._ready.put(None)

    def _run(self) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)  # per thread, as ModelWorker._run says
        mode = torch.inference_mode()
        mode.__enter__()
        me = threading.current_thread()

        def alone() -> bool:  # no other lane waits for a thread
            return self._waiting == 0

        try:
            while True:
                lane = self._ready.get()
                if lane is None:
                    return
                with self._lock:
                    self._idle -= 1
                    self._waiting -= 1
                if me.name != lane.thread_name:
                    me.name = lane.thread_name  # what a forward sees, as on a thread of its own
                try:
                    # while no other lane waits, this one's next jobs run here without a trip
                    # through the queue (a busy model alone costs what a thread of its own did)
                    while lane.run_one(keep=alone):
                        pass
                finally:
                    with self._lock:
                        self._idle += 1
        finally:
            mode.__exit__(None, None, None)


class Lane(_Calls):
    """One CPU model's worker on its loop's ``CpuPool``: its jobs run one at a time, in order."""

    def __init__(self, name: str, device: torch.device, pool: CpuPool) -> None:
        self.device = device
        self.threads = pool.threads
        self.thread_name = f"model:{name}"
        self._loop = pool._loop
        self._pool = pool
        self._jobs: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._stopped = threading.Event()

    def submit(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        self._push((fn, done))

    def _push(self, job: tuple[Callable, Callable] | None) -> None:
        """Queue a job (None: the lane's end); put the lane in line unless it is there already."""
        with self._lock:
            self._jobs.append(job)
            if self._scheduled:
                return
            self._scheduled = True
        self._pool.schedule(self)

    def run_one(self, keep: Callable[[], bool] = lambda: False) -> bool:
        """On a pool thread: the lane's next job.  Then, if it has more: True (the caller runs the
        next one too) when ``keep()`` says no other lane waits, else it goes back in line."""
        with self._lock:
            job = self._jobs.popleft()
        if job is None:
            self._stopped.set()
            _lane_gone(self._pool)
        else:
            fn, done = job
            try:
                result, error = fn(), None
                if isinstance(result, Pending):
                    result = result.finish()
            except BaseException as e:  # noqa: BLE001 - every failure is answered
                result, error = None, e
            ModelWorker._deliver(self._loop.call_soon_threadsafe, done, result, error)
        if job is None:
            return False
        with self._lock:
            again = self._scheduled = bool(self._jobs)
        if again:
            if keep():
                return True
            self._pool.schedule(self)
        return False

    def stop(self) -> None:
        """Finish the jobs already given; then ``join`` returns."""
        self._push(None)

    def join(self, timeout: float | None = None) -> None:
        self._stopped.wait(timeout)


_POOLS: dict[tuple[int, int], CpuPool] = {}  # (id(loop), torch threads) -> its CPU pool
_POOLS_LOCK = threading.Lock()


def _cpu_pool(loop: asyncio.AbstractEventLoop, threads: int) -> CpuPool:
    """The loop's pool for a new lane (counted: the pool lives while it has lanes)."""
    with _POOLS_LOCK:
        pool = _POOLS.get((id(loop), threads))
        if pool is None or pool._loop is not loop:
            pool = _POOLS[(id(loop), threads)] = CpuPool(loop, threads, cpu_pool_size())
        pool.lanes += 1
        return pool


def _lane_gone(pool: CpuPool) -> None:
    """A lane stopped; with none left the pool's threads end (an idle engine holds no CPU threads)."""
    with _POOLS_LOCK:
        pool.lanes -= 1
        if pool.lanes > 0:
            return
        key = (id(pool._loop), pool.threads)
        if _POOLS.get(key) is pool:
            del _POOLS[key]
    pool.stop()


def take_worker(name: str, device: torch.device, loop: asyncio.AbstractEventLoop,
                threads: int = 0) -> ModelWorker | Lane:
    """A worker for a model being loaded: a lane on the loop's CPU pool for a CPU model; on a GPU
    its device's spare when there is one, else a new thread."""
    if device.type == "cpu":
        return Lane(name, device, _cpu_pool(loop, threads))
    if device.type == "cuda":
        with _SPARES_LOCK:
            spare = _SPARES.pop((str(device), threads, id(loop)), None)
        if spare is not None:
            if spare._loop is loop and spare._thread.is_alive():
                spare._thread.name = f"model:{name}"
                return spare
            spare.stop()
    return ModelWorker(name, device, loop, threads)


def give_back(worker: ModelWorker | Lane) -> None:
    """A freed model's worker (its jobs done): kept as its device's spare, else stopped."""
    if isinstance(worker, ModelWorker) and worker.device.type == "cuda" and worker._thread.is_alive() \
            and not worker._loop.is_closed():
        key = (str(worker.device), worker.threads, id(worker._loop))
        with _SPARES_LOCK:
            if key not in _SPARES:
                _SPARES[key] = worker
                return
    worker.stop()


def stop_spares(loop: asyncio.AbstractEventLoop) -> None:
    """The spares of an engine's loop, stopped (the engine closes).  CPU pools end by themselves
    with their last lane."""
    with _SPARES_LOCK:
        keys = [k for k in _SPARES if k[2] == id(loop)]
        spares = [_SPARES.pop(k) for k in keys]
    for w in spares:
        w.stop()


class Pending:
    """A job whose device work is queued; finish() waits for it and returns the job's result."""

    __slots__ = ("finish",)

    def __init__(self, finish: Callable[[], Any]):
        self.finish = finish


_NONE = object()  # "no job queued right now"
