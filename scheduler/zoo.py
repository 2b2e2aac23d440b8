"""Built-in demo models, so modelconsole serves something with no files at all.

Every model's weights are deterministic: each build seeds its own
``torch.Generator`` and fills every parameter from it, so two builds (two
processes, two machines, a reload after eviction) give bit-identical weights
and therefore identical answers.  That keeps the result cache, A/B
comparisons and tests meaningful for the zoo.

Modules are constructed on the ``meta`` device and then materialised with
``to_empty``: PyTorch's own default initialisation would draw from the global
RNG (not deterministic for us) and cost a second pass over every weight.

``specs`` answers a model's inputs and outputs without building anything, so
registering a zoo model is cheap; ``build`` makes the module.  Casting to
FP16/BF16 is the loader's job (sources.py), not the zoo's.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tensors import TensorSpec

Specs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


class SourceError(ValueError):
    """A model source cannot be loaded; the message names the source and why.

    Defined here (not in sources.py) because sources imports the zoo; sources
    re-exports it, and callers should import it from there.
    """


# ------------------------------------------------------------------ models


class TinyMLP(nn.Module):
    """64 -> hidden -> 10 with ReLU: the latency-benchmark model, so it stays tiny."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    """CIFAR-shaped classifier: two conv/ReLU/max-pool stages and a linear head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # 32 -> 16
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # 16 -> 8
        return self.head(x.flatten(1))


