"""Text in: a model folder's fast tokenizer turning ``text`` (and ``text_pair``) into token ids.

It runs where a request is decoded: in every front-end process (``--workers N``), or in the
one server process (``--workers 0``), or in ``modelconsole.client``'s in-process path; never
on the engine core's loop.  numpy and the ``tokenizers`` library only: no torch, no
transformers, no network.

A batch's texts are padded to one length *bucket* (the smallest configured bucket that holds
its longest text), with the attention mask saying which tokens are real: requests of
different lengths in one bucket have one shape, so the engine batches them together.

``TextPlan`` is what the engine tells a front end about a model that takes text (a plain
dict on the wire: ``to_dict``/``from_dict``); ``TextEncoder`` is the loaded tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

TEXT = "text"
TEXT_PAIR = "text_pair"
MIN_BUCKET = 16
MAX_TOKENIZER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TextPlan:
    """How a model's text becomes its token inputs."""

    tokenizer: str  # the tokenizer.json file
    max_length: int
    truncation: bool
    buckets: tuple[int, ...]  # ascending; the last is max_length
    pair: bool  # takes text_pair too
    token_types: bool  # feeds token_type_ids (BERT-style pairs)
    pad_id: int
    max_rows: int = 1024  # texts per request: the model's max_batch_size (what the engine would refuse)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextPlan:
        return cls(str(d["tokenizer"]), int(d["max_length"]), bool(d["truncation"]),
                   tuple(int(b) for b in d["buckets"]), bool(d["pair"]), bool(d["token_types"]), int(d["pad_id"]),
                   int(d.get("max_rows", 1024)))


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 16 up to ``max_length``, and ``max_length`` itself."""
    out = []
    b = MIN_BUCKET
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens (``buckets`` ascending, the last the most)."""
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


def padding_waste(lengths: Sequence[int], buckets: Sequence[int], per_batch: int = 1) -> float:
    """Padded tokens per real token when each group of ``per_batch`` texts (in the given order)
    is padded to the bucket of its longest: the figure docs/benchmarks.md weighs buckets by."""
    real = sum(lengths)
    padded = 0
    for i in range(0, len(lengths), per_batch):
        group = lengths[i:i + per_batch]
        padded += bucket_for(max(group), buckets) * len(group)
    return (padded - real) / real if real else 0.0


