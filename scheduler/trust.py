"""Which Python a load may run, and which files may be unpickled: the trust rules, as pure checks.

A model version names Python code in one place only: ``factory =
"module:callable"`` (safetensors sources).  A control call can register a
model, so a factory named in a request must not reach arbitrary code
(``os:system``, ``subprocess:getoutput``).  A factory passes when

1. its module is a Python file inside a configured model root (looked up
   under the model's base directory, as the import will find it), and the
   callable is defined in that file; or
2. the operator's config file lists it under ``[security] factories``:
   ``"pkg.module:callable"`` allows that callable, ``"pkg.module"`` every
   public callable defined in that module.

Everything else is refused with a message that names the rule.  The check
runs at registration (nothing is imported) and again at load, where the
imported module must be the very file that was checked and the callable must
be defined in it (``mymodel:os.system`` reaches ``os`` through an import).

``torch.export.load`` unpickles parts of a ``.pt2`` archive (it calls
``torch.load with weights_only=False``), so ``export:`` sources load only from a
model root the operator marked ``trusted = true``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class TrustError(ValueError):
    """A source or factory that the trust rules refuse; the message names the rule."""


@dataclass(frozen=True)
class Trust:
    """What the operator's config allows, beside the model roots."""

    model_roots: tuple[str, ...] = ()
    trusted_roots: tuple[str, ...] = ()  # roots marked trusted = true (export programs may load)
    factories: tuple[str, ...] = ()  # [security] factories: "module:callable" or "module"


def split_factory(factory: str) -> tuple[str, str]:
    """``"pkg.mod:fn"`` -> ("pkg.mod", "fn"); the attribute path may not start a part with '_'."""
    module, _, attr = factory.partition(":")
    for part in attr.split("."):
        if not _IDENT.fullmatch(part):
            raise TrustError(f"factory {factory}: '{part}' is not a public name (no leading '_')")
    return module, attr


def allowlisted(factory: str, allow: tuple[str, ...]) -> bool:
    """Listed exactly (``module:callable``) or by its module (``module``)."""
    return factory in allow or factory.partition(":")[0] in allow


def module_file(module: str, base_dir: str | Path) -> Path | None:
    """The file ``import module`` finds under base_dir (``a/b.py`` or ``a/b/__init__.py``), resolved."""
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    stem = Path(base_dir).joinpath(*parts)
    for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def inside(path: Path, roots: tuple[str, ...]) -> bool:
    return any(path.is_relative_to(Path(r).resolve()) for r in roots)


def check_factory(factory: str, base_dir: str, trust: Trust) -> Path | None:
    """Before any import: the file the factory must come from (None when allowlisted).

    Raises TrustError naming the rule that refused it.
    """
    split_factory(factory)
    if allowlisted(factory, trust.factories):
        return None
    module = factory.partition(":")[0]
    path = module_file(module, base_dir)
    roots = trust.model_roots or (base_dir,)
    if path is not None and inside(path, roots):
        return path
    where = f"{module.replace('.', '/')}.py under {base_dir}"
    found = f"found {path}, outside the model roots" if path is not None else f"no {where}"
    raise TrustError(
        f"factory {factory} refused: a factory must be a Python file inside a model root "
        f"({', '.join(roots)}) or listed in the config file's [security] factories ({found})"
    )


def check_imported(factory: str, module: ModuleType, obj: Any, expected_file: Path | None,
                   allow: tuple[str, ...] = ()) -> None:
    """After the import: it is the file that was checked, and the callable is defined there.

    A factory the allowlist names exactly is the operator's own choice and
    may live in a submodule (``torchvision.models:resnet50`` is defined in
    ``torchvision.models.resnet``); one allowed by its module must be defined
    in that module or below it.
    """
    name, attr = split_factory(factory)
    if expected_file is not None:
        got = getattr(module, "__file__", None)
        if got is None or Path(got).resolve() != expected_file:
            raise TrustError(
                f"factory {factory} refused: importing {name} gave {got or 'a built-in module'}, "
                f"not the model root's file {expected_file}"
            )
    elif factory in allow:
        return
    defined_in = getattr(obj, "__module__", None) or ""
    below = expected_file is None and defined_in.startswith(name + ".")
    if defined_in != name and not below:
        raise TrustError(
            f"factory {factory} refused: {attr} is defined in {defined_in or 'no module'}, not in {name} "
            "(a factory must be defined in the module it is named by)"
        )


def is_trusted(path: Path, trust: Trust) -> bool:
    """A file inside a root the operator marked ``trusted = true``."""
    return bool(trust.trusted_roots) and inside(path, trust.trusted_roots)
