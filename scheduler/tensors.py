"""V2 tensor descriptions and the checks a request's inputs must pass.

Every model declares its inputs and outputs as V2 tensors (name, datatype,
shape with -1 for a variable dimension).  Requests are validated against
those declarations *before* they are queued, so a bad request costs the
device nothing and its error names the tensor and what was expected.

The checks run on the hot path: they are plain attribute and tuple
comparisons, no allocation beyond the converted tensor itself.

torch is imported on first use, not with this module: a front-end process
(which decodes and encodes with numpy, and checks declarations against
``TensorSpec``) never needs it unless a tensor is BF16, so it starts fast and
stays small.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    import torch

# V2 datatype -> (torch dtype's name or None for BYTES, numpy dtype or None, bytes per element)
_DATATYPES: dict[str, tuple[str | None, Any, int]] = {
    "BOOL": ("bool", np.dtype(np.bool_), 1),
    "UINT8": ("uint8", np.dtype(np.uint8), 1),
    "UINT16": ("uint16", np.dtype(np.uint16), 2),
    "UINT32": ("uint32", np.dtype(np.uint32), 4),
    "UINT64": ("uint64", np.dtype(np.uint64), 8),
    "INT8": ("int8", np.dtype(np.int8), 1),
    "INT16": ("int16", np.dtype(np.int16), 2),
    "INT32": ("int32", np.dtype(np.int32), 4),
    "INT64": ("int64", np.dtype(np.int64), 8),
    "FP16": ("float16", np.dtype(np.float16), 2),
    "BF16": ("bfloat16", None, 2),  # numpy has no bfloat16
    "FP32": ("float32", np.dtype(np.float32), 4),
    "FP64": ("float64", np.dtype(np.float64), 8),
    "BYTES": (None, np.dtype(object), 0),
}
DATATYPES = tuple(_DATATYPES)
_NUMPY_TO_V2 = {n: name for name, (_, n, _) in _DATATYPES.items() if n is not None}


def torch_module() -> Any:
    """torch, imported the first time something needs it (module docstring)."""
    return sys.modules.get("torch") or _import_torch()


def _import_torch() -> Any:
    import torch

    return torch


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (where nothing imported it,
    nothing made one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


@functools.cache
def torch_to_v2() -> dict[Any, str]:
    """torch dtype -> V2 datatype."""
    torch = torch_module()
    return {getattr(torch, t): name for name, (t, _, _) in _DATATYPES.items() if t is not None}


def torch_dtype(datatype: str) -> torch.dtype:
    t = _DATATYPES[datatype][0]
    if t is None:
        raise ValueError(f"{datatype} has no torch dtype")
    dtype: torch.dtype = getattr(torch_module(), t)
    return dtype


def numpy_dtype(datatype: str) -> Any:
    return _DATATYPES[datatype][1]


def element_size(datatype: str) -> int:
    return _DATATYPES[datatype][2]


def v2_datatype(value: Any) -> str | None:
    """The V2 datatype of a tensor, array or dtype; None if it has none."""
    dtype = getattr(value, "dtype", value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return torch_to_v2().get(dtype)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return None
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    return _NUMPY_TO_V2.get(dtype)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared input or output: V2 name, datatype and shape (-1 = variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        for want, got in zip(self.shape, shape):
            if want != -1 and want != got:
                return False
        return True

    def example_shape(self, batch: int = 1, free_dim: int = 8) -> tuple[int, ...]:
        """A concrete shape this spec accepts: batch for dim 0 if variable, free_dim elsewhere."""
        out = []
        for i, d in enumerate(self.shape):
            out.append(d if d != -1 else (batch if i == 0 else free_dim))
        return tuple(out)


def random_tensor(spec: TensorSpec, batch: int = 1, generator: torch.Generator | None = None) -> Any:
    """A random input that satisfies spec (used for warmup and --check-config).

    Integers are drawn from [0, 2) so that token ids and class indices are
    valid for any vocabulary; floats from a standard normal.
    """
    shape = spec.example_shape(batch)
    if spec.datatype == "BYTES":
        return np.full(shape, b"warmup", dtype=object)
    torch = torch_module()
    dtype = torch_dtype(spec.datatype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    return torch.randint(0, 2, shape, generator=generator).to(dtype)


def describe(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def to_tensor(spec: TensorSpec, value: Any, max_batch_size: int) -> Any:
    """Check one input against its spec and return it as a CPU tensor.

    Accepts torch tensors and numpy arrays (converted without a copy).  BYTES
    inputs stay numpy object arrays.  With batching on (max_batch_size > 0)
    dim 0 is the batch and may not exceed max_batch_size.
    """
    torch = torch_module()  # the engine's process: imported already
    if isinstance(value, np.ndarray):
        got_type = v2_datatype(value.dtype)
    elif isinstance(value, torch.Tensor):
        got_type = torch_to_v2().get(value.dtype)
    else:
        raise InputError(
            f"input '{spec.name}': expected a tensor or numpy array, got {type(value).__name__}"
        )
    if got_type != spec.datatype:
        raise InputError(
            f"input '{spec.name}': expected datatype {spec.datatype}, got {got_type or value.dtype}"
        )
    shape = tuple(value.shape)
    if not spec.accepts_shape(shape):
        raise InputError(
            f"input '{spec.name}': expected shape {describe(spec.shape)}, got {describe(shape)}"
        )
    if max_batch_size > 0:
        if shape[0] < 1:
            raise InputError(f"input '{spec.name}': batch dimension must be at least 1, got {shape[0]}")
        if shape[0] > max_batch_size:
            raise InputError(
                f"input '{spec.name}': batch of {shape[0]} exceeds the model's max_batch_size {max_batch_size}"
            )
    if spec.datatype == "BYTES":
        return value if isinstance(value, np.ndarray) else np.asarray(value, dtype=object)
    if isinstance(value, np.ndarray):
        if not (value.flags.c_contiguous and value.flags.writeable):
            value = np.ascontiguousarray(value) if value.flags.writeable else value.copy(order="C")
        t = torch.from_numpy(value)
        return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()  # clone: torch's allocator aligns
    if value.device.type != "cpu":
        value = value.cpu()
    if not value.is_contiguous() or value.data_ptr() % ALIGNMENT:
        return value.clone(memory_format=torch.contiguous_format)
    return value


ALIGNMENT = 64
"""Where every input tensor's first byte lies (a multiple of this many bytes).  On some CPUs
(AVX-512 among them) torch's kernels round differently when a buffer starts 4 or 8 bytes off a
cache line, so the same input could give other bits depending on where a decoder happened to put
its bytes.  torch's own allocator aligns to 64; numpy's and a request body's do not."""



