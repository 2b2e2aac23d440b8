"""Loading a model version from its configured source, safely.

Sources are ``zoo:NAME`` (built-in demo models), ``torchscript:PATH``,
``export:PATH`` (a ``torch.export`` .pt2 program), ``safetensors:PATH`` and
``state_dict:PATH`` (weights, plus a ``factory = "module:callable"`` that
builds the module; a state dict saved with ``torch.save`` is read with
``weights_only=True``), and ``hf:FOLDER`` (a Hugging Face model folder, hf.py).

Nothing is unpickled from an untrusted file (design invariant 8): a pickle
can run arbitrary code, and a model file is exactly what an operator
downloads from somewhere.  TorchScript archives are read by TorchScript's own
unpickler, which builds TorchScript objects only (a Python global in
``data.pkl`` is an error); safetensors files are a JSON header and raw
bytes.  ``torch.export.load`` does unpickle (``torch.load with weights_only=False``
on parts of the archive), so export programs load only from a model root the
operator marked ``trusted = true``.  The only Python a load runs is a factory
that trust.py's rules allow: a file inside a model root, or one the config
file's ``[security] factories`` lists.  tests/test_trust.py loads a
malicious archive of each format.

Source paths are resolved (symlinks included) and must stay inside the
configured model roots, so neither "../" nor a planted symlink can make the
server read a file elsewhere.

``load_model`` runs in a worker thread (it may take seconds); everything it
raises is a ``SourceError`` whose message names the source and the problem.

A load is done by a thread of its own at a lower OS priority (``LOAD_NICE``;
Linux, where nice is per thread), while the calling worker thread waits: a
hot swap loads the new version on the cores that are serving the old one,
and on a busy CPU the scheduler should give those cores to the requests
first and to the load with what is left.  The model's worker thread keeps its
normal priority for the forward passes that follow (an unprivileged process
could not raise a thread's priority back after lowering it).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import archive, hf, hftext, textenc, trust, zoo
from .config import ModelConfig
from .tensors import TensorSpec, torch_dtype, v2_datatype
from .zoo import SourceError

__all__ = ["LoadedModel", "SourceError", "check_trust", "declared_specs", "load_model", "resolve_path"]

PLATFORMS = {
    "zoo": "pytorch_zoo",
    "torchscript": "pytorch_torchscript",
    "export": "pytorch_export",
    "safetensors": "pytorch_safetensors",
    "state_dict": "pytorch_state_dict",
    "hf": "pytorch_transformers",
    "remote": "remote_v2",
}
FACTORY_KINDS = ("safetensors", "state_dict")  # weights files that need a factory to build the module


@dataclass
class LoadedModel:
    """A model ready to run: call ``module(*inputs)`` with tensors in declared order."""

    module: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_bytes: int  # parameters + buffers, as loaded (after any dtype cast)
    platform: str


# ------------------------------------------------------------------ paths


def resolve_path(cfg: ModelConfig) -> Path:
    """The source file (an ``hf:`` folder), resolved against base_dir with symlinks followed.

    The roots check comes before the existence check, so a probe outside the
    roots learns nothing about which files exist there.
    """
    ref = Path(cfg.source_ref).expanduser()
    base = Path(cfg.base_dir)
    path = (ref if ref.is_absolute() else base / ref).resolve()
    inside_roots(cfg, path)
    if not path.exists():
        raise SourceError(f"{cfg.source}: no such {'folder' if cfg.source_kind == 'hf' else 'file'}: {path}")
    if cfg.source_kind == "hf":
        if not path.is_dir():
            raise SourceError(f"{cfg.source}: not a folder: {path} (an hf: source is a Hugging Face model folder)")
    elif not path.is_file():
        raise SourceError(f"{cfg.source}: not a file: {path}")
    return path


def inside_roots(cfg: ModelConfig, path: Path) -> None:
    """A SourceError unless ``path`` (resolved) lies inside a model root."""
    roots = [Path(r).resolve() for r in (cfg.model_roots or (cfg.base_dir,))]
    if not any(path.resolve().is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise SourceError(f"{cfg.source}: source path {path.resolve()} resolves outside the model roots ({shown})")


def check_trust(cfg: ModelConfig) -> None:
    """The trust rules (trust.py) for cfg, before anything is read or imported; SourceError
    names the rule that refused it."""
    try:
        if cfg.source_kind == "remote":
            if cfg.token_env is not None:
                trust.check_token_env(cfg.token_env, cfg.trust)
            trust.check_remote_host(_remote_host(cfg), cfg.trust)
        if cfg.factory is not None:
            trust.check_factory(cfg.factory, str(Path(cfg.base_dir).resolve()), cfg.trust)
        if cfg.source_kind == "export":
            path = resolve_path(cfg)
            if not trust.is_trusted(path, cfg.trust):
                shown = ", ".join(cfg.trusted_roots) or "none is"
                raise trust.TrustError(
                    f"export programs are unpickled by torch.export.load, so they load only from a model root "
                    f"marked trusted = true (trusted roots: {shown}); {path} is not in one — mark its root "
                    "trusted in the config file, or serve a TorchScript or safetensors file instead")
    except trust.TrustError as e:
        raise SourceError(f"{cfg.source}: {e}") from None


def is_trusted(cfg: ModelConfig) -> bool:
    """The source file lies inside a root marked trusted (False for zoo models and on errors)."""
    if cfg.source_kind == "zoo" or not cfg.trusted_roots:
        return False
    try:
        return trust.is_trusted(resolve_path(cfg), cfg.trust)
    except SourceError:
        return False


# ------------------------------------------------------------------ specs


def _check_args_used(cfg: ModelConfig) -> None:
    """args only reach zoo models and factories; elsewhere they would silently do nothing."""
    if cfg.args and cfg.source_kind in ("torchscript", "export", "hf"):
        raise SourceError(
            f"{cfg.source}: args are only used by zoo models and safetensors factories, not {cfg.source_kind}"
        )


def declared_specs(cfg: ModelConfig) -> tuple[tuple[TensorSpec, ...] | None, tuple[TensorSpec, ...] | None]:
    """(inputs, outputs) known without loading weights; None where only a load can tell.

    Cheap enough for register time: zoo specs come from the zoo's table
    (which also checks the args), the rest from the config.
    """
    _check_args_used(cfg)
    if cfg.source_kind == "zoo":
        try:
            inputs, outputs = zoo.specs(cfg.source_ref, cfg.args)
        except SourceError as e:
            raise SourceError(f"{cfg.source}: {e}") from None
        return cfg.inputs or inputs, cfg.outputs or outputs
    if cfg.source_kind == "hf" and (cfg.inputs is None or cfg.outputs is None):
        # from the architecture on the meta device: no weights read (hf.py)
        folder = resolve_path(cfg)
        hf.weight_files(folder, cfg.source)  # no weights at all: refused at registration, naming the file
        plan = text_plan(cfg)
        if plan is not None:  # text in: token ids for the engine, readable outputs (hftext.py)
            text_in, text_out, _ = hftext.text_specs(cfg, folder, plan)
            return text_in, cfg.outputs or text_out
        derived_in, derived_out = hf.derive_specs(folder, cfg.source)
        return cfg.inputs or derived_in, cfg.outputs or derived_out
    if cfg.source_kind == "export":
        # the archive's graph JSON, read without unpickling (archive.py); a config's own names win
        derived_in, derived_out = archive.export_archive_specs(resolve_path(cfg))
        _check_counts(cfg, derived_in, derived_out)
        return cfg.inputs or derived_in, cfg.outputs or derived_out
    return cfg.inputs, cfg.outputs


def _check_counts(cfg: ModelConfig, derived_in: tuple[TensorSpec, ...], derived_out: tuple[TensorSpec, ...]) -> None:
    if cfg.inputs is not None and len(cfg.inputs) != len(derived_in):
        raise SourceError(
            f"{cfg.source}: config declares {len(cfg.inputs)} inputs but the program takes {len(derived_in)}"
        )
    if cfg.outputs is not None and len(cfg.outputs) != len(derived_out):
        raise SourceError(
            f"{cfg.source}: config declares {len(cfg.outputs)} outputs but the program returns {len(derived_out)}"
        )


def _require_specs(cfg: ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    if cfg.inputs is None or cfg.outputs is None:
        raise SourceError(
            f"{cfg.source}: {cfg.source_kind} models need inputs and outputs declared in the config "
            "(the file does not say what its tensors are called)"
        )
    return cfg.inputs, cfg.outputs


# ------------------------------------------------------------ helpers


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (each counted once)."""
    return sum(t.nbytes for t in module.parameters()) + sum(t.nbytes for t in module.buffers())


