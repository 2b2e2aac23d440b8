"""The checkpoints people have (issue 16): ``hf:FOLDER`` (a Hugging Face folder, loaded with
transformers from safetensors, never remote code) and ``state_dict:FILE.pt`` + a factory (read
with ``weights_only=True``).  Every artifact is made here, offline: tiny random BERT and GPT-2
models written with ``save_pretrained``, a small CNN's state dict written both ways, and a
malicious pickle in each container.  No hub, ever."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from modelconsole.scheduler.config import model_from_dict  # noqa: E402
from modelconsole.scheduler.engine import Engine  # noqa: E402
from modelconsole.scheduler.errors import InputError  # noqa: E402
from modelconsole.scheduler.sources import SourceError, declared_specs, load_model  # noqa: E402
from modelconsole.scheduler.trust import Trust  # noqa: E402

CPU = torch.device("cpu")
os.environ["HF_HUB_OFFLINE"] = "1"


class Marker:
    """Unpickling this touches a file: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def bert(folder: Path, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64, **kw)
    model = transformers.BertForMaskedLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def gpt2(folder: Path) -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    return model


def cfg_for(base: Path, **raw):
    raw.setdefault("name", "m")
    roots = (str(base),)
    return model_from_dict(raw, base_dir=str(base), model_roots=roots, trust=Trust(roots, ()))


def text_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 120, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


