"""A load runs on a thread of its own at a lower CPU priority (sources.LOAD_NICE), so a hot swap's
load on busy cores yields to the requests being served; the model's forward passes then run on
its worker thread at the normal priority.  Linux only (nice is per thread there).

The probe is a real safetensors model whose factory and forward record the thread they run on and
its nice value; it goes through the engine's normal load and request path.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading

import pytest
import torch
from safetensors.torch import save_file

from modelconsole.scheduler import sources
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import EngineError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")

PROBE = textwrap.dedent('''
    import os
    import threading

    from torch import nn

    SEEN = []


    def _where(what):
        SEEN.append((what, threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            _where("forward")
            return self.fc(x)


    def make():
        _where("factory")
        return Net()


    def broken():
        _where("factory")
        raise RuntimeError("the factory failed on purpose")
''')

SPECS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.fixture
def probe_dir(tmp_path):
    (tmp_path / "prioprobe.py").write_text(PROBE)
    save_file({"fc.weight": torch.ones(3, 8), "fc.bias": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    yield tmp_path
    sys.modules.pop("prioprobe", None)


async def test_a_load_runs_at_low_priority_and_the_forward_at_normal(probe_dir):
    caller = _nice()
    async with Engine(model_roots=[str(probe_dir)], base_dir=str(probe_dir), default_device="cpu") as engine:
        await engine.register({"name": "p", "source": "safetensors:w.safetensors", "factory": "prioprobe:make",
                               "warmup": 1, **SPECS})
        await engine.load("p")
        seen = sys.modules["prioprobe"].SEEN
        factory = [s for s in seen if s[0] == "factory"]
        assert factory and all(name == "load:p:1" and nice >= sources.LOAD_NICE for _, name, nice in factory), seen
        result = await engine.infer("p", {"x": torch.ones(2, 8)})
        assert result.outputs["y"].tolist() == [[8.0] * 3] * 2
        forwards = [s for s in seen if s[0] == "forward"]  # the warmup's and the request's
        assert len(forwards) >= 2 and all(name == "model:p:1" and nice == caller for _, name, nice in forwards), seen
    assert _nice() == caller  # nothing else was lowered


async def test_a_failure_on_the_load_thread_is_the_load_s_answer(probe_dir):
    async with Engine(model_roots=[str(probe_dir)], base_dir=str(probe_dir), default_device="cpu") as engine:
        await engine.register({"name": "b", "source": "safetensors:w.safetensors", "factory": "prioprobe:broken",
                               **SPECS})
        with pytest.raises(EngineError, match="the factory failed on purpose"):
            await engine.load("b")
        assert engine.instance("b").state == "FAILED"
        assert [s[1] for s in sys.modules["prioprobe"].SEEN] == ["load:b:1"]
