"""Text models: an ``hf:`` folder with a fast tokenizer served text in, readable answers out.

The front ends tokenize (``textenc.py``); the engine's model takes the token ids, padded to a
length bucket with the attention mask, so requests of different lengths share a batch.  What
comes out depends on the architecture ``config.json`` names:

* ``*ForSequenceClassification``: ``label`` (BYTES, from ``id2label``) and ``score`` (its
  softmax probability) beside ``logits``;
* ``*ForTokenClassification``: the same per token (padding positions included: the mask the
  client sent says which are real; ``label`` and ``score`` are per position);
* a bare encoder (``BertModel``, ``RobertaModel``...: it returns ``last_hidden_state``):
  ``embedding``, pooled over the real tokens (``pooling = "mean"``) or the first (``"cls"``),
  scaled to unit length with ``normalize = true`` (sentence-transformers' convention);
* anything else: the tensors the model returns, as ``hf.py`` derives them.

The module counts real and padded tokens per forward: the padding waste ``describe`` shows.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import hf
from .config import ModelConfig
from .tensors import TensorSpec
from .textenc import TextPlan, check_tokenizer_folder, default_buckets
from .zoo import SourceError

DEFAULT_MAX_LENGTH = 512
IDS = ("input_ids", "attention_mask", "token_type_ids")


def head_kind(architecture: str, outputs: tuple[TensorSpec, ...]) -> str:
    """"classify", "tokens", "embed" or "raw" (see the module docstring)."""
    if architecture.endswith("ForSequenceClassification"):
        return "classify"
    if architecture.endswith("ForTokenClassification"):
        return "tokens"
    if any(s.name == "last_hidden_state" for s in outputs) and architecture.endswith("Model"):
        return "embed"
    return "raw"


def _limit(doc: dict[str, Any], tok_doc: dict[str, Any]) -> int:
    """The longest input the model and its tokenizer take (at most 512 unless configured)."""
    limits = [DEFAULT_MAX_LENGTH]
    for value in (doc.get("max_position_embeddings"), tok_doc.get("model_max_length")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9:
            limits.append(int(value))
    return min(limits)


def _pad_id(path: Path, doc: dict[str, Any], tok_doc: dict[str, Any]) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    pad = tok_doc.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    found = tok.token_to_id(pad) if isinstance(pad, str) else None
    if found is None:
        found = tok.token_to_id("[PAD]") if tok.token_to_id("[PAD]") is not None else tok.token_to_id("<pad>")
    if found is None:
        declared = doc.get("pad_token_id")
        found = declared if isinstance(declared, int) else 0
    return int(found)


_PLANS: dict[tuple[Any, ...], TextPlan | None] = {}
_PLANS_LOCK = threading.Lock()


def text_plan(cfg: ModelConfig, folder: Path) -> TextPlan | None:
    """How this hf: model takes text, or None (no tokenizer, or ``tokenizer = false``, or its
    inputs declared by hand).  Refusals name the file and why (remote code, a limit).  Cached
    per folder, files' modification times and text keys: every replica asks, on the loop."""
    if cfg.tokenizer is False or (cfg.inputs is not None and cfg.tokenizer is None):
        return None
    stamps = tuple(p.stat().st_mtime if p.exists() else 0.0
                   for p in (folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "config.json"))
    key = (str(folder.resolve()), stamps, cfg.tokenizer, cfg.max_length, cfg.truncation, cfg.buckets, cfg.source,
           cfg.max_batch_size)
    with _PLANS_LOCK:
        if key in _PLANS:
            return _PLANS[key]
    plan = _text_plan(cfg, folder)
    with _PLANS_LOCK:
        _PLANS[key] = plan
    return plan


def _text_plan(cfg: ModelConfig, folder: Path) -> TextPlan | None:
    try:
        found = check_tokenizer_folder(folder, cfg.source)
    except ValueError as e:
        raise SourceError(str(e)) from None
    if found is None:
        if cfg.tokenizer:
            raise SourceError(f"{cfg.source}: tokenizer = true, but {folder} has no tokenizer.json")
        return None
    path, tok_doc = found
    doc = hf.read_config(folder, cfg.source)
    cls = hf.model_class(doc, cfg.source)
    limit = _limit(doc, tok_doc)
    max_length = cfg.max_length or limit
    positions = doc.get("max_position_embeddings")
    if isinstance(positions, int) and max_length > positions:
        raise SourceError(f"{cfg.source}: max_length {max_length} is over the model's max_position_embeddings "
                          f"({positions})")
    buckets = cfg.buckets or default_buckets(max_length)
    if buckets[-1] > max_length:
        raise SourceError(f"{cfg.source}: buckets go to {buckets[-1]} tokens, over max_length {max_length}")
    if buckets[-1] < max_length:
        buckets = (*buckets, max_length)
    params = inspect.signature(cls.forward).parameters
    kind = head_kind(cls.__name__, ())
    return TextPlan(str(path), max_length, cfg.truncation, tuple(buckets), pair=kind in ("classify", "tokens"),
                    token_types="token_type_ids" in params, pad_id=_pad_id(path, doc, tok_doc),
                    max_rows=max(1, cfg.max_batch_size))