def _texts(name: str, value: Any) -> list[str]:
    """A BYTES input's elements as strings: V2 JSON strings arrive as str, binary BYTES as bytes."""
    arr = np.asarray(value, dtype=object).reshape(-1)
    out = []
    for k, v in enumerate(arr):
        if isinstance(v, (bytes, bytearray, memoryview)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{name}: element {k} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        elif not isinstance(v, str):
            raise InputError(f"{name}: expected BYTES (text), got a {type(v).__name__} at element {k}")
        out.append(v)
    return out


class TextEncoder:
    """One tokenizer, loaded once per process (``encoder``)."""

    def __init__(self, plan: TextPlan):
        from tokenizers import Tokenizer

        self.plan = plan
        self._tok = Tokenizer.from_file(plan.tokenizer)
        self._tok.no_padding()
        # what a text becomes is bounded whatever its size: max_length tokens (truncation on), or one
        # more, enough to tell it is over the limit (off: refused below, with a message)
        self._tok.enable_truncation(plan.max_length if plan.truncation else plan.max_length + 1)

    def encode(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """``text`` (and ``text_pair``) -> ``input_ids``, ``attention_mask`` (and
        ``token_type_ids``), INT64 [batch, bucket]."""
        return self.tokenize(*self.texts(inputs))

    def texts(self, inputs: dict[str, Any]) -> tuple[list[str], list[str] | None]:
        """The request's texts (and pairs), checked against the plan before any is tokenized."""
        plan = self.plan
        extra = [n for n in inputs if n not in (TEXT, TEXT_PAIR)]
        if extra:
            raise InputError(f"{extra[0]}: unknown input of a text model (expected '{TEXT}'"
                             + (f" and optionally '{TEXT_PAIR}'" if plan.pair else "") + ")")
        if TEXT not in inputs:
            raise InputError(f"{TEXT}: missing (this model takes text)")
        texts = _texts(TEXT, inputs[TEXT])
        if not texts:
            raise InputError(f"{TEXT}: expected at least one string, got none")
        if len(texts) > plan.max_rows:
            raise InputError(f"{TEXT}: {len(texts)} strings, over this model's max_batch_size of {plan.max_rows}")
        pairs = None
        if TEXT_PAIR in inputs:
            if not plan.pair:
                raise InputError(f"{TEXT_PAIR}: this model takes one text per row, not pairs")
            pairs = _texts(TEXT_PAIR, inputs[TEXT_PAIR])
            if len(pairs) != len(texts):
                raise InputError(f"{TEXT_PAIR}: expected {len(texts)} strings (one per '{TEXT}'), got {len(pairs)}")
        return texts, pairs

    def tokenize(self, texts: list[str], pairs: list[str] | None) -> dict[str, np.ndarray]:
        plan = self.plan
        batch = self._tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts)
        lengths = [len(e.ids) for e in batch]
        longest = max(lengths)
        if longest > plan.max_length and not plan.truncation:
            k = lengths.index(longest)
            raise InputError(f"{TEXT}: element {k} is over this model's max_length of {plan.max_length} tokens "
                             "(truncation is off: shorten it, or set truncation = true)")
        width = bucket_for(min(longest, plan.max_length), plan.buckets)
        ids = np.full((len(batch), width), plan.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64) if plan.token_types else None
        for row, e in enumerate(batch):
            n = min(len(e.ids), plan.max_length)  # truncation on: the first max_length tokens
            ids[row, :n] = e.ids[:n]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = e.type_ids[:n]
        out = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            out["token_type_ids"] = types
        return out


INLINE_BYTES = 4096  # a request with more text than this is tokenized on a thread, off the event loop


async def encode(plan: TextPlan, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """``TextEncoder.encode`` for a request being served: short text right here (a thread hop
    costs more than it), longer text on a thread, so the serving loop keeps answering others."""
    enc = encoder(plan)
    texts, pairs = enc.texts(inputs)
    if sum(map(len, texts)) + sum(map(len, pairs or ())) <= INLINE_BYTES:
        return enc.tokenize(texts, pairs)
    return await asyncio.to_thread(enc.tokenize, texts, pairs)


_ENCODERS: dict[TextPlan, TextEncoder] = {}
_LOCK = threading.Lock()


def encoder(plan: TextPlan) -> TextEncoder:
    """The process's encoder for ``plan`` (loaded on first use)."""
    found = _ENCODERS.get(plan)
    if found is None:
        with _LOCK:
            found = _ENCODERS.get(plan)
            if found is None:
                found = _ENCODERS[plan] = TextEncoder(plan)
    return found


def check_tokenizer_folder(folder: Path, source: str) -> tuple[Path, dict[str, Any]] | None:
    """The folder's ``tokenizer.json`` and its ``tokenizer_config.json`` (or {}), or None when it
    has no fast tokenizer.  A tokenizer that asks for remote code is refused, naming why; the
    file must parse (``tokenizers`` reads it here, offline)."""
    path = folder / "tokenizer.json"
    cfg_path = folder / "tokenizer_config.json"
    doc: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            loaded = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{source}: tokenizer_config.json is not valid JSON: {e}") from None
        doc = loaded if isinstance(loaded, dict) else {}
        if doc.get("auto_map"):
            raise ValueError(f"{source}: tokenizer_config.json asks for remote code (auto_map); modelconsole "
                             "never runs a folder's own Python: use a folder with a plain tokenizer.json")
    if not path.is_file():
        if cfg_path.is_file():
            raise ValueError(f"{source}: the folder has a tokenizer_config.json but no tokenizer.json (only fast "
                             "tokenizers are served; save one with tokenizer.save_pretrained, or set "
                             "tokenizer = false)")
        return None
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise ValueError(f"{source}: tokenizer.json is over {MAX_TOKENIZER_BYTES} bytes")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - whatever the library says, named
        raise ValueError(f"{source}: tokenizer.json is not a tokenizer the tokenizers library reads: {e}") from None
    return path, doc
