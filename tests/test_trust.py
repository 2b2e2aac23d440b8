"""The trust boundary over real HTTP: what a control call may make the server run or unpickle.

Every attack here would leave a marker file behind if it ran; each test
asserts the refusal (status and a message naming the rule) and that the
marker never appeared.  The archives are real files of each format with a
pickle payload planted where the format's loader would read it.
"""

from __future__ import annotations

import json
import os
import pickle
import textwrap
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from serverutil import ServerThread

from modelconsole.scheduler.config import ConfigError, parse_config
from modelconsole.scheduler.sources import SourceError, load_model

SPECS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


class _Payload:
    """Unpickling this runs ``touch marker``: proof that a loader unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=2)


def replace_in_zip(src: Path, dst: Path, suffix: str, data: bytes) -> None:
    """Copy the zip archive src to dst with every member ending in suffix replaced by data."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        hit = False
        for name in zin.namelist():
            body = zin.read(name)
            if name.endswith(suffix):
                body, hit = data, True
            zout.writestr(name, body)
    assert hit, f"no member ending in {suffix} in {zin.namelist()}"


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def call(url: str, method: str = "POST", body: dict | None = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "models"
    r.mkdir()
    return r


# ------------------------------------------------------------------ factories


@pytest.mark.parametrize("factory", ["os:system", "subprocess:getoutput", "builtins:eval", "posix:system"])
def test_a_control_call_cannot_name_an_arbitrary_function(root, factory):
    marker = root / "pwned"
    save_file({"w": torch.zeros(1)}, str(root / "w.safetensors"))
    with ServerThread(root, models=[]) as srv:
        status, body = call(srv.server.url + "/api/models", body={
            "name": "evil", "source": "safetensors:w.safetensors",
            "options": {"factory": factory, "args": {"command": f"touch {marker}"}, **SPECS}})
        assert status == 403, body
        assert "a factory must be a Python file inside a model root" in body["error"]
        assert "[security] factories" in body["error"]
        assert srv.call(lambda: _names(srv)) == []  # nothing registered, nothing stored
        status, _ = call(srv.server.url + "/api/models/evil/load")
        assert status == 404
    assert not marker.exists()


async def _names(srv: ServerThread) -> list[str]:
    return srv.engine.model_names() + [m["name"] for m in await srv.engine.store.models()]


def test_a_factory_in_the_root_cannot_reach_through_its_imports(root):
    """``mymodel:os.system`` passes the file rule (mymodel.py is in the root) but the callable is
    not defined there: refused at load, before it is called."""
    marker = root / "pwned"
    (root / "mymodel.py").write_text("import os\nimport torch\n\ndef make():\n    return torch.nn.Identity()\n")
    save_file({"w": torch.zeros(1)}, str(root / "w.safetensors"))
    with ServerThread(root, models=[]) as srv:
        status, body = call(srv.server.url + "/api/models", body={
            "name": "sneaky", "source": "safetensors:w.safetensors",
            "options": {"factory": "mymodel:os.system", "args": {"command": f"touch {marker}"}, **SPECS}})
        if status == 201:  # the file rule passed at registration; the load must refuse
            status, body = call(srv.server.url + "/api/models/sneaky/load")
        assert status in (403, 500), body
        assert "is defined in" in body["error"] and "not in mymodel" in body["error"], body
    assert not marker.exists()


def test_a_private_attribute_path_is_refused(root):
    (root / "mymodel.py").write_text("def make():\n    pass\n")
    save_file({"w": torch.zeros(1)}, str(root / "w.safetensors"))
    with ServerThread(root, models=[]) as srv:
        status, body = call(srv.server.url + "/api/models", body={
            "name": "x", "source": "safetensors:w.safetensors",
            "options": {"factory": "mymodel:__builtins__.eval", **SPECS}})
        assert status in (400, 403), body
        assert "__builtins__" in body["error"]


def test_a_factory_file_outside_the_roots_is_refused(tmp_path, root):
    """A module next to the config but outside every model root: the file rule says no."""
    (tmp_path / "outside.py").write_text("import torch\ndef make():\n    return torch.nn.Identity()\n")
    save_file({}, str(root / "w.safetensors"))
    config = {"model_roots": ["models"], "models": [{
        "name": "m", "source": "safetensors:models/w.safetensors", "factory": "outside:make", **SPECS}]}
    cfg = parse_config(config, str(tmp_path)).models[0]
    with pytest.raises(SourceError, match="refused: a factory must be a Python file inside a model root"):
        load_model(cfg, torch.device("cpu"))


def test_the_allowlist_admits_what_the_operator_listed(tmp_path):
    """``[security] factories``: an exact callable, or a whole module (its submodules included)."""
    save_file({"weight": torch.eye(4), "bias": torch.zeros(4)}, str(tmp_path / "lin.safetensors"))
    model = {"name": "lin", "source": "safetensors:lin.safetensors", "factory": "torch.nn:Linear",
             "args": {"in_features": 4, "out_features": 4}, **SPECS}
    refused = parse_config({"models": [model]}, str(tmp_path)).models[0]
    with pytest.raises(SourceError, match="refused"):
        load_model(refused, torch.device("cpu"))
    for allow in (["torch.nn:Linear"], ["torch.nn"]):
        cfg = parse_config({"security": {"factories": allow}, "models": [model]}, str(tmp_path)).models[0]
        loaded = load_model(cfg, torch.device("cpu"))
        assert torch.equal(loaded.module(torch.ones(2, 4)), torch.ones(2, 4))
    other = parse_config({"security": {"factories": ["torch.nn:Linear"]},
                          "models": [dict(model, factory="torch.nn:Bilinear")]}, str(tmp_path)).models[0]
    with pytest.raises(SourceError, match="refused"):
        load_model(other, torch.device("cpu"))


def test_the_allowlist_is_checked_in_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"security.factories\[0\]: expected"):
        parse_config({"security": {"factories": ["os system"]}}, str(tmp_path))
    with pytest.raises(ConfigError, match="security.factories: expected a list"):
        parse_config({"security": {"factories": "os:system"}}, str(tmp_path))