def text_specs(cfg: ModelConfig, folder: Path,
               plan: TextPlan) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], str]:
    """The engine-side inputs (token ids), the outputs people read, and the head kind."""
    doc = hf.read_config(folder, cfg.source)
    _, derived_out = hf.derive_specs(folder, cfg.source)
    inputs = tuple(TensorSpec(n, "INT64", (-1, -1)) for n in IDS
                   if n != "token_type_ids" or plan.token_types)
    kind = head_kind(str(doc["architectures"][0]), derived_out)
    logits = next((s for s in derived_out if s.name == "logits"), None)
    if kind == "classify" and logits is not None:
        outputs: tuple[TensorSpec, ...] = (logits, TensorSpec("label", "BYTES", (-1,)),
                                           TensorSpec("score", "FP32", (-1,)))
    elif kind == "tokens" and logits is not None:
        outputs = (logits, TensorSpec("label", "BYTES", (-1, -1)), TensorSpec("score", "FP32", (-1, -1)))
    elif kind == "embed":
        hidden = next(s for s in derived_out if s.name == "last_hidden_state").shape[-1]
        outputs = (TensorSpec("embedding", "FP32", (-1, hidden)),)
    else:
        kind, outputs = "raw", derived_out
    return inputs, outputs, kind


def labels(doc: dict[str, Any], count: int) -> list[bytes]:
    """``id2label`` as UTF-8 bytes by index (``LABEL_k`` where the config names none)."""
    given = doc.get("id2label")
    raw: dict[Any, Any] = given if isinstance(given, dict) else {}
    return [str(raw.get(str(k), raw.get(k, f"LABEL_{k}"))).encode() for k in range(count)]


class HFTextModule(nn.Module):
    """The model behind a text front: token ids in, the declared outputs out (module docstring)."""

    def __init__(self, model: nn.Module, kind: str, input_names: tuple[str, ...], output_names: tuple[str, ...],
                 label_names: list[bytes], pooling: str, normalize: bool):
        super().__init__()
        self.model = model
        self.kind = kind
        self.input_names = input_names
        self.output_names = output_names
        self.label_names = np.array(label_names, dtype=object)
        self.pooling = pooling
        self.normalize = normalize
        self.real_tokens = 0  # attention-mask ones seen
        self.all_tokens = 0  # positions run, padding included

    def forward(self, *tensors: torch.Tensor) -> tuple[Any, ...]:
        x = dict(zip(self.input_names, tensors))
        mask = x["attention_mask"]
        self.all_tokens += mask.numel()
        self.real_tokens += int(mask.sum())
        out = self.model(**x, return_dict=True)
        if self.kind in ("classify", "tokens"):
            logits = out["logits"]
            score, index = logits.float().softmax(-1).max(-1)
            label = self.label_names[index.cpu().numpy()]
            return logits, label, score
        if self.kind == "embed":
            h = out["last_hidden_state"]
            if self.pooling == "cls":
                e = h[:, 0]
            else:
                m = mask.unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            if self.normalize:
                e = nn.functional.normalize(e, p=2, dim=-1)
            return (e.float(),)
        return tuple(out[n] for n in self.output_names)

    def padding_waste(self) -> float | None:
        """Padded positions per real token so far (None before the first batch)."""
        if not self.real_tokens:
            return None
        return (self.all_tokens - self.real_tokens) / self.real_tokens


def wrap(module: hf.HFModule, cfg: ModelConfig, folder: Path, kind: str,
         outputs: tuple[TensorSpec, ...]) -> HFTextModule:
    """The loaded transformers model (inside ``hf.load``'s wrapper) as a text module."""
    doc = hf.read_config(folder, cfg.source)
    count = next((s.shape[-1] for s in outputs if s.name == "logits"), 0)
    return HFTextModule(module.model, kind, module.input_names, tuple(s.name for s in outputs),
                        labels(doc, int(count)) if count and count > 0 else [], cfg.pooling, cfg.normalize)
