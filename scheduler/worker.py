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
from typing import Any, Callable

import torch


class ModelWorker:
    def __init__(self, name: str, device: torch.device, loop: asyncio.AbstractEventLoop):
        self.device = device
        self._loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"model:{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run fn() on the thread; done(result, error) is then called on the event loop."""
        self._jobs.put((fn, done))

    def call(self, fn: Callable[[], Any], inference: bool = False) -> "asyncio.Future[Any]":
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
        stream_ctx = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            stream_ctx = torch.cuda.stream(torch.cuda.Stream(self.device))
            stream_ctx.__enter__()
        call_soon = self._loop.call_soon_threadsafe
        mode = torch.inference_mode()
        mode.__enter__()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                fn, done = job
                try:
                    result, error = fn(), None
                except BaseException as e:  # noqa: BLE001 - every failure is answered
                    result, error = None, e
                try:
                    call_soon(done, result, error)
                except RuntimeError:
                    return  # the loop is closed: nobody is waiting any more
        finally:
            mode.__exit__(None, None, None)
            if stream_ctx is not None:
                stream_ctx.__exit__(None, None, None)
