"""One worker thread per loaded model instance: the only place its torch code runs.

The event loop never runs torch (forward passes, loads, copies): it hands a
job to the model's thread and gets the answer back through one
``call_soon_threadsafe`` per job — per *batch*, not per request, which is
what keeps the loop cheap under load.  On a GPU the thread owns a CUDA
stream of its own, so several models on one device run concurrently.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch


class ModelWorker:
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


def take_worker(name: str, device: torch.device, loop: asyncio.AbstractEventLoop, threads: int = 0) -> ModelWorker:
    """A worker for a model being loaded: its device's spare when there is one, else a new one."""
    if device.type == "cuda":
        with _SPARES_LOCK:
            spare = _SPARES.pop((str(device), threads, id(loop)), None)
        if spare is not None:
            if spare._loop is loop and spare._thread.is_alive():
                spare._thread.name = f"model:{name}"
                return spare
            spare.stop()
    return ModelWorker(name, device, loop, threads)


def give_back(worker: ModelWorker) -> None:
    """A freed model's worker (its jobs done): kept as its device's spare, else stopped."""
    if worker.device.type == "cuda" and worker._thread.is_alive() and not worker._loop.is_closed():
        key = (str(worker.device), worker.threads, id(worker._loop))
        with _SPARES_LOCK:
            if key not in _SPARES:
                _SPARES[key] = worker
                return
    worker.stop()


def stop_spares(loop: asyncio.AbstractEventLoop) -> None:
    """The spares of an engine's loop, stopped (the engine closes)."""
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
