"""``hf:PATH`` — a local Hugging Face model folder, loaded with ``transformers`` safely.

What runs is chosen by the folder's ``config.json`` (``architectures``) among
``transformers``' own model classes only: never ``trust_remote_code``, never a
download (``HF_HUB_OFFLINE`` is set before ``transformers`` is imported, and
nothing here asks the hub).  Weights come from safetensors (``model.safetensors``
or the shards its ``model.safetensors.index.json`` lists); a
``pytorch_model.bin`` is read only with ``torch.load(weights_only=True)``, which
refuses any pickled object that is not a tensor.

A load builds the model with its parameters on the ``meta`` device (no memory,
no random initialisation; buffers are real, they are small and some are not
in the file), reads the weights straight onto the target device and adopts
them (``load_state_dict(assign=True)``), then re-ties tied weights
(``tie_weights``).  Every parameter must then be real: what the file lacks or
holds in another shape is an error naming the tensors, shape by shape.

Inputs and outputs come from the architecture, known at registration without
weights: the forward's ``input_ids`` and ``attention_mask`` (INT64 [-1, -1]),
and the tensors its output holds, found by running the model on the ``meta``
device at two batch and sequence sizes (a dimension that changed is -1).
Requests are batched by exact shape (sequence length): the engine's grouped
batching, which keeps every answer identical to running it alone, for any
architecture, with no pad-token or position-id rules to get wrong; see
docs/configuration.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tensors import TensorSpec, v2_datatype
from .zoo import SourceError

TEXT_INPUTS = ("input_ids", "attention_mask")
MAX_CONFIG_BYTES = 4 * 2**20
_SPECS: dict[tuple[str, float], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {}
_SPECS_LOCK = threading.Lock()


def _transformers(source: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, whatever the folder says
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SourceError(f"{source}: hf: sources need transformers: pip install 'modelconsole[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def read_config(folder: Path, source: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise SourceError(f"{source}: {folder} is not a folder (expected a Hugging Face model folder)")
    if not path.is_file():
        raise SourceError(f"{source}: {folder} has no config.json (expected a Hugging Face model folder)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SourceError(f"{source}: {path.name} is over {MAX_CONFIG_BYTES} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{source}: {path.name} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{source}: {path.name}: expected a JSON object")
    if doc.get("auto_map"):
        raise SourceError(f"{source}: {path.name} asks for remote code (auto_map); modelconsole never runs a "
                          "folder's own Python (trust_remote_code)")
    return doc


def model_class(doc: dict[str, Any], source: str) -> Any:
    """The transformers class ``architectures`` names: one of transformers' own model classes."""
    transformers = _transformers(source)
    archs = doc.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise SourceError(f"{source}: config.json has no architectures list (e.g. [\"BertForMaskedLM\"])")
    name = archs[0]
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SourceError(f"{source}: config.json names architecture '{name}', which transformers "
                          f"{transformers.__version__} does not have")
    return cls


