"""The console's ``:`` command line, as k9s has it: parsing and completion, pure.

``parse`` turns ``:swap tiny-mlp 2`` into a ``Command`` naming the action and
its arguments, or raises ``ValueError`` with what was expected; ``complete``
answers the candidates for the word being typed (command names, then model
names, then that model's versions or the sort columns).  The app runs a
``Command`` through the same actions the keys reach, so a typed command and a
key press cannot differ.  No Textual here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# command -> (arguments, what it does); the order is the help's and completion's
SPECS: dict[str, tuple[str, str]] = {
    "model": ("PATTERN", "jump to the first model whose name:version contains PATTERN"),
    "load": ("NAME [VERSION]", "load a version (the active one when none is named)"),
    "unload": ("NAME [VERSION]", "unload a version, after a confirmation"),
    "evict": ("NAME [VERSION]", "free a version's device memory now, after a confirmation"),
    "pin": ("NAME [VERSION]", "pin a version (never evicted)"),
    "unpin": ("NAME [VERSION]", "unpin a version"),
    "swap": ("NAME VERSION", "hot swap NAME's active version to VERSION"),
    "split": ("NAME V=W ...", "A/B split NAME's traffic by weight, e.g. 1=80 2=20 (one version: no split)"),
    "canary": ("NAME VERSION", "open the canary form for VERSION of NAME"),
    "delete": ("NAME [VERSION]", "delete a version (or the model), after a confirmation"),
    "describe": ("[NAME [VERSION]]", "the whole picture of a version (d)"),
    "logs": ("[NAME]", "a model's events (l in the describe view)"),
    "sort": ("COLUMN [asc|desc]", "sort the models table"),
    "filter": ("[REGEX]", "filter the models table (no argument clears it)"),
    "interval": ("SECONDS", "the refresh period, 0.25 to 60 s"),
    "theme": ("[NAME]", "switch theme (no argument: the next one)"),
    "help": ("", "every key"),
    "quit": ("", "quit (embedded: asks first while traffic flows)"),
}
ALIASES = {"m": "model", "q": "quit", "d": "describe", "log": "logs", "l": "load", "u": "unload", "e": "evict",
           "rm": "delete", "del": "delete", "s": "swap", "a": "split", "c": "canary", "o": "sort", "f": "filter",
           "h": "help", "?": "help"}
NEEDS_NAME = frozenset({"load", "unload", "evict", "pin", "unpin", "swap", "split", "canary", "delete"})
NEEDS_VERSION = frozenset({"swap", "canary"})


@dataclass(frozen=True)
class Command:
    """A parsed command line: ``action`` is a key of ``SPECS``."""

    action: str
    name: str | None = None
    version: str | None = None
    args: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)


def usage(action: str) -> str:
    args = SPECS[action][0]
    return f":{action}{' ' + args if args else ''}"


def _resolve(word: str) -> str:
    action = ALIASES.get(word, word)
    if action in SPECS:
        return action
    starts = [c for c in SPECS if c.startswith(word)]
    if len(starts) == 1:
        return starts[0]
    if starts:
        raise ValueError(f"':{word}' is ambiguous: {', '.join(':' + c for c in starts)}")
    raise ValueError(f"unknown command ':{word}' (commands: {', '.join(SPECS)})")


def _version(name: str, text: str, versions: Mapping[str, Sequence[str]]) -> str:
    v = text.lstrip("vV")
    known = [str(x) for x in versions.get(name, ())]
    if v not in known:
        raise ValueError(f"{name} has no version '{text}' (versions: {', '.join(known) or 'none'})")
    return v


def parse(text: str, versions: Mapping[str, Sequence[str]]) -> Command:
    """One command line (with or without its ``:``).  ``versions``: each model name's registered
    versions, to check names and versions before anything runs."""
    words = text.strip().lstrip(":").split()
    if not words:
        raise ValueError(f"type a command: {', '.join(':' + c for c in SPECS)}")
    action = _resolve(words[0].lower())
    rest = words[1:]
    if action in NEEDS_NAME or (action in ("describe", "logs") and rest):
        if not rest:
            raise ValueError(f"{usage(action)}: which model? (models: {', '.join(sorted(versions)) or 'none'})")
        name_word, rest = rest[0], rest[1:]
        name, _, ver = name_word.partition(":")  # name:version is accepted too
        if name not in versions:
            raise ValueError(f"{usage(action)}: no model '{name}' (models: {', '.join(sorted(versions)) or 'none'})")
        if ver:
            rest = [ver, *rest]
        if action == "split":
            return Command(action, name, weights=_weights(name, rest, versions))
        version = _version(name, rest[0], versions) if rest and action != "logs" else None
        if action in NEEDS_VERSION and version is None:
            raise ValueError(f"{usage(action)}: which version of {name}? "
                             f"(versions: {', '.join(map(str, versions.get(name, ())))})")
        extra = rest[1:] if version is not None else rest
        if extra:
            raise ValueError(f"{usage(action)}: unexpected '{' '.join(extra)}'")
        return Command(action, name, version)
    if action == "model":
        if not rest:
            raise ValueError(f"{usage(action)}: which model? (a part of its name)")
        return Command(action, args=(" ".join(rest),))
    if action == "sort":
        if not rest or len(rest) > 2 or (len(rest) == 2 and rest[1].lower() not in ("asc", "desc")):
            raise ValueError(f"{usage(action)}: e.g. ':sort req/s desc'")
        return Command(action, args=tuple(rest))
    if action == "interval":
        if len(rest) != 1:
            raise ValueError(f"{usage(action)}: e.g. ':interval 2'")
        try:
            seconds = float(rest[0].rstrip("s"))
        except ValueError:
            raise ValueError(f"{usage(action)}: '{rest[0]}' is not a number of seconds") from None
        if not 0.25 <= seconds <= 60:
            raise ValueError(f"{usage(action)}: between 0.25 and 60 seconds, got {rest[0]}")
        return Command(action, args=(str(seconds),))
    if action in ("filter", "theme"):
        return Command(action, args=(" ".join(rest),) if rest else ())
    if rest:
        raise ValueError(f"{usage(action)}: takes no arguments, got '{' '.join(rest)}'")
    return Command(action)


def _weights(name: str, words: Sequence[str], versions: Mapping[str, Sequence[str]]) -> dict[str, float]:
    if not words:
        raise ValueError(f"{usage('split')}: give a weight per version, e.g. 1=80 2=20")
    out: dict[str, float] = {}
    for w in words:
        v, eq, weight = w.partition("=")
        if not eq:
            raise ValueError(f"{usage('split')}: expected VERSION=WEIGHT, got '{w}'")
        version = _version(name, v, versions)
        try:
            value = float(weight.rstrip("%"))
        except ValueError:
            raise ValueError(f"{usage('split')}: the weight of v{version} is not a number: '{weight}'") from None
        if value < 0 or value != value or value == float("inf"):
            raise ValueError(f"{usage('split')}: the weight of v{version} must be 0 or more, got '{weight}'")
        if value > 0:
            out[version] = value
    if not out:
        raise ValueError(f"{usage('split')}: give at least one version a weight above 0")
    return out


def complete(text: str, versions: Mapping[str, Sequence[str]], columns: Sequence[str] = ()) -> list[str]:
    """Whole command lines the typed ``text`` can become by finishing its last word: command
    names, then model names, then versions (or sort columns, or ``asc``/``desc``)."""
    raw = text.lstrip(":")
    words = raw.split(" ")
    head = words[:-1]
    last = words[-1]
    prefix = ":" + " ".join(head) + (" " if head else "")
    if not head:
        return [f":{c}" for c in SPECS if c.startswith(last.lower())]
    try:
        action = _resolve(head[0].lower())
    except ValueError:
        return []
    if len(head) == 1:
        if action in NEEDS_NAME or action in ("describe", "logs", "model"):
            pool: Sequence[str] = sorted(versions)
        elif action == "sort":
            pool = list(columns)
        else:
            return []
    elif action == "sort" and len(head) == 2:
        pool = ["desc", "asc"]
    elif action == "split":
        name = head[1].partition(":")[0]
        used = {w.partition("=")[0] for w in head[2:]}
        pool = [f"{v}=" for v in versions.get(name, ()) if str(v) not in used]
    elif len(head) == 2 and action in NEEDS_NAME | {"describe"}:
        pool = [str(v) for v in versions.get(head[1].partition(":")[0], ())]
    else:
        return []
    return [prefix + p for p in pool if p.startswith(last)]
