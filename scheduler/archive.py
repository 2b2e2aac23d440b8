"""What a ``torch.export`` archive (.pt2) declares, read without loading it.

``torch.export.load`` unpickles parts of the archive, so it runs only for a
trusted root and only at load time.  The program's graph, though, is stored
as JSON (``<archive>/models/<name>.json``, torch's export schema): its
signature names the user inputs and outputs, and its ``tensor_values`` give
each one's dtype and sizes.  Reading that JSON with ``zipfile`` and ``json``
runs no code from the file, so a registration can know a program's tensors
before its first load (``/v2/models/{name}`` and its config are complete at
once, as perf_analyzer expects) and a file that is not an archive is refused
when it is registered rather than when a request first reaches it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from .tensors import TensorSpec, v2_datatype
from .zoo import SourceError

MAX_GRAPH_JSON = 256 * 2**20  # a graph description larger than this is not read (bounded inflation)

# torch/_export/serde/schema.py ScalarType: the enum's values as the JSON stores them
SCALAR_TYPES: dict[int, torch.dtype] = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
    7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16,
}


def _graph_json(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if i.filename.endswith("/models/model.json")] or \
                [i for i in z.infolist() if "/models/" in i.filename and i.filename.endswith(".json")]
            if not members:
                raise SourceError(f"{path.name}: not a torch.export archive (no models/*.json inside; "
                                  "expected a file written by torch.export.save)")
            info = members[0]
            if info.file_size > MAX_GRAPH_JSON:
                raise SourceError(f"{path.name}: its graph description is {info.file_size} bytes, over the "
                                  f"{MAX_GRAPH_JSON} this reads")
            with z.open(info) as f:
                raw = f.read(MAX_GRAPH_JSON + 1)
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceError(f"{path.name}: not a torch.export archive (expected a zip written by "
                          f"torch.export.save): {e}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise SourceError(f"{path.name}: the archive's graph is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise SourceError(f"{path.name}: the archive's graph has no graph_module (an unknown export format)")
    return doc["graph_module"]


def _spec(path: Path, name: str, tensor: str, values: dict[str, Any]) -> TensorSpec:
    meta = values.get(tensor)
    if not isinstance(meta, dict):
        raise SourceError(f"{path.name}: the program's {name} has no tensor description")
    dtype = SCALAR_TYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    datatype = v2_datatype(dtype) if dtype is not None else None
    if datatype is None:
        raise SourceError(f"{path.name}: the program's {name} has a dtype V2 cannot carry ({meta.get('dtype')})")
    shape = []
    for size in meta.get("sizes") or ():
        shape.append(size["as_int"] if isinstance(size, dict) and isinstance(size.get("as_int"), int) else -1)
    return TensorSpec(name, datatype, tuple(shape))


def export_archive_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the program in a .pt2 archive, as ``sources.export_specs`` derives them
    from the loaded program: inputs keep the forward's argument names, outputs are output0, ...;
    a dynamic dimension is -1.  A SourceError names the file and what was expected."""
    gm = _graph_json(path)
    sig = gm.get("signature") or {}
    values = (gm.get("graph") or {}).get("tensor_values") or {}
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for spec in sig.get("input_specs") or ():
        user = spec.get("user_input") if isinstance(spec, dict) else None
        if user is None:
            continue  # a parameter, buffer or constant: not the caller's
        arg = (user.get("arg") or {}).get("as_tensor")
        if not isinstance(arg, dict):
            raise SourceError(f"{path.name}: the program takes a non-tensor input; only tensors can be served")
        inputs.append(_spec(path, arg["name"], arg["name"], values))
    for spec in sig.get("output_specs") or ():
        user = spec.get("user_output") if isinstance(spec, dict) else None
        if user is None:
            continue  # a mutated buffer, a gradient: not returned to the caller
        arg = (user.get("arg") or {}).get("as_tensor")
        if not isinstance(arg, dict):
            raise SourceError(f"{path.name}: the program returns a non-tensor output; only tensors can be served")
        outputs.append(_spec(path, f"output{len(outputs)}", arg["name"], values))
    if not inputs or not outputs:
        raise SourceError(f"{path.name}: the program's signature lists no tensor inputs or outputs")
    return tuple(inputs), tuple(outputs)
