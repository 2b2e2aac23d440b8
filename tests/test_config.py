"""The TOML configuration: good files parse, every bad one names file, key path and expectation."""

from __future__ import annotations

import pytest

from modelconsole.scheduler.config import ConfigError, demo_config, load_config, model_from_dict


def write(tmp_path, text, name="models.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
model_roots = ["."]

[server]
host = "127.0.0.1"
port = 8123

[store]
path = "state/modelconsole.db"

[gpu]
default_device = "cpu"

[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
max_batch_size = 16
priority = 1

[[models]]
name = "enc"
version = 3
source = "zoo:encoder"
args = { layers = 2, d_model = 64, heads = 4, seq = 16 }
warmup = 2

[[models]]
name = "ts"
source = "torchscript:m.pt"
device = "auto"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 16] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, 4] }]
"""


def test_good_config_parses(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.server.port == 8123 and cfg.server.host == "127.0.0.1"
    assert cfg.store.path == str((tmp_path / "state/modelconsole.db").resolve())
    assert [m.name for m in cfg.models] == ["tiny", "enc", "ts"]
    tiny, enc, ts = cfg.models
    assert tiny.version == "1" and tiny.max_batch_size == 16 and tiny.priority == 1
    assert tiny.device == "cpu"  # from [gpu] default_device
    assert ts.device == "auto"  # the model's own key wins
    assert enc.version == "3" and enc.args["d_model"] == 64 and enc.warmup == 2
    assert ts.inputs[0].shape == (-1, 16) and ts.outputs[0].datatype == "FP32"
    assert cfg.model_roots == (str(tmp_path.resolve()),)
    assert ts.base_dir == str(tmp_path.resolve())


@pytest.mark.parametrize(
    "body, expected",
    [
        ('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\nmax_batch_size = "abc"\n',
         'models[0].max_batch_size: expected a non-negative integer (0 turns batching off), got "abc"'),
        ('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\n[[models]]\nname = "b"\nsource = "zoo:tiny-mlp"\n'
         '[[models]]\nname = "c"\nsource = "zoo:tiny-mlp"\nmax_batch_size = -2\n',
         "models[2].max_batch_size: expected a non-negative integer"),
        ('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\nbatchsize = 4\n', "models[0].batchsize: unknown key"),
        ('[[models]]\nname = "a"\n', "models[0].source: missing"),
        ('[[models]]\nname = "a b"\nsource = "zoo:tiny-mlp"\n', "models[0].name: expected a name"),
        ('[[models]]\nname = "a"\nsource = "onnx:m.onnx"\n', "models[0].source: expected a source like"),
        ('[[models]]\nname = "a"\nsource = "safetensors:w.safetensors"\n', "models[0].factory: missing"),
        ('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\nfactory = "m:f"\n', "models[0].factory: only used with safetensors"),
        ('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\ndevice = "tpu"\n', 'models[0].device: expected "auto"'),
        ('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\nversion = "v2"\n', "models[0].version: expected a positive integer"),
        ('[[models]]\nname = "a"\nsource = "torchscript:m.pt"\ninputs = [{ name = "x", datatype = "FLOAT", shape = [-1] }]\n',
         "models[0].inputs[0].datatype: expected one of BOOL"),
        ('[[models]]\nname = "a"\nsource = "torchscript:m.pt"\ninputs = [{ name = "x", datatype = "FP32", shape = [4, 2] }]\n',
         "models[0].inputs[0].shape: expected -1 as the first (batch) dimension"),
        ('[[models]]\nname = "a"\nsource = "torchscript:m.pt"\ninputs = [{ name = "x", datatype = "FP32" }]\n',
         "models[0].inputs[0].shape: missing"),
        ('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\n[[models]]\nname = "a"\nsource = "zoo:small-cnn"\n',
         "models[1]: duplicate model a version 1"),
        ('[server]\nport = 99999\n', "server.port: expected a port number"),
        ('[server]\nworkers = -1\n', "server.workers: expected a non-negative integer (0: one process)"),
        ('[server]\ngrpc_port = "on"\n', 'server.grpc_port: expected a port number 0-65535 or "off"'),
        ('[server]\nipc = "tcp"\n', 'server.ipc: expected "unix" or "zmq"'),
        ('[gpu]\nbudget = 3\n', "gpu.budget: unknown key"),
        ('colour = "red"\n', "colour: unknown key"),
        ('model_roots = "models"\n', "model_roots: expected a non-empty list"),
        ('models = 3\n', "models: expected an array of tables"),
    ],
)
def test_bad_config_names_file_key_and_expectation(tmp_path, body, expected):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "[[models]\nname = 1\n")
    with pytest.raises(ConfigError, match=r"models.toml: invalid TOML: .*line 1"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_config(tmp_path / "nope.toml")


def test_model_from_dict_for_control_calls(tmp_path):
    cfg = model_from_dict({"name": "m", "source": "zoo:tiny-mlp", "version": 2}, base_dir=str(tmp_path))
    assert cfg.version == "2" and cfg.model_roots == (str(tmp_path),)
    with pytest.raises(ConfigError, match=r"model\.warmup: expected a non-negative integer, got -1"):
        model_from_dict({"name": "m", "source": "zoo:tiny-mlp", "warmup": -1})
    with pytest.raises(ConfigError, match="model: expected a table"):
        model_from_dict(["m"])


def test_demo_config_is_the_zoo():
    cfg = demo_config()
    assert {m.source for m in cfg.models} >= {"zoo:tiny-mlp", "zoo:small-cnn", "zoo:encoder"}
    assert cfg.path is None