def weight_files(folder: Path, source: str) -> tuple[str, list[Path]]:
    """("safetensors", files) or ("bin", [file]); an error naming what was expected otherwise."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return "safetensors", [folder / "model.safetensors"]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{source}: {index.name}: expected a weight_map of shards ({e})") from None
        files = [folder / s for s in shards]
        bad = [s for s, f in zip(shards, files) if "/" in s or "\\" in s or not f.is_file()]
        if bad:
            raise SourceError(f"{source}: {index.name} lists a shard that is not in the folder: {bad[0]}")
        return "safetensors", files
    if (folder / "pytorch_model.bin").is_file():
        return "bin", [folder / "pytorch_model.bin"]
    raise SourceError(f"{source}: {folder} has no model.safetensors (nor a sharded index, nor a "
                      "pytorch_model.bin to read with weights_only=True)")


def _read_state(kind: str, files: list[Path], device: torch.device, source: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if kind == "safetensors":
            from safetensors.torch import load_file

            try:
                part = load_file(str(f), device=str(device))
            except Exception as e:
                raise SourceError(f"{source}: {f.name} is not a readable safetensors file: "
                                  f"{type(e).__name__}: {e}") from None
        else:
            part = load_weights_only(f, device, source)
        state.update(part)
    return state


def load_weights_only(path: Path, device: torch.device, source: str) -> dict[str, torch.Tensor]:
    """A ``torch.save`` file read with ``weights_only=True`` (tensors and plain containers only:
    a pickled object of any other type is refused, never built), as a flat name -> tensor map.
    A checkpoint that wraps its state dict (``{"state_dict": {...}}`` or ``{"model": {...}}``) is
    unwrapped."""
    file_name = str(path)
    try:
        obj = torch.load(file_name, weights_only=True, map_location=device, mmap=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":  # what weights_only raises for anything but tensors
            raise SourceError(f"{source}: {path.name} holds pickled objects beyond tensors, refused "
                              f"(read with weights_only=True): {str(e).splitlines()[0]}") from None
        raise SourceError(f"{source}: {path.name} is not a readable torch.save file: "
                          f"{type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model") \
            and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise SourceError(f"{source}: {path.name}: expected a state dict (a mapping of names to tensors), "
                          f"got {type(obj).__name__}")
    return obj


_META = threading.local()  # .on: this thread is building a model whose parameters go to meta
_PATCH_LOCK = threading.Lock()
_patched = False


def _install_meta_params() -> None:
    """Once: ``nn.Module.register_parameter`` moves a new parameter to the meta device when the
    calling thread is inside ``params_on_meta``; every other thread (other loads, factories, zoo
    models on worker threads) gets the ordinary behaviour."""
    global _patched
    with _PATCH_LOCK:
        if _patched:
            return
        original = nn.Module.register_parameter

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            original(module, name, param)
            if param is not None and getattr(_META, "on", False) and not param.is_meta:
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

        nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
        _patched = True


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built in here, on this thread, keep their parameters on the meta device (each is
    moved there as it is registered, before ``reset_parameters`` or HF's ``_init_weights`` run on
    it, so initialisation costs nothing); buffers stay real: they are small, and some
    (position ids) are not in the file."""
    _install_meta_params()
    _META.on = True
    try:
        yield
    finally:
        _META.on = False


