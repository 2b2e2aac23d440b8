"""``remote:URL`` models (issue 18, item 2), with two real servers on loopback ports: an engine
whose model forwards to another modelconsole over KServe V2 (binary tensors) — answers equal to
the remote's, a split between a local version and a remote one, the remote killed and
restarted (502 naming it, then the circuit's 503 with Retry-After, then closed again), other
tensors than registered (502), a URL that is not http(s) (refused), and a token that is never
shown."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from serverutil import ServerThread

from modelconsole.scheduler import remote
from modelconsole.scheduler.config import ConfigError
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import ModelUnavailable, RemoteError
from modelconsole.scheduler.instance import LoadFailed
from modelconsole.scheduler.store import Store
from modelconsole.scheduler.tensors import TensorSpec
from modelconsole.server.web import ServerSettings

TINY = {"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0, "device": "cpu"}


def remote_of(srv: ServerThread, **kw) -> dict:
    return {"name": "tiny", "source": f"remote:{srv.url}", "warmup": 0, "max_batch_size": 8, **kw}


async def test_a_remote_model_answers_what_the_remote_computes(tmp_path):
    with ServerThread(tmp_path / "a", models=[TINY]) as far:
        async with Engine(Store(tmp_path / "near.db"), base_dir=str(tmp_path)) as near:
            snap = await near.register(remote_of(far, token="s3cret-token", timeout_s=10))
            x = {"input": torch.randn(3, 64)}
            got = (await near.infer("tiny", x)).outputs["logits"]
            want = far.call(lambda: far.engine.infer("tiny", x)).outputs["logits"]
            torch.testing.assert_close(got, want)
            m = near.snapshot_models("tiny")[0]
            assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
            assert m["device_label"] == "→" + far.hostport and m["footprint_bytes"] == 0
            assert m["device_index"] is None  # no GPU budget of ours
            assert m["remote"]["url"] == far.url and m["remote"]["circuit"] == "closed"
            assert m["remote"]["last_call_ms"] >= m["remote"]["last_remote_ms"] > 0  # the remote says its share
            from modelconsole.console import describe

            text = describe.text(m, None, [], [])
            assert f"── remote\n  {far.url} · model tiny" in text and "s3cret" not in text
            assert " ms = network " in text and " ms + remote " in text
            # the token is never shown: snapshot, register answer, audit log
            assert snap["config"]["token"] == "***" and m["config"]["token"] == "***"
            audit = await near.audit_log(10, "tiny")
            assert "s3cret-token" not in json.dumps(audit) and "s3cret-token" not in json.dumps(m)
        # ...but it is kept for a restart (the store, not the API)
        async with Engine(Store(tmp_path / "near.db"), base_dir=str(tmp_path)) as again:
            assert (await again.infer("tiny", x)).outputs["logits"].shape == (3, 10)
            assert again.instance("tiny").cfg.token == "s3cret-token"


async def test_a_split_between_a_local_and_a_remote_version(tmp_path):
    """zoo models have deterministic weights: the local v1 and the remote's tiny answer alike."""
    with ServerThread(tmp_path / "a", models=[TINY]) as far:
        async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as near:
            await near.register(dict(TINY, version="1"))
            await near.register(remote_of(far, version="2"))
            await near.set_split("tiny", {"1": 50, "2": 50})
            x = {"input": torch.randn(1, 64)}
            answers = await asyncio.gather(*(near.infer("tiny", x) for _ in range(40)))
            versions = {a.version for a in answers}
            assert versions == {"1", "2"}
            for a in answers:
                torch.testing.assert_close(a.outputs["logits"], answers[0].outputs["logits"])
            arms = near.routing("tiny")["arms"]
            assert arms["1"]["requests"] > 0 and arms["2"]["requests"] > 0 and not arms["2"]["errors"]


async def test_the_remote_killed_and_restarted(tmp_path):
    far = ServerThread(tmp_path / "a", models=[TINY]).__enter__()
    port = far.server.port if hasattr(far.server, "port") else int(far.url.rsplit(":", 1)[1])
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as near:
        await near.register(remote_of(far, name="far", model="tiny", timeout_s=5))
        await near.register(dict(TINY, name="local"))
        x = {"input": torch.randn(1, 64)}
        await near.infer("far", x)
        far.__exit__(None, None, None)  # the remote dies
        for _ in range(remote.CIRCUIT_FAILURES):
            with pytest.raises(RemoteError, match=f"cannot reach the remote 127.0.0.1:{port}"):
                await near.infer("far", x)
        with pytest.raises(ModelUnavailable, match="failed 5 times in a row") as e:
            await near.infer("far", x)  # the circuit is open: no call, 503 with Retry-After
        assert e.value.status == 503 and e.value.retry_after and e.value.retry_after > 0
        assert (await near.infer("local", x)).outputs["logits"].shape == (1, 10)  # others unaffected
        failures = near.snapshot_models("far")[0]["stats"]["failures"]
        assert failures == {"remote_error": 5, "unavailable": 1}
        # the remote comes back on its port; once the open period is over, one trial call closes it
        back = ServerThread(tmp_path / "b", models=[TINY], settings=ServerSettings(port=port)).__enter__()
        try:
            module = near.instance("far")._module
            module.circuit.open_s = 0.0  # the open period, over now (instead of waiting 5 s)
            assert (await near.infer("far", x)).outputs["logits"].shape == (1, 10)
            assert module.circuit.state == "closed"
        finally:
            back.__exit__(None, None, None)


