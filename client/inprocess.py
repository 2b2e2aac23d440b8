"""The in-process path of ``Model`` (no URL): the engine running in this process, or one
started here from a config file on a thread of its own.

This is the one client module that reaches the engine, and only when called: importing
``modelconsole.client`` (and every call with a URL) loads neither torch nor the engine.
When an engine already runs here (``scheduler/running.py``, torch-free to ask), torch is
loaded already; only ``config=`` start-up imports the engine (``_start``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from modelconsole.scheduler import running, textenc, wire

_STARTED: dict[str, tuple[Any, asyncio.AbstractEventLoop]] = {}
_LOCK = threading.Lock()


def local_engine(config: str | None) -> tuple[Any, asyncio.AbstractEventLoop]:
    """The newest engine running in this process; else one started here from ``config``, on a
    thread of its own (it serves until the process ends)."""
    found = running.running()
    if found is not None:
        return found
    if config is None:
        raise RuntimeError("no engine runs in this process: give Model(url=...) for a server, or "
                           "config=PATH to start one here")
    path = os.path.abspath(config)
    with _LOCK:
        if path not in _STARTED:
            _STARTED[path] = _start(path)
        return _STARTED[path]


async def local_infer(engine: Any, name: str, version: str | None, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One call on ``engine``'s loop; tensors cross by reference (numpy arrays are wrapped, not
    copied), the outputs come back as numpy."""
    import torch  # loaded already: an engine runs in this process

    if textenc.TEXT in inputs:  # a text model: tokenized here, as a front end does
        plan = engine.instance(name, version).text_plan
        if plan is not None:
            inputs = await textenc.encode(plan, dict(inputs))
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(wire.as_array(v)))
               for k, v in inputs.items()}
    result = await engine.infer(name, tensors, version=version)
    return {k: v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in result.outputs.items()}


def _start(path: str) -> tuple[Any, asyncio.AbstractEventLoop]:
    # the one place the client imports the engine: Model(config=) asks for one in this process
    from modelconsole.scheduler.config import load_config
    from modelconsole.scheduler.engine import Engine

    config = load_config(path)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="modelconsole-engine", daemon=True).start()

    async def start() -> Any:
        eng = Engine.from_config(config)
        await eng.start(config.models)
        return eng

    started: Any = asyncio.run_coroutine_threadsafe(start(), loop).result()
    return started, loop