def _config(cls: Any, folder: Path, source: str) -> Any:
    try:
        config = cls.config_class.from_json_file(str(folder / "config.json"))
    except Exception as e:
        raise SourceError(f"{source}: config.json does not configure {cls.__name__}: {type(e).__name__}: {e}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False  # one forward per request: no key/value cache to keep
    return config


class HFModule(nn.Module):
    """The engine's calling convention over a transformers model: tensors in the declared input
    order as keyword arguments, the declared outputs out as a tuple."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], output_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, tensors)), return_dict=True)
        return tuple(out[n] for n in self.output_names)


def _input_names(model: nn.Module, source: str) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters
    names = tuple(n for n in TEXT_INPUTS if n in params)
    if "input_ids" not in names:
        raise SourceError(f"{source}: {type(model).__name__} takes no input_ids; declare its inputs and "
                          "outputs in the config")
    return names


def _probe(model: nn.Module, names: tuple[str, ...], batch: int,
           seq: int) -> tuple[dict[str, torch.Size], dict[str, torch.dtype]]:
    x = {n: torch.ones(batch, seq, dtype=torch.int64, device="meta") for n in names}
    with torch.inference_mode():
        out = model(**x, return_dict=True)
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return {k: v.shape for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()}


def _probe_shapes(cls: Any, config: Any, source: str) -> tuple[tuple[str, ...], list[Any]]:
    """The forward's text inputs, and its outputs' (shapes, dtypes) at two sizes, on the meta
    device.  Some attention paths ask a mask tensor for a Python value (``.item()``), which a
    meta tensor cannot give: the probe tries the attention implementations and with and without
    the mask until one runs (output shapes do not depend on either)."""
    errors = []
    for attn in ("eager", "sdpa"):
        with contextlib.suppress(Exception):
            config._attn_implementation = attn
        try:
            with torch.device("meta"):
                model = cls(config).eval()
        except Exception as e:
            raise SourceError(f"{source}: cannot build {cls.__name__} from config.json: "
                              f"{type(e).__name__}: {e}") from None
        names = _input_names(model, source)
        for fed in (names, names[:1]):
            try:
                return names, [_probe(model, fed, 1, 3), _probe(model, fed, 2, 5)]
            except Exception as e:  # noqa: BLE001 - the next way may run
                errors.append(f"{type(e).__name__}: {e}")
    raise SourceError(f"{source}: {cls.__name__} cannot run on token ids alone ({errors[-1]}); "
                      "declare its inputs and outputs in the config")


def derive_specs(folder: Path, source: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs from the architecture alone (meta device: no weights, no memory);
    cached per folder and config.json's modification time."""
    key = (str(folder.resolve()), (folder / "config.json").stat().st_mtime if (folder / "config.json").exists()
           else 0.0)
    with _SPECS_LOCK:
        if key in _SPECS:
            return _SPECS[key]
    doc = read_config(folder, source)
    cls = model_class(doc, source)
    config = _config(cls, folder, source)
    names, ((a, dtypes), (b, _)) = _probe_shapes(cls, config, source)
    inputs = tuple(TensorSpec(n, "INT64", (-1, -1)) for n in names)
    outputs = []
    for name, shape in a.items():
        other = b.get(name)
        datatype = v2_datatype(dtypes[name])
        if other is None or len(other) != len(shape) or datatype is None:
            continue
        outputs.append(TensorSpec(name, datatype, tuple(-1 if x != y else int(x) for x, y in zip(shape, other))))
    if not outputs:
        raise SourceError(f"{source}: {cls.__name__} returns no tensor outputs to serve")
    result = (inputs, tuple(outputs))
    with _SPECS_LOCK:
        _SPECS[key] = result
    return result


def load(folder: Path, source: str, device: torch.device, inputs: tuple[TensorSpec, ...],
         outputs: tuple[TensorSpec, ...]) -> HFModule:
    """The folder's model on ``device`` in eval mode, wrapped as ``HFModule``."""
    doc = read_config(folder, source)
    cls = model_class(doc, source)
    kind, files = weight_files(folder, source)
    config = _config(cls, folder, source)
    # the file read (mostly copies that release the GIL) overlaps the build (Python that holds it):
    # a BERT-base cold load is ~90 ms of reading and ~50 ms of building, side by side
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf-read") as pool:
        reading = pool.submit(_read_state, kind, files, device, source)
        try:
            with params_on_meta():
                model = cls(config)
        except Exception as e:
            reading.cancel()
            raise SourceError(f"{source}: cannot build {cls.__name__}: {type(e).__name__}: {e}") from None
        state = reading.result()
    want = model.state_dict()
    problems = []
    # older checkpoints hold non-persistent buffers (BERT's position_ids): the model makes its own
    buffers = dict(model.named_buffers())
    for k in [k for k in state if k not in want and k in buffers]:
        del state[k]
    unexpected = [k for k in state if k not in want]
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected[:8]) + (" …" if len(unexpected) > 8 else ""))
    for k, t in want.items():
        if k in state and tuple(state[k].shape) != tuple(t.shape):
            problems.append(f"{k}: the file has {list(state[k].shape)}, {cls.__name__} needs {list(t.shape)}")
    if problems:
        raise SourceError(f"{source}: weights do not fit {cls.__name__}: " + "; ".join(problems))
    for k, t in state.items():
        if t.dtype != want[k].dtype and t.is_floating_point() and want[k].is_floating_point():
            state[k] = t.to(want[k].dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head (GPT-2's lm_head) is the embedding again, not a meta copy
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SourceError(f"{source}: weights do not fit {cls.__name__}: missing "
                          + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    del state, want
    model = model.to(device)  # the buffers (the weights are there already)
    model.eval()
    names_in = tuple(s.name for s in inputs)
    return HFModule(model, names_in, tuple(s.name for s in outputs))