def test_other_tensors_than_registered_are_a_502_naming_the_remote(tmp_path):
    with ServerThread(tmp_path / "a", models=[TINY]) as far:
        target = remote.Target(far.url, "tiny", None, None, 5.0)
        wrong = remote.RemoteModule(target, (TensorSpec("input", "FP32", (-1, 64)),),
                                    (TensorSpec("probs", "FP32", (-1, 10)),), "m v1")
        with pytest.raises(RemoteError, match=rf"the remote {far.hostport} answered 400 \(invalid_input\): "
                                              r"unknown output 'probs' \(model outputs: logits\)") as e:
            wrong(torch.randn(2, 64))
        assert e.value.status == 502
        shaped = remote.RemoteModule(target, (TensorSpec("input", "FP32", (-1, 64)),),
                                     (TensorSpec("logits", "FP32", (-1, 12)),), "m v1")
        with pytest.raises(RemoteError, match=r"answered 'logits' as FP32 \[2, 10\]; registered FP32 \[-1, 12\]"):
            shaped(torch.randn(2, 64))
        bad_input = remote.RemoteModule(target, (TensorSpec("input", "FP32", (-1, 63)),),
                                        (TensorSpec("logits", "FP32", (-1, 10)),), "m v1")
        with pytest.raises(RemoteError, match=r"answered 400 \(invalid_input\)"):
            bad_input(torch.randn(2, 63))


async def test_bad_remote_settings_are_refused_at_registration(tmp_path):
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as near:
        for source, message in (("remote:ftp://127.0.0.1:9", "remote:http\\(s\\)://HOST"),
                                ("remote:http://127.0.0.1:9/v2/models", "no path, query or credentials"),
                                ("remote:http://user:pw@127.0.0.1:9", "no path, query or credentials")):
            with pytest.raises(ConfigError, match=message):  # the API's 400
                await near.register({"name": "r", "source": source})
        with pytest.raises(ConfigError, match="token_env: only used with remote: sources"):
            await near.register(dict(TINY, token_env="X"))
        with pytest.raises(ConfigError, match="a remote model runs on its server"):
            await near.register({"name": "r", "source": "remote:http://127.0.0.1:9", "device": "cuda"})
        # nothing listens there: registration is fine (no I/O), the load says why
        await near.register({"name": "r", "source": "remote:http://127.0.0.1:9", "warmup": 0})
        with pytest.raises(LoadFailed, match="cannot reach 127.0.0.1:9"):
            await near.load("r")
        await near.register({"name": "e", "source": "remote:http://127.0.0.1:9",
                             "token_env": "MODELCONSOLE_REMOTE_NO_SUCH_VAR"})
        with pytest.raises(LoadFailed, match="token_env MODELCONSOLE_REMOTE_NO_SUCH_VAR is not set"):
            await near.load("e")


async def test_a_registration_cannot_choose_which_secret_leaves_nor_where_it_goes(tmp_path, monkeypatch):
    """token_env reads only what the config allows; metadata and link-local hosts are refused unless
    [security] remote_hosts lists them; the rules hold again at load (a changed config, a name that
    now resolves elsewhere).  Each refusal is the API's 403 naming the rule, and nothing is stored."""
    from modelconsole.scheduler.config import parse_config
    from modelconsole.scheduler.errors import Forbidden

    monkeypatch.setenv("PATH_LIKE_SECRET", "s3cr3t")
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as near:
        refused = [
            ({"token_env": "PATH"}, "token_env PATH: a remote model may read only"),
            ({"token_env": "PATH_LIKE_SECRET"}, r"token_env_prefix \('MODELCONSOLE_REMOTE_'\)"),
            ({"source": "remote:http://169.254.169.254"}, "169.254.169.254 is a link-local address"),
            ({"source": "remote:http://[fe80::1]:8000"}, "link-local"),
            ({"source": "remote:http://metadata.google.internal"}, "cloud metadata service"),
            ({"source": "remote:http://0.0.0.0:8000"}, "unspecified"),
            ({"source": "remote:http://224.0.0.1:8000"}, "multicast"),
        ]
        for extra, message in refused:
            with pytest.raises(Forbidden, match=message) as e:
                await near.register({"name": "r", "source": "remote:http://127.0.0.1:9", **extra})
            assert e.value.status == 403 and "[security]" in e.value.message
        assert "r" not in near.model_names()
    # the config may allow them, by name, prefix or range
    raw = {"security": {"token_env": ["PATH_LIKE_SECRET"], "token_env_prefix": "PARTNER_",
                        "remote_hosts": ["169.254.0.0/16", "metadata.google.internal"]}}
    trust = parse_config(raw, str(tmp_path)).trust
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu", trust=trust) as near:
        for i, extra in enumerate(({"token_env": "PATH_LIKE_SECRET"}, {"token_env": "PARTNER_A"},
                                   {"source": "remote:http://169.254.10.1:9"},
                                   {"source": "remote:http://metadata.google.internal"})):
            await near.register({"name": f"ok{i}", "source": "remote:http://127.0.0.1:9", "warmup": 0, **extra})
        with pytest.raises(Forbidden, match="token_env MODELCONSOLE_REMOTE_X"):  # the prefix replaced
            await near.register({"name": "x", "source": "remote:http://127.0.0.1:9",
                                 "token_env": "MODELCONSOLE_REMOTE_X"})
    # a name that resolves to a refused address is refused at load, before any call (or token) goes out
    import socket

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("169.254.169.254", *a, **k)
                        if host == "innocent.example" else real(host, *a, **k))
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as near:
        await near.register({"name": "dns", "source": "remote:http://innocent.example:8000", "warmup": 0})
        with pytest.raises(LoadFailed, match="innocent.example is 169.254.169.254, a link-local address"):
            await near.load("dns")
