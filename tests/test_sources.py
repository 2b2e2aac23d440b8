"""Model sources: the zoo, TorchScript, torch.export and safetensors + factory.

Every round-trip test saves a real module, loads it back through
load_model and compares outputs numerically with the original.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from modelconsole.scheduler import zoo
from modelconsole.scheduler.config import ConfigError, model_from_dict
from modelconsole.scheduler.sources import LoadedModel, SourceError, declared_specs, load_model, resolve_path
from modelconsole.scheduler.tensors import TensorSpec, random_tensor
from modelconsole.scheduler.trust import Trust

# TorchScript is deprecated upstream but still a supported source here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

CPU = torch.device("cpu")
SMALL_ENCODER = {"layers": 2, "d_model": 64, "heads": 4, "seq": 16}
ZOO_CASES = [
    ("tiny-mlp", {}),
    ("small-cnn", {}),
    ("encoder", SMALL_ENCODER),
    ("sized", {"mib": 2}),
]
MLP_SPECS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


def make_cfg(base: Path, roots: tuple[Path, ...] | None = None, trusted: bool | None = None, **raw):
    """A model config under base; export programs need a trusted root, so their roots are
    marked trusted unless ``trusted=False`` (tests/test_trust.py covers the refusal)."""
    raw.setdefault("name", "m")
    roots_s = tuple(str(r) for r in (roots or (base,)))
    if trusted is None:
        trusted = str(raw.get("source", "")).startswith("export:")
    return model_from_dict(raw, base_dir=str(base), model_roots=roots_s,
                           trust=Trust(roots_s, roots_s if trusted else ()))


def inputs_for(specs, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [random_tensor(s, batch=batch, generator=g) for s in specs]


class Net(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TwoInputs(nn.Module):
    """Mixed dtypes, so derived export specs are checked for names and datatypes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(features + self.emb(ids).mean(dim=1))


# ------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name,args", ZOO_CASES)
def test_zoo_builds_are_bit_identical(name, args):
    a, _, _ = zoo.build(name, args)
    b, _, _ = zoo.build(name, args)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # and not trivially identical: the weights are actually random-looking
    w = next(iter(a.parameters()))
    assert w.std() > 0


@pytest.mark.parametrize("name,args", ZOO_CASES)
def test_zoo_output_shapes_match_specs(name, args):
    module, inputs, outputs = zoo.build(name, args)
    assert (inputs, outputs) == zoo.specs(name, args)
    assert not module.training
    for spec in inputs + outputs:
        assert spec.shape[0] == -1
    with torch.inference_mode():
        y = module(*inputs_for(inputs, batch=3))
    assert isinstance(y, torch.Tensor)
    assert y.dtype == torch.float32
    assert outputs[0].accepts_shape(tuple(y.shape))
    assert y.shape[0] == 3
    assert torch.isfinite(y).all()


def test_zoo_specs_follow_args():
    (ids,), (emb,) = zoo.specs("encoder", SMALL_ENCODER)
    assert ids == TensorSpec("input_ids", "INT64", (-1, 16))
    assert emb == TensorSpec("embedding", "FP32", (-1, 64))
    (x,), (y,) = zoo.specs("tiny-mlp", {})
    assert (x.shape, y.shape) == ((-1, 64), (-1, 10))


def test_zoo_sized_holds_the_requested_bytes(tmp_path):
    loaded = load_model(make_cfg(tmp_path, source="zoo:sized", args={"mib": 3}), CPU)
    linear = (16 * 16 + 16) * 4
    assert loaded.weight_bytes == 3 * 2**20 + linear
    assert loaded.platform == "pytorch_zoo"


def test_zoo_load_model_matches_build(tmp_path):
    cfg = make_cfg(tmp_path, source="zoo:encoder", args=SMALL_ENCODER)
    loaded = load_model(cfg, CPU)
    assert isinstance(loaded, LoadedModel)
    ref, inputs, outputs = zoo.build("encoder", SMALL_ENCODER)
    assert (loaded.inputs, loaded.outputs) == (inputs, outputs)
    assert declared_specs(cfg) == (inputs, outputs)
    assert all(not p.requires_grad for p in loaded.module.parameters())
    x = inputs_for(inputs, batch=2)
    torch.testing.assert_close(loaded.module(*x), ref(*x), rtol=0, atol=0)
    assert loaded.weight_bytes == sum(p.nbytes for p in ref.parameters())


