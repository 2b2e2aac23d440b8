"""``modelconsole.client.Model`` (issue 18, item 1): one handle, in process or over the wire, with a
real server on a loopback port: identical outputs both ways, the same error class and message,
``predict_batches``, and a reference rebuilt in another process (which imports no torch to use it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from serverutil import ServerThread

from modelconsole.client import Model
from modelconsole.scheduler.errors import InputError, ModelNotFound

TINY = {"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0, "device": "cpu"}


def test_in_process_and_remote_predict_give_the_same_outputs_and_errors(tmp_path):
    with ServerThread(tmp_path, models=[TINY]) as srv:  # an engine running in this process, and its server
        local, remote = Model("tiny"), Model("tiny", url=srv.url)
        x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
        a, b = local.predict({"input": x}), remote.predict({"input": x})
        assert set(a) == set(b) == {"logits"} and a["logits"].dtype == np.float32
        np.testing.assert_array_equal(a["logits"], b["logits"])
        np.testing.assert_array_equal(remote.predict({"input": torch.from_numpy(x)})["logits"], b["logits"])
        for bad, cls, message in ((Model("nope"), ModelNotFound, "unknown model 'nope'"),
                                  (Model("nope", url=srv.url), ModelNotFound, "unknown model 'nope'")):
            with pytest.raises(cls) as e:
                bad.predict({"input": x})
            assert e.value.message == message
        wrong = {"input": np.zeros((1, 3), np.float32)}
        errors = []
        for m in (local, remote):
            with pytest.raises(InputError) as e:
                m.predict(wrong)
            errors.append((type(e.value), e.value.message, e.value.status))
        assert errors[0] == errors[1]
        # async too, on a loop that is not the engine's
        out = asyncio.run(remote.apredict({"input": x}))
        np.testing.assert_array_equal(out["logits"], b["logits"])
        out = asyncio.run(local.apredict({"input": x}))
        np.testing.assert_array_equal(out["logits"], b["logits"])


def test_predict_batches_splits_the_answers_back_in_order(tmp_path):
    with ServerThread(tmp_path, models=[TINY]) as srv:
        m = Model("tiny", url=srv.url)
        rng = np.random.default_rng(1)
        items = [{"input": rng.standard_normal((n, 64), dtype=np.float32)} for n in (1, 2, 3, 1, 2)]
        outs = list(m.predict_batches(items, batch_size=2))
        assert [o["logits"].shape[0] for o in outs] == [1, 2, 3, 1, 2]
        for item, out in zip(items, outs):
            # a tolerance, not bits: an item rides in another batch than when it is sent alone, and a
            # kernel may sum in another order for another batch size (float32: a few ulps)
            np.testing.assert_allclose(out["logits"], m.predict(item)["logits"], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="batch_size: expected at least 1"):
            list(m.predict_batches(items, 0))


def test_a_reference_becomes_a_working_handle_in_another_process(tmp_path):
    with ServerThread(tmp_path, models=[TINY]) as srv:
        m = Model("tiny", url=srv.url, token="not-in-the-ref")
        ref = m.to_ref()
        assert ref == {"name": "tiny", "version": None, "url": srv.url}
        x = np.random.default_rng(2).standard_normal((2, 64), dtype=np.float32)
        want = m.predict({"input": x})["logits"]
        code = textwrap.dedent("""
            import json, sys
            import numpy as np
            from modelconsole.client import Model
            m = Model.from_ref(json.loads(sys.argv[1]))
            x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
            out = m.predict({"input": x})["logits"]
            print(json.dumps({"logits": out.tolist(), "torch": "torch" in sys.modules}))
        """)
        p = subprocess.run([sys.executable, "-c", code, json.dumps(ref), json.dumps(x.tolist())],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout)
        assert got["torch"] is False  # the remote path needs numpy only
        np.testing.assert_allclose(np.array(got["logits"], dtype=np.float32), want, rtol=1e-6)
    with pytest.raises(ValueError, match="not a model reference"):
        Model.from_ref({"name": "tiny", "weights": "..."})
    with pytest.raises(ValueError, match="url: expected http"):
        Model("tiny", url="ftp://127.0.0.1:9")


def test_without_a_running_engine_a_config_starts_one_lazily(tmp_path):
    """In a fresh process: no engine runs; Model(config=...) starts one on a thread of its own."""
    (tmp_path / "mc.toml").write_text('[[models]]\nname = "tiny"\nsource = "zoo:tiny-mlp"\nwarmup = 0\n'
                                      'device = "cpu"\n')
    code = textwrap.dedent(f"""
        import json
        import numpy as np
        from modelconsole.client import Model
        try:
            Model("tiny").predict({{"input": np.zeros((1, 64), np.float32)}})
        except RuntimeError as e:
            said = str(e)
        m = Model("tiny", config={str(tmp_path / "mc.toml")!r})
        out = m.predict({{"input": np.zeros((1, 64), np.float32)}})["logits"]
        again = Model.from_ref(m.to_ref()).predict({{"input": np.zeros((1, 64), np.float32)}})["logits"]
        print(json.dumps({{"said": said, "shape": list(out.shape), "same": bool((out == again).all())}}))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert "no engine runs in this process" in got["said"]
    assert got["shape"] == [1, 10] and got["same"]
