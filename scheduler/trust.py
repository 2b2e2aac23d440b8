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

A ``remote:`` model sends a bearer token to the URL a registration names, so a
control call must not choose which secret leaves the host nor where it goes:
``token_env`` may name only variables the config allows (``[security]
token_env_prefix``, default ``MODELCONSOLE_REMOTE_``, or ``[security]
token_env``), and the URL's host may not be (or resolve to) a link-local,
multicast, unspecified or reserved address, nor a cloud metadata name, unless
``[security] remote_hosts`` lists it (a name, an address or a CIDR block).
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


DEFAULT_TOKEN_ENV_PREFIX = "MODELCONSOLE_REMOTE_"
# names that reach a cloud instance's metadata service (credentials) from inside it
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.com"})


@dataclass(frozen=True)
class Trust:
    """What the operator's config allows, beside the model roots."""

    model_roots: tuple[str, ...] = ()
    trusted_roots: tuple[str, ...] = ()  # roots marked trusted = true (export programs may load)
    factories: tuple[str, ...] = ()  # [security] factories: "module:callable" or "module"
    token_env_prefix: str = DEFAULT_TOKEN_ENV_PREFIX  # [security] token_env_prefix ("" allows none by prefix)
    token_envs: tuple[str, ...] = ()  # [security] token_env: variables a remote model may read, by name
    remote_hosts: tuple[str, ...] = ()  # [security] remote_hosts: names, addresses or CIDR blocks allowed anyway


def check_token_env(name: str, trust: Trust) -> None:
    """A TrustError unless the config lets remote models read the variable ``name``."""
    if name in trust.token_envs or (trust.token_env_prefix and name.startswith(trust.token_env_prefix)):
        return
    prefix = repr(trust.token_env_prefix) if trust.token_env_prefix else "none"
    raise TrustError(f"token_env {name}: a remote model may read only the environment variables the config "
                     f"allows: names starting with [security] token_env_prefix ({prefix}) or listed in "
                     "[security] token_env")


def _ip(text: str) -> Any:
    """``text`` as an address (an IPv6 zone dropped), or None when it is a name."""
    import ipaddress

    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _refused_address(address: str) -> str | None:
    """Why requests may not go to ``address`` by default, or None."""
    ip = _ip(address)
    if ip is None:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_reserved:
        return "a reserved address"
    return None


def _listed(host: str, addresses: tuple[str, ...], allow: tuple[str, ...]) -> bool:
    import ipaddress

    if host.lower() in {a.lower() for a in allow}:
        return True
    nets = []
    for a in allow:
        try:
            nets.append(ipaddress.ip_network(a, strict=False))
        except ValueError:
            continue
    ips = [ip for ip in map(_ip, (host, *addresses)) if ip is not None]
    return any(ip.version == n.version and ip in n for ip in ips for n in nets)


def check_remote_host(host: str, trust: Trust, addresses: tuple[str, ...] = ()) -> None:
    """A TrustError when a remote model's calls (and its token) would go to ``host`` — or to one of
    the ``addresses`` it resolved to — in a range refused by default, unless remote_hosts lists it."""
    if _listed(host, addresses, trust.remote_hosts):
        return
    if host.lower().rstrip(".") in METADATA_NAMES:
        why: str | None = "a cloud metadata service's name"
    else:
        why = next((f"{a}, {r}" if a != host else r for a in (host, *addresses)
                    if (r := _refused_address(a)) is not None), None)
    if why is not None:
        raise TrustError(f"remote host {host} is {why}: a remote model's calls and token do not go there "
                         "unless [security] remote_hosts lists it")


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