def test_zoo_unknown_name(tmp_path):
    cfg = make_cfg(tmp_path, source="zoo:resnet-9000")
    for call in (lambda: declared_specs(cfg), lambda: load_model(cfg, CPU)):
        with pytest.raises(SourceError, match=r'unknown zoo model "resnet-9000" \(available: tiny-mlp, '):
            call()


@pytest.mark.parametrize(
    "name,args,pattern",
    [
        ("tiny-mlp", {"hidden": "abc"}, r"args\.hidden: expected a positive integer, got 'abc'"),
        ("tiny-mlp", {"hidden": 0}, r"args\.hidden: expected a positive integer, got 0"),
        ("tiny-mlp", {"hidden": True}, r"args\.hidden: expected a positive integer"),
        ("tiny-mlp", {"hidden": 1.5}, r"args\.hidden: expected a positive integer"),
        ("tiny-mlp", {"hiden": 64}, r"args\.hiden: unknown argument for zoo model tiny-mlp \(expected: hidden\)"),
        ("sized", {"mib": -1}, r"args\.mib: expected a positive integer"),
        ("encoder", {"d_model": 64, "heads": 5}, r"args\.heads: expected a divisor of d_model \(64\), got 5"),
    ],
)
def test_zoo_bad_args(tmp_path, name, args, pattern):
    with pytest.raises(SourceError, match=pattern):
        zoo.specs(name, args)
    with pytest.raises(SourceError, match=pattern):
        zoo.build(name, args)
    cfg = make_cfg(tmp_path, source=f"zoo:{name}", args=args)
    with pytest.raises(SourceError, match=f"zoo:{name}: " + pattern):
        declared_specs(cfg)
    with pytest.raises(SourceError, match=pattern):
        load_model(cfg, CPU)


def test_zoo_bf16_cast_keeps_fp32_outside(tmp_path):
    ref, inputs, _ = zoo.build("tiny-mlp", {})
    loaded = load_model(make_cfg(tmp_path, source="zoo:tiny-mlp", dtype="BF16"), CPU)
    assert all(p.dtype == torch.bfloat16 for p in loaded.module.parameters())
    assert loaded.weight_bytes == sum(p.nbytes for p in ref.parameters()) // 2
    assert loaded.inputs[0].datatype == "FP32"
    x = inputs_for(inputs, batch=4)
    assert x[0].dtype == torch.float32
    y = loaded.module(*x)
    assert y.dtype == torch.float32
    assert y.shape == (4, 10)
    torch.testing.assert_close(y, ref(*x), rtol=0.05, atol=0.05)


# ----------------------------------------------------------- torchscript


def test_torchscript_round_trip(tmp_path):
    torch.manual_seed(1)
    net = Net().eval()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.ts"))
    loaded = load_model(make_cfg(tmp_path, source="torchscript:net.ts", **MLP_SPECS), CPU)
    assert loaded.platform == "pytorch_torchscript"
    assert [s.name for s in loaded.inputs] == ["x"]
    assert loaded.weight_bytes == sum(p.nbytes for p in net.parameters())
    assert all(not p.requires_grad for p in loaded.module.parameters())
    x = torch.randn(5, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), net(x))


def test_torchscript_traced_round_trip_absolute_path(tmp_path):
    torch.manual_seed(2)
    net = Net(hidden=4).eval()
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 8)), str(path))
    loaded = load_model(make_cfg(tmp_path, source=f"torchscript:{path}", **MLP_SPECS), CPU)
    x = torch.randn(7, 8)
    torch.testing.assert_close(loaded.module(x), net(x))


def test_torchscript_needs_declared_specs(tmp_path):
    torch.jit.save(torch.jit.script(Net()), str(tmp_path / "net.ts"))
    cfg = make_cfg(tmp_path, source="torchscript:net.ts")
    assert declared_specs(cfg) == (None, None)
    with pytest.raises(SourceError, match="torchscript models need inputs and outputs declared in the config"):
        load_model(cfg, CPU)


def test_torchscript_rejects_args(tmp_path):
    torch.jit.save(torch.jit.script(Net()), str(tmp_path / "net.ts"))
    cfg = make_cfg(tmp_path, source="torchscript:net.ts", args={"hidden": 3}, **MLP_SPECS)
    with pytest.raises(SourceError, match="args are only used by zoo models and safetensors factories"):
        load_model(cfg, CPU)


def test_torchscript_garbage_file(tmp_path):
    (tmp_path / "junk.ts").write_bytes(b"definitely not a zip archive")
    cfg = make_cfg(tmp_path, source="torchscript:junk.ts", **MLP_SPECS)
    with pytest.raises(SourceError, match="torchscript:junk.ts: not a loadable TorchScript archive"):
        load_model(cfg, CPU)