def validate_inputs(
    specs: tuple[TensorSpec, ...], inputs: Mapping[str, Any], max_batch_size: int
) -> tuple[list[Any], int]:
    """Check every input; return them in declared order and the batch size.

    Raises InputError naming the first wrong input: a missing or unknown
    name, a wrong datatype or shape, or inputs that disagree on batch size.
    """
    if len(inputs) != len(specs) or any(s.name not in inputs for s in specs):
        names = {s.name for s in specs}
        missing = [s.name for s in specs if s.name not in inputs]
        unknown = [n for n in inputs if n not in names]
        if missing:
            raise InputError(f"missing input '{missing[0]}' (expected inputs: {', '.join(sorted(names))})")
        raise InputError(f"unknown input '{unknown[0]}' (expected inputs: {', '.join(sorted(names))})")
    out = []
    batch = 1
    for i, spec in enumerate(specs):
        t = to_tensor(spec, inputs[spec.name], max_batch_size)
        if max_batch_size > 0:
            n = t.shape[0]
            if i == 0:
                batch = n
            elif n != batch:
                raise InputError(
                    f"input '{spec.name}': batch dimension {n} differs from input '{specs[0].name}' ({batch})"
                )
        out.append(t)
    return out, batch


def output_mean(value: Any) -> float | None:
    """The mean of all elements of one numeric output (None if it has none, or is not numeric):
    a split's per-arm metric (versions.py), computed on the model's worker thread."""
    if value is None:
        return None
    try:
        a = np.asarray(value)
        if a.dtype.kind not in "biuf" or a.size == 0:
            return None
        return float(a.mean())
    except Exception:  # noqa: BLE001 - e.g. BF16, which numpy cannot hold: not tracked
        return None


def parse_shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d >= 0) for d in value
    ):
        raise ValueError(f"expected a list of integers (-1 for a variable dimension), got {value!r}")
    return tuple(value)
