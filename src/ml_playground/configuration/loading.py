"""What jsonargparse does not do for us: the JSON environment overrides, the origin of every
value, strict types for values read from files, one-line errors and TOML output.

LightningCLI (`cli.py`) parses. Layers, lowest precedence first: the packaged defaults, the
`--config` files in order, the JSON of `ML_PLAYGROUND_TRAIN_OVERRIDES` /
`ML_PLAYGROUND_SAMPLE_OVERRIDES`, the flags. jsonargparse applies arguments in order, so
`arrange` rewrites the argument list to exactly that order, whatever order the user typed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from ml_playground.configuration.schema import MANAGED_TRAINER_KEYS, ExperimentConfig
from ml_playground.errors import ConfigError, shorten

TRAIN_OVERRIDES_ENV = "ML_PLAYGROUND_TRAIN_OVERRIDES"
SAMPLE_OVERRIDES_ENV = "ML_PLAYGROUND_SAMPLE_OVERRIDES"
DEFAULTS, COMMAND_LINE = "packaged defaults", "command line"  # origins that are not files
NULL = "null"  # TOML has no null: this string stands for None, as jsonargparse reads it
MAX_DEPTH = 32  # deeper tables cannot be configuration


def packaged_defaults() -> dict[str, Any]:
    """`default.toml`, the only home of the defaults."""
    return tomllib.loads(resources.files("ml_playground").joinpath("default.toml").read_text())


def read_toml(path: str) -> dict[str, Any]:
    """A config file as strict UTF-8 TOML (read before jsonargparse does, which would take a
    missing path for an inline config string)."""
    try:
        data = Path(path).read_bytes()
        return tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        problem = "config file not found"
    except UnicodeDecodeError as exc:
        problem = f"not valid UTF-8 at byte {exc.start}; save the file as UTF-8"
    except OSError as exc:
        problem = f"cannot read config file ({exc.strerror})"
    except tomllib.TOMLDecodeError as exc:
        hint = "; it starts with a byte-order mark (BOM): save it as UTF-8 without one"
        problem = f"not valid TOML: {exc}" + (hint if data.startswith(b"\xef\xbb\xbf") else "")
    except RecursionError:
        problem = "nested too deeply to be a configuration"
    raise ConfigError(f"{path}: {problem}")


def read_env(variable: str) -> dict[str, Any] | None:
    """The JSON object in an override variable, or None when it is unset or empty."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        problem = "nested too deeply to be a configuration"
    else:
        if isinstance(data, dict):
            return data
        problem = "got null" if data is None else f"got {type(data).__name__}"
    raise ConfigError(f'{variable}: {problem}; expected a JSON object such as {{"trainer": {{}}}}')