class Encoder(nn.Module):
    """BERT-like encoder: token + learned position embeddings, pre-norm layers, mean pool."""

    def __init__(self, layers: int, d_model: int, heads: int, seq: int, vocab: int, ffn: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(seq, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        # Nested tensors only help with padding masks, which we never pass.
        self.layers = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Clamp instead of failing: an out-of-range id is an index error on
        # CPU but a device-side assert on CUDA, which poisons the whole CUDA
        # context (every other model on that GPU) — too high a price for a demo.
        ids = input_ids.clamp(0, self.vocab - 1)
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.layers(self.tokens(ids) + self.positions(pos))
        return h.mean(dim=1)


_FLOATS_PER_MIB = (1 << 20) // 4


class Sized(nn.Module):
    """A model of a chosen weight size (mib MiB of FP32) whose forward is still cheap.

    Used to exercise memory budgets, eviction and reload times: the big
    ``bank`` parameter is what the scheduler has to place; forward touches
    only a 16-element slice of it (so tracing keeps it) and a 16x16 linear.
    """

    def __init__(self, mib: int = 64) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.empty(mib, _FLOATS_PER_MIB))
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.bank[0, :16]


class Identity(nn.Module):
    """Returns its inputs as its outputs: every datatype (BYTES included) end to end.

    Declare its tensors in the config (``inputs``/``outputs``, same datatypes
    and shapes, in order); without them it echoes one FP32 ``input`` [-1, -1]
    as ``output``.  Protocol tests and demos use it; it holds no weights.
    """

    def forward(self, *xs: Any) -> Any:
        return xs[0] if len(xs) == 1 else xs


# ------------------------------------------------------------ registry


def _fp32(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, "FP32", (-1, *shape))


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: its arguments with defaults, its tensors and how to make it."""

    description: str
    defaults: dict[str, int]
    specs: Callable[[dict[str, int]], Specs]
    make: Callable[..., nn.Module]
    check: Callable[[dict[str, int]], None] = lambda a: None


def _check_encoder(a: dict[str, int]) -> None:
    if a["d_model"] % a["heads"]:
        raise SourceError(
            f"args.heads: expected a divisor of d_model ({a['d_model']}), got {a['heads']}"
        )


ZOO: dict[str, ZooModel] = {
    "tiny-mlp": ZooModel(
        "64 -> hidden -> 10 MLP (latency benchmarks)",
        {"hidden": 128},
        lambda a: ((_fp32("input", 64),), (_fp32("logits", 10),)),
        TinyMLP,
    ),
    "small-cnn": ZooModel(
        "two-stage CNN on 3x32x32 images, 10 classes",
        {"channels": 16},
        lambda a: ((_fp32("input", 3, 32, 32),), (_fp32("logits", 10),)),
        SmallCNN,
    ),
    "encoder": ZooModel(
        "BERT-like transformer encoder, mean-pooled embedding",
        {"layers": 12, "d_model": 768, "heads": 12, "seq": 128, "vocab": 30522, "ffn": 0},
        lambda a: (
            (TensorSpec("input_ids", "INT64", (-1, a["seq"])),),
            (_fp32("embedding", a["d_model"]),),
        ),
        Encoder,
        _check_encoder,
    ),
    "sized": ZooModel(
        "a model holding mib MiB of FP32 weights with a cheap forward",
        {"mib": 64},
        lambda a: ((_fp32("input", 16),), (_fp32("output", 16),)),
        Sized,
    ),
    "identity": ZooModel(
        "echoes its inputs (declare inputs/outputs for any datatypes); no weights",
        {},
        lambda a: ((TensorSpec("input", "FP32", (-1, -1)),), (TensorSpec("output", "FP32", (-1, -1)),)),
        Identity,
    ),
}


def _lookup(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise SourceError(f"unknown zoo model \"{name}\" (available: {', '.join(ZOO)})") from None


def _args(name: str, entry: ZooModel, args: dict[str, Any]) -> dict[str, int]:
    """Check args against the entry's defaults and fill in the rest.

    Every zoo argument is a positive integer; ``ffn = 0`` in the encoder's
    defaults means "4 * d_model" and cannot be given explicitly.
    """
    if not isinstance(args, dict):
        raise SourceError(f"args: expected a table, got {type(args).__name__}")
    out = dict(entry.defaults)
    for key, value in args.items():
        if key not in entry.defaults:
            expected = ", ".join(entry.defaults)
            raise SourceError(f"args.{key}: unknown argument for zoo model {name} (expected: {expected})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SourceError(f"args.{key}: expected a positive integer, got {value!r}")
        out[key] = value
    if "ffn" in out and out["ffn"] == 0:
        out["ffn"] = 4 * out["d_model"]
    entry.check(out)
    return out


def specs(name: str, args: dict[str, Any]) -> Specs:
    """A zoo model's (inputs, outputs) without building it; checks args the same way build does."""
    entry = _lookup(name)
    return entry.specs(_args(name, entry, args))


def _seed(name: str) -> int:
    # crc32 rather than hash(): str hashes are salted per process.
    return zlib.crc32(name.encode())


@torch.no_grad()
def _init(module: nn.Module, gen: torch.Generator, skip: frozenset[str] = frozenset()) -> None:
    """Fill every parameter and buffer of a freshly ``to_empty``'d module from gen.

    Weights (2-D and up) are uniform in +-1/sqrt(fan_in) like PyTorch's
    defaults, biases likewise with their layer's fan_in, norm layers start
    as identity.  Iteration order is the module's registration order, which
    is fixed by the code, so the result depends only on the seed.
    """
    for mod_name, mod in module.named_modules():
        weight = getattr(mod, "weight", None)
        if weight is None:
            weight = getattr(mod, "in_proj_weight", None)  # nn.MultiheadAttention
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if full in skip:
                continue
            if isinstance(mod, nn.LayerNorm):
                p.fill_(1.0 if p_name == "weight" else 0.0)
            elif p.dim() >= 2:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                bound = 1.0 / math.sqrt(weight[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            else:
                p.zero_()
    for b in module.buffers():
        b.zero_()


@torch.no_grad()
def _fill_bank(bank: torch.Tensor, gen: torch.Generator) -> None:
    """Fill the sized model's bank fast: one random MiB, copied into every row.

    Drawing 128M numbers from a CPU generator takes seconds at 512 MiB; a
    broadcast copy of one 1 MiB row runs at memory speed.  Rows differ by a
    small per-row offset so the bank is not trivially repetitive.
    """
    row = torch.empty(_FLOATS_PER_MIB).uniform_(-0.01, 0.01, generator=gen)
    bank.copy_(row.expand_as(bank))
    bank.add_(torch.arange(bank.shape[0], dtype=bank.dtype).mul_(1e-6).unsqueeze(1))


def build(name: str, args: dict[str, Any]) -> tuple[nn.Module, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Build a zoo model on the CPU in eval mode: (module, inputs, outputs).

    Deterministic: the same name and args give bit-identical weights.
    """
    entry = _lookup(name)
    a = _args(name, entry, args)
    inputs, outputs = entry.specs(a)
    with torch.device("meta"):
        module = entry.make(**a)
    module = module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(_seed(name))
    if isinstance(module, Sized):
        _init(module, gen, skip=frozenset({"bank"}))
        _fill_bank(module.bank, gen)
    else:
        _init(module, gen)
    module.eval().requires_grad_(False)
    return module, inputs, outputs