@pytest.mark.parametrize("make", [bert, gpt2])
async def test_an_hf_folder_serves_what_transformers_computes(tmp_path, make):
    ref = make(tmp_path / "model")
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        snap = await engine.register({"name": "lm", "source": "hf:model", "warmup": 0})
        # known at registration, before any weight is read: what perf_analyzer asks first
        assert snap["state"] == "UNLOADED"
        assert snap["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                                  {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
        assert snap["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, 120]}]
        for batch, seq in ((1, 5), (3, 9)):
            x = text_inputs(batch, seq, seed=seq)
            got = (await engine.infer("lm", x)).outputs["logits"]
            with torch.inference_mode():
                want = ref(**x).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert engine.snapshot_models("lm")[0]["platform"] == "pytorch_transformers"


async def test_requests_of_different_lengths_are_batched_by_length(tmp_path):
    """Exact-length batching: requests of one length share a batch; another length waits for
    its own, and every answer equals the request run alone."""
    ref = bert(tmp_path / "model")
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        await engine.register({"name": "lm", "source": "hf:model", "warmup": 0, "max_queue_delay_ms": 50})
        await engine.load("lm")
        import asyncio

        xs = [text_inputs(1, 4 + (i % 2), seed=i) for i in range(6)]
        answers = await asyncio.gather(*(engine.infer("lm", x) for x in xs))
        for x, a in zip(xs, answers):
            with torch.inference_mode():
                torch.testing.assert_close(a.outputs["logits"], ref(**x).logits, rtol=1e-5, atol=1e-5)
        sizes = engine.snapshot_models("lm")[0]["stats"]["batch_sizes"]
        assert sum(int(k) * v for k, v in sizes.items()) == 6 and max(map(int, sizes)) > 1


async def test_hf_reload_from_the_host_tier_is_a_copy(make_engine, tmp_path):
    bert(tmp_path / "model")
    eng, _ = await make_engine((256,), host_tier_gib=0.5)
    await eng.register({"name": "lm", "source": "hf:model", "warmup": 0})
    x = text_inputs(2, 6)
    before = (await eng.infer("lm", x)).outputs["logits"].clone()
    await eng.unload("lm")
    shutil.rmtree(tmp_path / "model")  # only the tier can bring it back
    after = (await eng.infer("lm", x)).outputs["logits"]
    assert eng.instance("lm").load_source == "host tier"
    assert torch.equal(before, after)


def test_a_bin_checkpoint_loads_only_as_plain_tensors(tmp_path):
    ref = bert(tmp_path / "model")
    folder = tmp_path / "model"
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    loaded = load_model(cfg_for(tmp_path, source="hf:model"), CPU)
    x = text_inputs(1, 5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(*x.values())[0], ref(**x).logits)
    # a .bin with a pickled object beyond tensors: refused, and the object never built
    marker = tmp_path / "pwned"
    torch.save({"bert.embeddings.word_embeddings.weight": Marker(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pytorch_model.bin holds pickled objects beyond tensors"):
        load_model(cfg_for(tmp_path, source="hf:model"), CPU)
    assert not marker.exists()


@pytest.mark.parametrize("breakage, message", [
    ("no weights", r"model has no model.safetensors \(nor a sharded index, nor a pytorch_model.bin"),
    ("unknown architecture", "names architecture 'FrobnicatorForMaskedLM', which transformers .* does not have"),
    ("remote code", r"asks for remote code \(auto_map\)"),
    ("no config", "has no config.json"),
    ("outside the roots", "resolves outside the model roots"),
])
async def test_a_broken_folder_is_refused_at_registration_naming_what_was_expected(tmp_path, breakage, message):
    root = tmp_path / "root"
    root.mkdir()
    bert(root / "model")
    folder, source = root / "model", "hf:model"
    config = json.loads((folder / "config.json").read_text())
    if breakage == "no weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "unknown architecture":
        config["architectures"] = ["FrobnicatorForMaskedLM"]
    elif breakage == "remote code":
        config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    elif breakage == "no config":
        (folder / "config.json").unlink()
    elif breakage == "outside the roots":
        source = f"hf:{tmp_path / 'elsewhere'}"
        shutil.copytree(folder, tmp_path / "elsewhere")
    if (folder / "config.json").exists():
        (folder / "config.json").write_text(json.dumps(config))
    async with Engine(None, base_dir=str(root), default_device="cpu") as engine:
        with pytest.raises(InputError, match=message):
            await engine.register({"name": "lm", "source": source})
        assert engine.snapshot_models() == []


def test_an_older_checkpoint_with_non_persistent_buffers_loads(tmp_path):
    """transformers < 4.31 saved BERT's position_ids; the model makes its own, so it is ignored."""
    from safetensors.torch import load_file, save_file

    ref = bert(tmp_path / "model")
    path = tmp_path / "model" / "model.safetensors"
    state = load_file(str(path))
    state["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(state, str(path), metadata={"format": "pt"})
    loaded = load_model(cfg_for(tmp_path, source="hf:model"), CPU)
    x = text_inputs(1, 6)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(*x.values())[0], ref(**x).logits)


def test_weights_that_do_not_fit_the_architecture_say_which_shape_by_shape(tmp_path):
    bert(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["intermediate_size"] = 64  # the file's FFN weights are 48 wide
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError) as e:
        load_model(cfg_for(tmp_path, source="hf:model"), CPU)
    msg = str(e.value)
    assert "weights do not fit BertForMaskedLM" in msg
    assert "bert.encoder.layer.0.intermediate.dense.weight: the file has [48, 32], BertForMaskedLM needs [64, 32]" in msg


# ------------------------------------------------------------------ state_dict + factory

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn(self.conv(x)))

    def tiny_resnet(width=8, classes=10):
        # a torchvision-shaped network: stem, residual block, pooled head
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), Block(width), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, classes))
""")
IO = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
      "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}


def resnet_files(tmp_path: Path) -> torch.nn.Module:
    import importlib.util

    from safetensors.torch import save_file

    (tmp_path / "nets.py").write_text(FACTORY)
    spec = importlib.util.spec_from_file_location("nets_for_saving", tmp_path / "nets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(2)
    net = mod.tiny_resnet().eval()
    net[1].bn.running_mean.uniform_(-0.5, 0.5)  # buffers that matter
    state = net.state_dict()
    torch.save(state, tmp_path / "resnet.pt")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")  # as training scripts often do
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "resnet.safetensors"))
    return net


def test_a_state_dict_saved_either_way_loads_into_the_factory(tmp_path):
    net = resnet_files(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        want = net(x)
    for source in ("state_dict:resnet.pt", "state_dict:wrapped.pt", "safetensors:resnet.safetensors"):
        loaded = load_model(cfg_for(tmp_path, source=source, factory="nets:tiny_resnet", **IO), CPU)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.module(x), want)
        assert loaded.platform == ("pytorch_safetensors" if "safetensors" in source else "pytorch_state_dict")


def test_a_state_dict_with_a_pickle_or_the_wrong_shapes_is_refused(tmp_path):
    resnet_files(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"0.weight": Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SourceError, match="evil.pt holds pickled objects beyond tensors"):
        load_model(cfg_for(tmp_path, source="state_dict:evil.pt", factory="nets:tiny_resnet", **IO), CPU)
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(SourceError, match="raw.pt"):
        load_model(cfg_for(tmp_path, source="state_dict:raw.pt", factory="nets:tiny_resnet", **IO), CPU)
    assert not marker.exists()
    with pytest.raises(SourceError, match=r"weights do not fit the factory's module: .*4.weight"):
        load_model(cfg_for(tmp_path, source="state_dict:resnet.pt", factory="nets:tiny_resnet",
                           args={"classes": 7}, **IO), CPU)


async def test_every_new_source_registers_over_the_api_and_checks(tmp_path):
    """Register over the engine's API (what POST /api/models calls), and --check-config."""
    import subprocess
    import sys

    bert(tmp_path / "model")
    resnet_files(tmp_path)
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        snap = await engine.register({"name": "net", "source": "state_dict:resnet.pt", "factory": "nets:tiny_resnet",
                                      **IO})
        assert snap["inputs"][0]["name"] == "image"
        with pytest.raises(InputError, match="needs inputs and outputs declared"):
            await engine.register({"name": "bare", "source": "state_dict:resnet.pt", "factory": "nets:tiny_resnet"})
        with pytest.raises(InputError, match="state_dict:nope.pt: no such file"):
            await engine.register({"name": "bad", "source": "state_dict:nope.pt", "factory": "nets:tiny_resnet",
                                   **IO})
    toml = tmp_path / "mc.toml"
    toml.write_text(textwrap.dedent("""
        [[models]]
        name = "lm"
        source = "hf:model"
        warmup = 0

        [[models]]
        name = "net"
        source = "state_dict:resnet.pt"
        factory = "nets:tiny_resnet"
        inputs = [{ name = "image", datatype = "FP32", shape = [-1, 3, 16, 16] }]
        outputs = [{ name = "logits", datatype = "FP32", shape = [-1, 10] }]
    """))
    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--check-config", str(toml)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all 2 models loaded and answered" in p.stdout, p.stdout
    assert "hf:model" in p.stdout and "state_dict:resnet.pt" in p.stdout


def test_declared_specs_of_an_hf_folder_read_no_weights(tmp_path):
    bert(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"garbage: a read would fail")
    inputs, outputs = declared_specs(cfg_for(tmp_path, source="hf:model"))
    assert [s.name for s in inputs] == ["input_ids", "attention_mask"] and outputs[0].shape == (-1, -1, 120)