def leaves(data: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """(dotted key, value) of every setting in nested tables (a class_path table is one)."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{prefix.rstrip('.')}: nested too deeply to be a configuration")
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value and "class_path" not in value:
            out += leaves(value, f"{prefix}{key}.", depth + 1)
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _shape(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return "an array of tables"
    return "null" if value is None else f"{_show(value)}, {_kind(value)}"


def check_tables(
    label: str, data: Mapping[str, Any], model: Any = ExperimentConfig, prefix: str = ""
) -> None:
    """Every section given is a table. jsonargparse would silently replace an array of tables
    (`[[model]]`), a null or a plain value in a section's place by the defaults."""
    for key, value in data.items():
        info = model.model_fields.get(key)
        kind = info.annotation if info else None
        section = isinstance(kind, type) and issubclass(kind, BaseModel)
        if not section and f"{prefix}{key}" != "trainer":
            continue  # a setting, or an unknown key (reported by the parser with a hint)
        if not isinstance(value, Mapping):
            name, got = f"{prefix}{key}", _shape(value)
            fix = f": write [{name}] with single brackets" if got == "an array of tables" else ""
            raise ConfigError(f"{label}: {name}: expected a table ([{name}]), got {got}{fix}")
        if section:
            check_tables(label, value, kind, f"{prefix}{key}.")


@dataclass
class Request:
    """The argument list in precedence order, and where each value came from."""

    command: str | None
    argv: list[str]
    labels: list[str] = field(default_factory=lambda: [DEFAULTS])  # lowest precedence first
    origins: dict[str, str] = field(default_factory=dict)  # dotted key -> label
    raw: list[tuple[str, str, Any]] = field(default_factory=list)  # (label, key, value as read)
    print_config: bool = False

    def record(self, label: str, data: Mapping[str, Any]) -> None:
        check_tables(label, data)
        self.labels.append(label)
        for key, value in leaves(data):
            self.origins[key] = label
            self.raw.append((label, key, value))

    def origin(self, *keys: str) -> str:
        """The latest layer that set one of `keys` or anything below them."""
        found = [
            label
            for k, label in self.origins.items()
            if any(k == key or k.startswith(f"{key}.") or not key for key in keys)
        ]
        return max(found, key=self.labels.index) if found else DEFAULTS


def arrange(argv: Sequence[str], command: str | None, variables: Sequence[str]) -> Request:
    """`COMMAND --config F ... --config <env JSON> ... FLAGS`, with every source recorded."""
    request = Request(command, [command] if command else [])
    request.origins = {key: DEFAULTS for key, _ in leaves(packaged_defaults())}
    rest, flags = list(argv[1:] if command else argv), []
    while rest:
        arg = rest.pop(0)
        if arg in ("--config", "-c") or arg.startswith("--config="):
            path = arg.partition("=")[2] if "=" in arg else rest.pop(0) if rest else ""
            if not path:
                raise ConfigError("--config: missing file name")
            request.record(path, read_toml(path))
            request.argv += ["--config", path]
        elif arg.partition("=")[0] == "--print_config":  # after validation, as TOML
            request.print_config = True
        elif arg == "--force" and (not rest or rest[0].startswith("--")):
            flags.append("--force=true")  # jsonargparse's booleans take a value
        else:
            flags.append(arg)
    for variable in variables:
        if (data := read_env(variable)) is not None:
            request.record(variable, data)
            request.argv += ["--config", json.dumps(data)]
    request.labels.append(COMMAND_LINE)
    for arg in flags:
        if arg.startswith("--") and len(arg) > 2:
            request.origins[arg[2:].partition("=")[0].removesuffix("+")] = COMMAND_LINE
    request.argv += flags
    return request


KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _kind(value: Any) -> str:
    return next((name for cls, name in KINDS.items() if isinstance(value, cls)), "a table")


def check_strict(request: Request, parsed: Any) -> None:
    """A value from a file or variable keeps its TOML/JSON type: jsonargparse would turn
    "2" into 2, 2.0 into 2 or true into 1 ("2" is not an int here)."""
    for label, key, raw in request.raw:
        if isinstance(raw, list | dict) or request.origins.get(key) != label:
            continue
        try:
            value = parsed.get(key)
        except (KeyError, AttributeError, TypeError):
            continue
        if not isinstance(value, bool | int | float | str | os.PathLike):
            continue  # None ("null"), a table, a class (class_path) or a list
        if isinstance(raw, str):
            same = isinstance(value, str | os.PathLike)
        elif isinstance(raw, bool) or isinstance(value, bool):
            same = isinstance(raw, bool) and isinstance(value, bool)
        else:  # an int may stand for a float, not the other way round
            same = isinstance(value, float) or (isinstance(raw, int) and isinstance(value, int))
        if not same:
            raise ConfigError(
                f"{label}: {key} = {_show(raw)}: expected {_kind(value)}, not {_kind(raw)}"
            )


# --------------------------------------------------------------------------- messages


def _cause_of_type(error: BaseException, kind: type[ValidationError]) -> ValidationError | None:
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    return seen


def _show(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _valid_keys(section: str) -> list[str]:
    if section == "trainer":
        from lightning.pytorch import Trainer  # imported already by the command line

        names = inspect.signature(Trainer.__init__).parameters
        return [name for name in names if name != "self" and name not in MANAGED_TRAINER_KEYS]
    model: Any = ExperimentConfig
    for part in filter(None, section.split(".")):
        info = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        model = info.annotation if info else None
    return (
        list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
    )


def unknown_key(request: Request, key: str) -> str:
    section, _, name = key.rpartition(".")
    if section == "trainer" and name in MANAGED_TRAINER_KEYS:
        return f"{request.origin(key)}: {key} cannot be set: {MANAGED_TRAINER_KEYS[name]}"
    valid = _valid_keys(section)
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        hint = f" (did you mean {close[0]}?)"
    elif section == "trainer":
        hint = " (not an argument of lightning.Trainer; see `ml-playground fit --help`)"
    else:
        hint = (
            f"; valid keys in {f'[{section}]' if section else 'the top level'}: {', '.join(valid)}"
        )
    return f"{request.origin(key)}: {key}: unknown key{hint}"


def _classes(text: str) -> str:
    """`Expected a <class 'int'>` as `expected an integer`; other `<class 'x'>` as `x`."""
    names = {cls.__name__: name for cls, name in KINDS.items()}
    text = re.sub(
        r"Expected a <class '(\w+)'>", lambda k: f"expected {names.get(k[1], k[1])}", text
    )
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("typing.", "")
    return text.replace("NoneType", NULL)


CLASS_MODULES = {  # where LightningCLI finds the short class names of these settings
    "trainer.callbacks": ("callback", "lightning.pytorch.callbacks"),
    "trainer.logger": ("logger", "lightning.pytorch.loggers"),
}


def _init_arguments(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        names = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [
        n
        for n, p in names.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def describe_class_error(request: Request, key: str, message: str) -> str | None:
    """A callback or logger (`class_path` + `init_args`) that jsonargparse refused: the class,
    the argument and the value, blamed on the layer that gave them; None if not such an error."""
    if key not in CLASS_MODULES:
        return None
    where, (what, module) = request.origin(key), CLASS_MODULES[key]
    if m := re.search(r"Problem with given class_path '([\w.]+)':\n(.*?)(?=\n    - |\n  Given|\Z)",
                      message, re.S):  # fmt: skip
        class_path, detail = m[1], m[2]
        short = class_path.rpartition(".")[2]
        if option := re.search(r"Option '([^']+)' is not accepted", detail):
            names = _init_arguments(class_path)
            close = difflib.get_close_matches(option[1], names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; it takes {', '.join(names)}"
            return f"{where}: {key}: {short} has no argument {option[1]!r}{hint}"
        if value := re.search(r'Parser key "([^"]+)":.*?Errors:\s*- ([^\n]*).*?Given value: ([^\n]*)',
                              detail, re.S):  # fmt: skip
            problem = _classes(value[2]).replace("Expected", "expected")
            return f"{where}: {key}: {short} {value[1]} = {value[3].strip()}: {problem}"
    if m := re.search(r"Expected a (?:path but |dot import path string: )([\w.]+)", message):
        name = m[1]
        known = getattr(importlib.import_module(module), "__all__", [])
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (
            f"{where}: {key} = {name}: no {what} class of that name; {hint}give a class of "
            f"{module} by its name, or any class by its full import path (package.module.Class)"
        )
    return None


def describe_parse_error(request: Request, error: Exception) -> str:
    """jsonargparse's verdict as one line: `origin: key: problem`. Its exceptions carry only
    text, except a value our Pydantic types refused: the ValidationError behind it is read as
    data; the rest is matched against the wording of the pinned jsonargparse (~=4.53.0; the
    tests of every message fail on a change)."""
    message = str(error)
    refused = _cause_of_type(error, ValidationError)
    key = re.match(r'\s*Parser key "([^"]+)"', message)
    if refused is not None and key is not None and key[1] not in CLASS_MODULES:
        detail = refused.errors()[0]
        return f"{request.origin(key[1])}: {key[1]} = {detail['input']}: {detail['msg']}"
    if (m := re.match(r'\s*Parser key "([^"]+)"', message)) and (
        line := describe_class_error(request, m[1], message)
    ):
        return line
    unknown = (
        r"(?:(?:Group|Key) '([^']+)' )?does not accept (?:nested key|option) '([^']+)'",
        r"()Option '([^']+)' is not accepted",
        r"()[Uu]nrecognized arguments: --([^\s=]+)",
        r'()No action for key "([^"]+)"',
    )
    for pattern in unknown:
        if m := re.search(pattern, message):
            return unknown_key(request, f"{m[1]}.{m[2]}" if m[1] else m[2])
    if m := re.search(r'(?:Parser key|Key) "([^"]+)":\s*(.*)', message, re.S):
        lines = [line.strip() for line in m[2].splitlines() if line.strip()]
        got = [line.partition("value:")[2] for line in lines if line.startswith("Given value:")]
        got = got or re.findall(r"Got value: (.*)$", m[2], re.M)
        noise = r"\d+ validation errors? for|For further|Given value"
        lines = [line.split(". Got value")[0] for line in lines if not re.match(noise, line)]
        first = _classes(lines[0] if lines else "invalid value")
        text = re.sub(r"\s*\[type=.*$|^Not of type \w+: ", "", first)
        if "Does not validate against any of the" in text:
            kinds = next((line for line in lines if line.startswith("Subtypes:")), ":")
            text = f"fits none of the accepted types {_classes(kinds.partition(':')[2].strip())}"
        value = f" = {shorten(got[0].strip(), 80)}" if got else ""
        return f"{request.origin(m[1])}: {m[1]}{value}: {text.strip().rstrip('.:')}"
    if m := re.search(r"required: ([\w.]+)", message):
        return f"{request.origin(m[1])}: {m[1]}: missing (a table may have been given a value)"
    return message.strip()


def validate(request: Request, data: Mapping[str, Any]) -> ExperimentConfig:
    """The whole experiment through the strict Pydantic models (every command does this)."""
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        first, count = exc.errors()[0], exc.error_count()
        key = ".".join(str(part) for part in first["loc"])
        more = f" (and {count - 1} more problem(s))" if count > 1 else ""
        if first["type"] == "extra_forbidden":
            raise ConfigError(unknown_key(request, key) + more) from None
        text, value = first["msg"].removeprefix("Value error, "), first.get("input")
        if isinstance(value, dict):  # a rule across keys: the latest layer that set one of them
            named = [
                n if "." in n else f"{key}.{n}".lstrip(".") for n in re.findall(r"[a-z_.]+", text)
            ]
            where = request.origin(*[n for n in named if n in request.origins] or [key])
            raise ConfigError(f"{where}: {key + ': ' if key else ''}{text}{more}") from None
        shown = "" if value is None else f" = {_show(value)}"
        raise ConfigError(f"{request.origin(key)}: {key}{shown}: {text}{more}") from None
    defaults = packaged_defaults()["model"]
    for name, user in config.model.unused().items():
        key = f"model.{name}"
        if getattr(config.model, name) != defaults[name]:  # a value that would be ignored
            raise ConfigError(
                f"{request.origin(key)}: {key} is a setting for {user}, but model.optimizer is "
                f'"{config.model.optimizer}"; remove {key} or set model.optimizer = "muon"'
            )
    return config


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML that `--config` reads back: tables last, None as "null" (jsonargparse's dumper)."""

    def nulls(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: nulls(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [nulls(v) for v in value]
        return NULL if value is None else value

    return tomli_w.dumps(nulls(dict(sorted(data.items(), key=lambda i: isinstance(i[1], dict)))))