class CastModule(nn.Module):
    """Runs a module in a reduced precision behind full-precision tensors.

    Clients keep sending and receiving the declared datatypes (FP32 for the
    zoo); floating inputs are cast to the compute dtype on the way in and
    floating outputs back to their declared datatypes on the way out.
    """

    def __init__(self, inner: nn.Module, dtype: torch.dtype, output_dtypes: tuple[torch.dtype | None, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.output_dtypes = output_dtypes

    def _out(self, t: Any, i: int) -> Any:
        want = self.output_dtypes[i] if i < len(self.output_dtypes) else None
        if isinstance(t, torch.Tensor) and t.is_floating_point() and want is not None and want.is_floating_point:
            return t.to(want)
        return t

    def forward(self, *inputs: torch.Tensor) -> Any:
        args = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        out = self.inner(*args)
        if isinstance(out, (tuple, list)):
            return type(out)(self._out(t, i) for i, t in enumerate(out))
        return self._out(out, 0)


def _cast(module: nn.Module, cfg: ModelConfig, outputs: tuple[TensorSpec, ...]) -> nn.Module:
    if cfg.dtype is None:
        return module
    dtype = torch_dtype(cfg.dtype)
    out_dtypes = tuple(torch_dtype(s.datatype) if s.datatype != "BYTES" else None for s in outputs)
    return CastModule(module.to(dtype), dtype, out_dtypes)


def _finish(module: nn.Module, device: torch.device, eval_mode: bool = True) -> nn.Module:
    module = module.to(device)
    if eval_mode:
        module.eval()
    # Per parameter, because ScriptModules refuse module.requires_grad_().
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ------------------------------------------------------------- factory

# sys.path and sys.modules are process-wide and loads run in worker threads.
_IMPORT_LOCK = threading.Lock()
# Top-level module name -> the base_dir we imported it from.
_IMPORTED_FROM: dict[str, Path] = {}


def _import_factory(cfg: ModelConfig) -> Any:
    """Import cfg.factory's module with base_dir first on sys.path; return the callable.

    The trust rules are checked first (no import of a refused module) and
    again on what the import returned (trust.py).  A factory module usually
    sits next to the config file, so base_dir goes on sys.path only for the
    import.  Two configs in different directories may both call their module
    ``model``: if we imported that name from another base_dir before, it is
    forgotten first so each gets its own file.  A module already imported
    from the same base_dir is reused.
    """
    assert cfg.factory is not None
    mod_name, _, attr = cfg.factory.partition(":")
    base = Path(cfg.base_dir).resolve()
    try:
        expected = trust.check_factory(cfg.factory, str(base), cfg.trust)
    except trust.TrustError as e:
        raise SourceError(f"{cfg.source}: {e}") from None
    top = mod_name.split(".")[0]
    with _IMPORT_LOCK:
        if _IMPORTED_FROM.get(top, base) != base:
            for key in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
                del sys.modules[key]
        importlib.invalidate_caches()  # files written moments ago must be seen
        sys.path.insert(0, str(base))
        try:
            module = importlib.import_module(mod_name)
        except Exception as e:
            raise SourceError(
                f"{cfg.source}: factory {cfg.factory}: cannot import {mod_name} "
                f"(looked in {base} and the installed packages): {type(e).__name__}: {e}"
            ) from None
        finally:
            sys.path.remove(str(base))
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(base):
            _IMPORTED_FROM[top] = base
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SourceError(f"{cfg.source}: factory {cfg.factory}: {mod_name} has no attribute {attr}") from None
    if not callable(obj):
        raise SourceError(f"{cfg.source}: factory {cfg.factory}: {attr} is not callable")
    try:
        trust.check_imported(cfg.factory, module, obj, expected, cfg.factories)
    except trust.TrustError as e:
        raise SourceError(f"{cfg.source}: {e}") from None
    return obj


def _build_from_factory(cfg: ModelConfig, meta: bool = False) -> nn.Module:
    """Call the factory; with meta=True on the meta device (no memory, no init: the
    weights come from the file), which is what keeps a cold load near file speed."""
    factory = _import_factory(cfg)
    try:
        if meta:
            with torch.device("meta"):
                module = factory(**cfg.args)
        else:
            module = factory(**cfg.args)
    except Exception as e:
        raise SourceError(f"{cfg.source}: factory {cfg.factory} raised {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise SourceError(
            f"{cfg.source}: factory {cfg.factory} returned {type(module).__name__}, expected a torch.nn.Module"
        )
    return module


def _fit_problems(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Why state cannot be loaded strictly into module, in words (empty if it can)."""
    want = module.state_dict()
    problems = []
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    for k, t in want.items():
        if k in state and tuple(state[k].shape) != tuple(t.shape):
            problems.append(f"{k} has shape {list(state[k].shape)} in the file but {list(t.shape)} in the module")
    return problems


# --------------------------------------------------------------- loaders


def _load_zoo(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    try:
        module, inputs, outputs = zoo.build(cfg.source_ref, cfg.args)
    except SourceError as e:
        raise SourceError(f"{cfg.source}: {e}") from None
    inputs, outputs = cfg.inputs or inputs, cfg.outputs or outputs
    module = _finish(_cast(module, cfg, outputs), device)
    return LoadedModel(module, inputs, outputs, weight_bytes(module), PLATFORMS["zoo"])


def _load_torchscript(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    inputs, outputs = _require_specs(cfg)
    path = resolve_path(cfg)
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise SourceError(f"{cfg.source}: not a loadable TorchScript archive: {type(e).__name__}: {e}") from None
    module = _finish(module, device)
    return LoadedModel(module, inputs, outputs, weight_bytes(module), PLATFORMS["torchscript"])


def _spec_from_node(node: Any, name: str, cfg: ModelConfig) -> TensorSpec:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if not isinstance(val, torch.Tensor):
        raise SourceError(
            f"{cfg.source}: export program's {name} is not a tensor ({type(val).__name__}); "
            "only tensor inputs and outputs can be served"
        )
    datatype = v2_datatype(val.dtype)
    if datatype is None:
        raise SourceError(f"{cfg.source}: export program's {name} has dtype {val.dtype}, which V2 cannot carry")
    # A symbolic dimension (dynamic Dim at export time) is a SymInt, not an int.
    shape = tuple(d if type(d) is int else -1 for d in val.shape)
    return TensorSpec(name, datatype, shape)


def export_specs(ep: Any, cfg: ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of an ExportedProgram, read from its graph.

    Inputs keep the forward's argument names; outputs are named output0,
    output1, ...  Dimensions exported as dynamic become -1.
    """
    from torch.export.graph_signature import OutputKind

    sig = ep.graph_signature
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = tuple(_spec_from_node(nodes[name], name, cfg) for name in sig.user_inputs)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    results = out_node.args[0]
    user = [r for spec, r in zip(sig.output_specs, results) if spec.kind == OutputKind.USER_OUTPUT]
    outputs = tuple(_spec_from_node(r, f"output{i}", cfg) for i, r in enumerate(user))
    return inputs, outputs


def _load_export(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    check_trust(cfg)  # torch.export.load unpickles: trusted roots only
    path = resolve_path(cfg)
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise SourceError(f"{cfg.source}: not a loadable torch.export program: {type(e).__name__}: {e}") from None
    derived_in, derived_out = export_specs(ep, cfg)
    _check_counts(cfg, derived_in, derived_out)
    inputs, outputs = cfg.inputs or derived_in, cfg.outputs or derived_out
    if cfg.max_batch_size > 0:
        for s in inputs + outputs:
            if not s.shape or s.shape[0] != -1:
                raise SourceError(
                    f"{cfg.source}: tensor {s.name} has a fixed first dimension {list(s.shape)} but "
                    "max_batch_size > 0 needs a dynamic batch (export with a Dim for dim 0, "
                    "or set max_batch_size = 0)"
                )
    if device.type != "cpu":
        # Rewrites device constants baked into the graph too, which .to() on
        # the unlifted module would miss.
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, device)
    try:
        module = ep.module()
    except Exception as e:
        raise SourceError(f"{cfg.source}: cannot build a module from the program: {type(e).__name__}: {e}") from None
    # Exported modules refuse .eval() ("not supported yet"); they are traced
    # in whatever mode they were exported in, so there is nothing to switch.
    finished = _finish(module, device, eval_mode=False)
    return LoadedModel(finished, inputs, outputs, weight_bytes(finished), PLATFORMS["export"])


def _load_safetensors(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    from safetensors.torch import load_file

    path = resolve_path(cfg)

    def read() -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path), device=str(device))
        except Exception as e:
            raise SourceError(f"{cfg.source}: not a readable safetensors file: {type(e).__name__}: {e}") from None

    return _load_into_factory(cfg, device, read)


def _load_state_dict(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    """A ``torch.save`` state dict, read with ``weights_only=True`` (tensors only: any other pickled
    object is refused, never built), into the factory's module as safetensors are."""
    path = resolve_path(cfg)
    return _load_into_factory(cfg, device, lambda: hf.load_weights_only(path, device, cfg.source))


def text_plan(cfg: ModelConfig) -> textenc.TextPlan | None:
    """How an hf: model takes text (its folder's tokenizer), or None: every other model."""
    if cfg.source_kind != "hf":
        return None
    return hftext.text_plan(cfg, resolve_path(cfg))


def _load_hf(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    folder = resolve_path(cfg)
    inputs, outputs = declared_specs(cfg)
    assert inputs is not None and outputs is not None
    _kind, files = hf.weight_files(folder, cfg.source)
    for f in files:  # a shard may be a symlink (the hub's cache makes them): it must stay inside the roots
        inside_roots(cfg, f)
    loaded = hf.load(folder, cfg.source, device, inputs, outputs)
    plan = text_plan(cfg)
    if plan is not None:
        kind = hftext.text_specs(cfg, folder, plan)[2]
        module: nn.Module = _finish(hftext.wrap(loaded, cfg, folder, kind, outputs), device)
    else:
        module = _finish(loaded, device)
    return LoadedModel(module, inputs, outputs, weight_bytes(module), PLATFORMS["hf"])


def _remote_host(cfg: ModelConfig) -> str:
    from urllib.parse import urlsplit

    return urlsplit(cfg.source_ref).hostname or ""


def _check_remote_addresses(cfg: ModelConfig) -> None:
    """At load: what the remote's name resolves to now must pass the same rules as the name (a name
    registered as harmless may since point at a metadata address)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(cfg.source_ref)
    host = parts.hostname or ""
    try:
        found = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except OSError:
        return  # unreachable: the call itself fails and says so
    try:
        trust.check_remote_host(host, cfg.trust, tuple(sorted({str(a[4][0]) for a in found})))
    except trust.TrustError as e:
        raise SourceError(f"{cfg.source}: {e}") from None


def remote_target(cfg: ModelConfig) -> Any:
    """Where a remote: model's calls go, with its token (from token_env at load time)."""
    from . import remote

    check_trust(cfg)  # the config in force now: a token_env or host since refused does not go out
    _check_remote_addresses(cfg)
    token = cfg.token
    if cfg.token_env is not None:
        token = os.environ.get(cfg.token_env)
        if not token:
            raise SourceError(f"{cfg.source}: token_env {cfg.token_env} is not set in the server's environment")
    return remote.Target(cfg.source_ref.rstrip("/"), cfg.model or cfg.name, cfg.remote_version, token, cfg.timeout_s)


def _load_remote(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    from . import remote
    from .errors import RemoteError

    target = remote_target(cfg)
    try:
        derived_in, derived_out = remote.fetch_specs(target, cfg.source)
    except RemoteError as e:
        raise SourceError(e.message) from None
    _check_counts(cfg, derived_in, derived_out)
    for mine, theirs in zip((cfg.inputs or ()) + (cfg.outputs or ()), derived_in + derived_out):
        if (mine.name, mine.datatype) != (theirs.name, theirs.datatype) or len(mine.shape) != len(theirs.shape):
            raise SourceError(f"{cfg.source}: registered {mine.name} {mine.datatype} {list(mine.shape)}, but "
                              f"{target.host} serves {theirs.name} {theirs.datatype} {list(theirs.shape)}")
    inputs, outputs = cfg.inputs or derived_in, cfg.outputs or derived_out
    module = remote.RemoteModule(target, inputs, outputs, f"{cfg.name} v{cfg.version} ({cfg.source})")
    return LoadedModel(module, inputs, outputs, 0, PLATFORMS["remote"])


def _load_into_factory(cfg: ModelConfig, device: torch.device, read: Any) -> LoadedModel:
    """The factory's module built on the meta device, with the tensors ``read()`` answers adopted."""
    inputs, outputs = _require_specs(cfg)
    module = _build_from_factory(cfg, meta=True)
    state = read()
    problems = _fit_problems(module, state)
    if problems:
        raise SourceError(f"{cfg.source}: weights do not fit the factory's module: {'; '.join(problems)}")
    # The module keeps its own dtypes (what copying into it would do), but
    # the tensors are adopted (assign=True) rather than copied, so the
    # device holds one copy of the weights, not the factory's and the file's.
    want = module.state_dict()
    for k, t in state.items():
        if t.dtype != want[k].dtype:
            state[k] = t.to(want[k].dtype)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except Exception as e:
        raise SourceError(f"{cfg.source}: weights do not fit the factory's module: {e}") from None
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        # tensors the file does not hold (non-persistent buffers): build it for real
        module = _build_from_factory(cfg)
        module.load_state_dict(state, strict=True, assign=True)
    del state, want
    module = _finish(_cast(module, cfg, outputs), device)
    return LoadedModel(module, inputs, outputs, weight_bytes(module), PLATFORMS[cfg.source_kind])


_LOADERS = {
    "zoo": _load_zoo,
    "torchscript": _load_torchscript,
    "export": _load_export,
    "safetensors": _load_safetensors,
    "state_dict": _load_state_dict,
    "hf": _load_hf,
    "remote": _load_remote,
}


# The nice value a load runs at (0 = normal, 19 = lowest): at 10 the CFS scheduler gives a
# busy core ~10x more time to a normal-priority thread than to the load.
LOAD_NICE = 10


def load_model(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    """Load cfg's model onto device, in eval mode with gradients off.

    Slow (file reads, factory code, device copies): call it from a worker
    thread, never the event loop.  The work runs on a thread of its own at
    ``LOAD_NICE`` (this call waits for it).  Raises SourceError for every failure.
    """
    _check_args_used(cfg)
    loader = _LOADERS.get(cfg.source_kind)
    if loader is None:
        raise SourceError(f"{cfg.source}: unknown source kind {cfg.source_kind}")
    device = torch.device(device)
    return _at_low_priority(f"load:{cfg.name}:{cfg.version}", lambda: loader(cfg, device), device)


def _lower_priority(nice: int = LOAD_NICE) -> bool:
    """Lower the calling thread's CPU priority to ``nice`` (never raise it); True if done.

    Linux keeps a nice value per thread, addressed by its native id; elsewhere
    setpriority(PRIO_PROCESS) would change the whole process, so nothing is done.
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    except OSError:  # e.g. a seccomp profile that forbids it: load at normal priority
        return False


def _at_low_priority(name: str, fn: Any, device: torch.device) -> Any:
    """Run fn() on a new thread at ``LOAD_NICE`` and wait for it; its result, or its exception."""
    box: list[Any] = []

    def run() -> None:
        _lower_priority()
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            box.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread, which raises it
            box.append((False, e))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value