# --------------------------------------------------------------- export


def export_two_inputs(path: Path, dynamic: bool = True) -> TwoInputs:
    torch.manual_seed(3)
    net = TwoInputs().eval()
    example = (torch.randn(4, 8), torch.randint(0, 10, (4, 6)))
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        shapes = {"features": {0: batch}, "ids": {0: batch}}
    ep = torch.export.export(net, example, dynamic_shapes=shapes)
    torch.export.save(ep, str(path))
    return net


def test_export_round_trip_derives_specs(tmp_path):
    net = export_two_inputs(tmp_path / "two.pt2")
    cfg = make_cfg(tmp_path, source="export:two.pt2")
    # known before a load, from the archive's graph JSON (nothing unpickled): what the load derives
    before = declared_specs(cfg)
    loaded = load_model(cfg, CPU)
    assert before == (loaded.inputs, loaded.outputs)
    assert loaded.platform == "pytorch_export"
    assert loaded.inputs == (
        TensorSpec("features", "FP32", (-1, 8)),
        TensorSpec("ids", "INT64", (-1, 6)),
    )
    assert loaded.outputs == (TensorSpec("output0", "FP32", (-1, 5)),)
    assert loaded.weight_bytes == sum(t.nbytes for t in net.state_dict().values())
    for batch in (1, 9):  # both sides of the example batch of 4
        x = (torch.randn(batch, 8), torch.randint(0, 10, (batch, 6)))
        with torch.inference_mode():
            torch.testing.assert_close(loaded.module(*x), net(*x))


class _Marker:
    """Unpickling this touches a file: the proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_export_specs_at_registration_unpickle_nothing(tmp_path):
    """The archive's pickled parts are never read at registration: only its graph JSON.  A
    pickle planted in the archive's pickled member stays inert."""
    import pickle
    import zipfile

    export_two_inputs(tmp_path / "two.pt2")
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Marker(str(marker)))
    with zipfile.ZipFile(tmp_path / "two.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            # the pickled members (sample inputs): torch.export.load unpickles this one, and the
            # marker appears (checked by hand on torch 2.13); declared_specs must not
            dst.writestr(info, evil if info.filename.endswith((".pt", ".pkl")) else data)
    inputs, outputs = declared_specs(make_cfg(tmp_path, source="export:evil.pt2"))
    assert [s.name for s in inputs] == ["features", "ids"] and outputs[0].name == "output0"
    assert not marker.exists()
    # and what is not an archive, or not an export archive, is refused naming the file
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="junk.pt2: not a torch.export archive"):
        declared_specs(make_cfg(tmp_path, source="export:junk.pt2"))
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as z:
        z.writestr("archive/data.pkl", evil)
    with pytest.raises(SourceError, match=r"other.pt2: not a torch.export archive \(no models/\*.json"):
        declared_specs(make_cfg(tmp_path, source="export:other.pt2"))
    assert not marker.exists()


def test_export_declared_specs_win_but_must_match_count(tmp_path):
    export_two_inputs(tmp_path / "two.pt2")
    declared = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 8]},
            {"name": "b", "datatype": "INT64", "shape": [-1, 6]},
        ],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 5]}],
    }
    loaded = load_model(make_cfg(tmp_path, source="export:two.pt2", **declared), CPU)
    assert [s.name for s in loaded.inputs] == ["a", "b"]
    assert loaded.outputs[0].name == "scores"
    declared["inputs"] = declared["inputs"][:1]
    with pytest.raises(SourceError, match="config declares 1 inputs but the program takes 2"):
        load_model(make_cfg(tmp_path, source="export:two.pt2", **declared), CPU)


def test_export_static_batch_needs_batching_off(tmp_path):
    net = export_two_inputs(tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(SourceError, match="fixed first dimension .* max_batch_size > 0"):
        load_model(make_cfg(tmp_path, source="export:static.pt2"), CPU)
    loaded = load_model(make_cfg(tmp_path, source="export:static.pt2", max_batch_size=0), CPU)
    assert loaded.inputs[0].shape == (4, 8)
    x = (torch.randn(4, 8), torch.randint(0, 10, (4, 6)))
    torch.testing.assert_close(loaded.module(*x), net(*x))


# ---------------------------------------------------- safetensors + factory

FACTORY_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, 3)
        # not in the state dict: the factory must still provide it
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def make(hidden=16):
    return Net(hidden)


def broken(**kwargs):
    raise RuntimeError("factory exploded")


def not_a_module(**kwargs):
    return 42