def test_registered_factories_are_rechecked_at_restore(tmp_path, root):
    """A row written to the store before the rule existed does not come back as a loadable model."""
    import asyncio

    from modelconsole.scheduler.engine import Engine
    from modelconsole.scheduler.store import Store

    save_file({"w": torch.zeros(1)}, str(root / "w.safetensors"))

    async def scenario() -> list[str]:
        async with Store(tmp_path / "s.db") as store:
            await store.save_model({"name": "old", "version": "1", "source": "safetensors:w.safetensors",
                                    "factory": "os:system", **SPECS}, "test", "1")
        async with Engine(Store(tmp_path / "s.db"), base_dir=str(root), default_device="cpu") as engine:
            return [e.kind for e in engine.events.recent if e.kind == "restore_failed"] + engine.model_names()

    assert asyncio.run(scenario()) == ["restore_failed"]


# ------------------------------------------------------------------ malicious archives


def test_a_pickle_in_an_export_program_is_never_loaded_from_an_untrusted_root(root):
    marker = root / "pwned"
    ep = torch.export.export(Double(), (torch.randn(2, 4),))
    torch.export.save(ep, str(root / "good.pt2"))
    replace_in_zip(root / "good.pt2", root / "evil.pt2", "sample_inputs/model.pt", pickle_payload(marker))
    with ServerThread(root, models=[]) as srv:
        status, body = call(srv.server.url + "/api/models", body={"name": "evil", "source": "export:evil.pt2"})
        assert status == 403, body
        assert "trusted = true" in body["error"]
        status, body = call(srv.server.url + "/v2/models/evil/infer", body={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
        assert status == 404
    assert not marker.exists()


def test_an_export_program_loads_from_a_trusted_root_and_says_so(tmp_path, root):
    ep = torch.export.export(Double(), (torch.randn(2, 4),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    torch.export.save(ep, str(root / "double.pt2"))
    models = [{"name": "double", "source": "export:models/double.pt2", "warmup": 0}]
    extra = {"model_roots": [{"path": "models", "trusted": True}]}
    with ServerThread(tmp_path, models=models, extra=extra) as srv:
        # its tensors are known before its first load (read from the archive's graph, nothing
        # unpickled): what perf_analyzer reads first is complete
        status, meta = call(srv.server.url + "/v2/models/double", "GET")
        assert status == 200 and meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "output0", "datatype": "FP32", "shape": [-1, 4]}]
        status, config = call(srv.server.url + "/v2/models/double/config", "GET")
        assert status == 200 and [i["name"] for i in config["input"]] == ["x"], config
        assert srv.engine.instance("double").state == "UNLOADED"
        status, body = call(srv.server.url + "/v2/models/double/infer", body={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
        assert status == 200, body
        assert body["outputs"][0]["data"] == [2, 4, 6, 8]
        with urllib.request.urlopen(srv.server.url + "/v1/models") as r:
            listed = json.loads(r.read())
        assert listed["data"][0]["versions"][0]["trusted"] is True


def test_a_pickle_in_a_torchscript_archive_is_refused(root):
    """TorchScript's own unpickler knows TorchScript types only: a Python global is an error."""
    marker = root / "pwned"
    torch.jit.save(torch.jit.script(Double()), str(root / "good.pt"))
    replace_in_zip(root / "good.pt", root / "evil.pt", "data.pkl", pickle_payload(marker))
    with ServerThread(root, models=[]) as srv:
        status, body = call(srv.server.url + "/api/models",
                            body={"name": "evil", "source": "torchscript:evil.pt", "options": SPECS})
        assert status == 201, body
        status, body = call(srv.server.url + "/api/models/evil/load")
        assert status == 500 and "not a loadable TorchScript archive" in body["error"], body
    assert not marker.exists()


def test_a_pickle_posing_as_safetensors_is_refused(root):
    marker = root / "pwned"
    (root / "net.py").write_text(textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Linear(4, 4)
    """))
    (root / "evil.safetensors").write_bytes(pickle_payload(marker))
    # a torch.save file (a zip holding data.pkl) renamed to .safetensors: the same refusal
    torch.save({"weight": torch.zeros(4, 4)}, str(root / "zipped.safetensors"))
    with ServerThread(root, models=[]) as srv:
        for name in ("evil", "zipped"):
            status, body = call(srv.server.url + "/api/models", body={
                "name": name, "source": f"safetensors:{name}.safetensors", "options": {"factory": "net:make", **SPECS}})
            assert status == 201, body
            status, body = call(srv.server.url + f"/api/models/{name}/load")
            assert status == 500 and "not a readable safetensors file" in body["error"], body
    assert not marker.exists()
