"""Checking `[trainer]` values against `lightning.Trainer`'s signature, without importing it
when a cached copy of the signature is at hand.

Importing Lightning costs seconds, and `prepare` and `sample` need nothing else from it; but
every command validates the whole file, `[trainer]` included. So the signature's type hints
are turned into a small JSON-able tree, checked by :func:`accepts` with Pydantic's strict
semantics (bool is not an int, an int is a float, no str-to-number coercion). The tree is
built from the real hints whenever Lightning is imported anyway, and is cached per Lightning
version in the download cache folder for the commands that do not import it.
`tests/test_trainer_args.py` checks that :func:`accepts` agrees with Pydantic on every argument.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import types
import typing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# A type as a tree of JSON values:
#   "any" "none" "bool" "int" "float" "str"   the plain kinds
#   "opaque"                                  a class no config value can be (Accelerator, ...)
#   {"literal": [values]}  {"list": tree}  {"dict": [key tree, value tree]}  {"union": [trees]}
Tree = str | dict[str, Any]

SCALARS: dict[Any, str] = {bool: "bool", int: "int", float: "float", str: "str"}


def tree_of(hint: Any) -> Tree:
    """The tree of a type hint (anything unknown becomes "opaque": it accepts no value)."""
    if hint is Any:
        return "any"
    if hint is None or hint is type(None):
        return "none"
    if hint in SCALARS:
        return SCALARS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return {"union": [tree_of(arg) for arg in args]}
    if origin is typing.Literal:
        return {"literal": list(args)}
    if origin is list:
        return {"list": tree_of(args[0]) if args else "any"}
    if origin is dict:
        return {"dict": [tree_of(args[0]), tree_of(args[1])] if args else ["any", "any"]}
    return "opaque"


def accepts(tree: Tree, value: Any) -> bool:
    """Whether Pydantic's strict mode accepts `value` (a TOML/JSON value) for this type."""
    if isinstance(tree, str):
        if tree == "any":
            return True
        if tree == "none":
            return value is None
        if tree == "bool":
            return isinstance(value, bool)
        if tree == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if tree == "float":
            return isinstance(value, int | float) and not isinstance(value, bool)
        if tree == "str":
            return isinstance(value, str)
        return False  # opaque
    if "union" in tree:
        return any(accepts(member, value) for member in tree["union"])
    if "literal" in tree:
        return any(type(value) is type(x) and value == x for x in tree["literal"])
    if "list" in tree:
        return isinstance(value, list) and all(accepts(tree["list"], item) for item in value)
    if "dict" in tree:
        key, item = tree["dict"]
        return isinstance(value, dict) and all(
            accepts(key, k) and accepts(item, v) for k, v in value.items()
        )
    raise ValueError(f"not a type tree: {tree!r}")


def describe(hint: Any) -> str:
    """A type hint as a user reads it: `Union[str, Accelerator]`."""
    return re.sub(r"\b(typing|collections\.abc|datetime|lightning\.[\w.]+)\.", "", str(hint))


Signature = dict[str, tuple[Tree, str]]  # argument -> (tree, description)


def from_lightning() -> Signature:
    """The signature of `lightning.Trainer` (imports Lightning)."""
    from lightning.pytorch import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    names = [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
    return {name: (tree_of(hints.get(name, Any)), describe(hints.get(name, Any))) for name in names}


def _lightning_version() -> str | None:
    try:
        return version("lightning")
    except PackageNotFoundError:
        return None


def _cache_file(lightning: str) -> Path:
    from ml_playground.prepare.download import cache_dir

    return cache_dir() / f"trainer-signature-lightning-{lightning}.json"


def _read_cache(lightning: str) -> Signature | None:
    try:
        data = json.loads(_cache_file(lightning).read_text(encoding="utf-8"))
        if data.get("lightning") != lightning:
            return None
        signature = {name: (entry[0], entry[1]) for name, entry in data["arguments"].items()}
        for tree, _ in signature.values():
            accepts(tree, None)  # a malformed tree raises here, not later
        return signature
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None  # absent or damaged: rebuilt from Lightning


def _write_cache(lightning: str, signature: Signature) -> None:
    path = _cache_file(lightning)
    text = json.dumps({"lightning": lightning, "arguments": signature}, indent=1)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(OSError):  # a read-only cache only costs the faster start
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    tmp.unlink(missing_ok=True)


_memo: dict[str, Signature] = {}


def trainer_signature() -> Signature:
    """`lightning.Trainer`'s arguments: from Lightning if it is imported already (or no cache
    matches the installed version, which then writes one), else from the cache."""
    lightning = _lightning_version() or "unknown"
    if lightning in _memo:
        return _memo[lightning]
    cached = None if "lightning.pytorch" in sys.modules else _read_cache(lightning)
    if cached is None:
        cached = from_lightning()
        if _read_cache(lightning) != cached:
            _write_cache(lightning, cached)
    _memo[lightning] = cached
    return cached