NOT_CALLABLE = 3
'''


def write_factory(directory: Path, module_name: str = "netdef", code: str = FACTORY_CODE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module_name}.py"
    path.write_text(textwrap.dedent(code))
    return path


def reference_module(path: Path, hidden: int, seed: int = 4) -> nn.Module:
    """The factory's module, imported by file path (independently of sources.py), with random weights."""
    spec = importlib.util.spec_from_file_location(f"ref_{path.stem}_{seed}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    return mod.make(hidden).eval()


def test_safetensors_with_factory_next_to_config(tmp_path):
    ref = reference_module(write_factory(tmp_path), hidden=32)
    save_file(ref.state_dict(), str(tmp_path / "weights.safetensors"))
    cfg = make_cfg(
        tmp_path, source="safetensors:weights.safetensors", factory="netdef:make", args={"hidden": 32}, **MLP_SPECS
    )
    loaded = load_model(cfg, CPU)
    assert loaded.platform == "pytorch_safetensors"
    assert loaded.weight_bytes == sum(t.nbytes for t in ref.state_dict().values()) + 4  # + the scale buffer
    assert all(not p.requires_grad for p in loaded.module.parameters())
    assert not loaded.module.training
    x = torch.randn(6, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), ref(x))


def test_safetensors_keeps_module_dtype_and_casts_on_request(tmp_path):
    ref = reference_module(write_factory(tmp_path), hidden=16)
    half = {k: v.half() for k, v in ref.state_dict().items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    base = dict(source="safetensors:half.safetensors", factory="netdef:make", **MLP_SPECS)
    loaded = load_model(make_cfg(tmp_path, **base), CPU)
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded.module(x), ref(x), rtol=0.01, atol=0.01)
    bf16 = load_model(make_cfg(tmp_path, dtype="BF16", **base), CPU)
    assert all(p.dtype == torch.bfloat16 for p in bf16.module.parameters())
    y = bf16.module(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref(x), rtol=0.05, atol=0.05)


def test_same_factory_name_in_two_directories(tmp_path):
    """A cached module from one config's directory must not serve another's."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_factory(a, "shared_name")
    write_factory(b, "shared_name", FACTORY_CODE.replace("nn.Linear(hidden, 3)", "nn.Linear(hidden, 3, bias=False)"))
    for d in (a, b):
        ref = reference_module(d / "shared_name.py", hidden=8)
        save_file(ref.state_dict(), str(d / "w.safetensors"))
        cfg = make_cfg(d, source="safetensors:w.safetensors", factory="shared_name:make", args={"hidden": 8}, **MLP_SPECS)
        loaded = load_model(cfg, CPU)
        x = torch.randn(2, 8)
        torch.testing.assert_close(loaded.module(x), ref(x))


def test_safetensors_weights_that_do_not_fit(tmp_path):
    write_factory(tmp_path)
    other = reference_module(tmp_path / "netdef.py", hidden=32)
    save_file(other.state_dict(), str(tmp_path / "w32.safetensors"))
    cfg = make_cfg(tmp_path, source="safetensors:w32.safetensors", factory="netdef:make", args={"hidden": 16}, **MLP_SPECS)
    with pytest.raises(SourceError, match=r"weights do not fit the factory's module: .*fc1\.weight has shape \[32, 8\] in the file but \[16, 8\]"):
        load_model(cfg, CPU)

    state = dict(other.state_dict())
    del state["fc2.bias"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "keys.safetensors"))
    cfg = make_cfg(tmp_path, source="safetensors:keys.safetensors", factory="netdef:make", args={"hidden": 32}, **MLP_SPECS)
    with pytest.raises(SourceError, match=r"weights do not fit the factory's module: missing fc2\.bias; unexpected extra\.weight"):
        load_model(cfg, CPU)


def test_safetensors_garbage_file(tmp_path):
    write_factory(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cfg = make_cfg(tmp_path, source="safetensors:junk.safetensors", factory="netdef:make", **MLP_SPECS)
    with pytest.raises(SourceError, match="not a readable safetensors file"):
        load_model(cfg, CPU)


@pytest.mark.parametrize(
    "factory,pattern",
    [
        ("no_such_module:make", r"factory no_such_module:make refused: a factory must be a Python file inside a model root"),
        ("netdef:missing", r"factory netdef:missing: netdef has no attribute missing"),
        ("netdef:NOT_CALLABLE", r"factory netdef:NOT_CALLABLE: NOT_CALLABLE is not callable"),
        ("netdef:broken", r"factory netdef:broken raised RuntimeError: factory exploded"),
        ("netdef:not_a_module", r"factory netdef:not_a_module returned int, expected a torch.nn.Module"),
    ],
)
def test_bad_factory(tmp_path, factory, pattern):
    write_factory(tmp_path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    cfg = make_cfg(tmp_path, source="safetensors:w.safetensors", factory=factory, **MLP_SPECS)
    with pytest.raises(SourceError, match="safetensors:w.safetensors: " + pattern):
        load_model(cfg, CPU)


def test_factory_with_wrong_args_is_a_source_error(tmp_path):
    write_factory(tmp_path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    cfg = make_cfg(tmp_path, source="safetensors:w.safetensors", factory="netdef:make", args={"depth": 2}, **MLP_SPECS)
    with pytest.raises(SourceError, match="raised TypeError: .*depth"):
        load_model(cfg, CPU)


def test_bad_factory_string_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.factory: expected \"package\.module:callable\""):
        make_cfg(tmp_path, source="safetensors:w.safetensors", factory="not a factory", **MLP_SPECS)


def test_factory_import_error_inside_module(tmp_path):
    write_factory(tmp_path, "badimport", "import does_not_exist_anywhere\n")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    cfg = make_cfg(tmp_path, source="safetensors:w.safetensors", factory="badimport:make", **MLP_SPECS)
    with pytest.raises(SourceError, match="cannot import badimport .*ModuleNotFoundError.*does_not_exist_anywhere"):
        load_model(cfg, CPU)


# ---------------------------------------------------------------- paths


@pytest.fixture
def outside_file(tmp_path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.jit.save(torch.jit.script(Net()), str(outside / "net.ts"))
    return outside / "net.ts"


def test_path_escaping_roots_with_dotdot(tmp_path, outside_file):
    root = tmp_path / "root"
    root.mkdir()
    cfg = make_cfg(root, source="torchscript:../outside/net.ts", **MLP_SPECS)
    with pytest.raises(SourceError, match=r"source path .*outside.net\.ts resolves outside the model roots \(.*root\)"):
        resolve_path(cfg)
    with pytest.raises(SourceError, match="resolves outside the model roots"):
        load_model(cfg, CPU)


def test_path_escaping_roots_with_symlink(tmp_path, outside_file):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.ts").symlink_to(outside_file)
    cfg = make_cfg(root, source="torchscript:link.ts", **MLP_SPECS)
    with pytest.raises(SourceError, match="resolves outside the model roots"):
        load_model(cfg, CPU)
    # the same file is fine once its real directory is a model root
    cfg = make_cfg(root, roots=(root, outside_file.parent), source="torchscript:link.ts", **MLP_SPECS)
    assert resolve_path(cfg) == outside_file.resolve()
    assert load_model(cfg, CPU).platform == "pytorch_torchscript"


def test_escape_is_reported_before_existence(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    cfg = make_cfg(root, source="export:../../etc/nothing-here.pt2")
    with pytest.raises(SourceError, match="resolves outside the model roots"):
        load_model(cfg, CPU)


def test_missing_file(tmp_path):
    for source in ("torchscript:nope.ts", "export:nope.pt2"):
        cfg = make_cfg(tmp_path, source=source, **MLP_SPECS)
        with pytest.raises(SourceError, match=f"{source}: no such file: .*nope"):
            load_model(cfg, CPU)
    write_factory(tmp_path)
    cfg = make_cfg(tmp_path, source="safetensors:nope.safetensors", factory="netdef:make", **MLP_SPECS)
    with pytest.raises(SourceError, match="no such file"):
        load_model(cfg, CPU)


def test_directory_is_not_a_model_file(tmp_path):
    (tmp_path / "dir.pt2").mkdir()
    with pytest.raises(SourceError, match="not a file"):
        load_model(make_cfg(tmp_path, source="export:dir.pt2"), CPU)


# ------------------------------------------------------------ no pickle


def test_no_unsafe_torch_load_in_scheduler():
    """Invariant 8: torch.load only with weights_only=True; no pickle at all."""
    package = Path(__file__).resolve().parents[1] / "scheduler"
    sources = sorted(package.glob("*.py"))
    assert any(p.name == "sources.py" for p in sources)
    offenders = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.(?:serialization\.)?load\s*\(", text):
            call = text[m.start() : text.find(")", m.end()) + 1]
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.name}: {call}")
        for m in re.finditer(r"^\s*(?:import|from)\s+(?:c?pickle|dill|joblib)\b.*$", text, re.M):
            offenders.append(f"{path.name}: {m.group().strip()}")
    assert not offenders, offenders
