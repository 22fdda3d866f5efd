"""What jsonargparse does not do for us: the JSON environment overrides, the origin of every
value, strict types for values read from files, one-line errors and TOML output.

LightningCLI (`cli.py`) parses; this module prepares its argument list and explains its
verdicts. Layers, lowest precedence first: the packaged defaults, the `--config` files in
order, the JSON of `ML_PLAYGROUND_TRAIN_OVERRIDES` / `ML_PLAYGROUND_SAMPLE_OVERRIDES`, the
flags. jsonargparse applies arguments in order, so the argument list is rewritten to exactly
that order, whatever order the user typed.
"""

from __future__ import annotations

import difflib
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
from ml_playground.errors import ConfigError

TRAIN_OVERRIDES_ENV = "ML_PLAYGROUND_TRAIN_OVERRIDES"
SAMPLE_OVERRIDES_ENV = "ML_PLAYGROUND_SAMPLE_OVERRIDES"
DEFAULTS_LABEL = "packaged defaults"
COMMAND_LINE = "command line"
NULL = "null"  # TOML has no null: this string stands for None, as jsonargparse reads it
MAX_DEPTH = 32  # deeper tables cannot be configuration; refuse them before any recursion


def packaged_defaults() -> dict[str, Any]:
    """`default.toml`, the only home of the defaults."""
    text = resources.files("ml_playground").joinpath("default.toml").read_text("utf-8")
    return tomllib.loads(text)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file as strict UTF-8 TOML; every failure is a one-line ConfigError."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid UTF-8 at byte {exc.start}; save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None


def read_env(variable: str) -> dict[str, Any] | None:
    """The JSON object in an override variable, or None when it is unset or empty."""
    text = os.environ.get(variable, "")
    if not text.strip():
        return None
    example = '{"trainer": {"max_steps": 5}}'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{variable}: invalid JSON ({exc.msg} at column {exc.colno}); expected an object "
            f"such as {example}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{variable}: nested too deeply to be a configuration") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{variable}: expected a JSON object such as {example}, got {type(data).__name__}"
        )
    return data


def _leaves(data: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if depth > MAX_DEPTH:
        raise ConfigError(f"{prefix.rstrip('.')}: nested too deeply to be a configuration")
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value and "class_path" not in value:
            out += _leaves(value, f"{prefix}{key}.", depth + 1)
        else:
            out.append((f"{prefix}{key}", value))
    return out


@dataclass
class Request:
    """The argument list in precedence order, and where each value came from."""

    command: str | None
    argv: list[str]
    labels: list[str] = field(default_factory=lambda: [DEFAULTS_LABEL])
    origins: dict[str, str] = field(default_factory=dict)  # dotted key -> label
    raw: list[tuple[str, str, Any]] = field(default_factory=list)  # (label, key, value) from data
    print_config: bool = False

    def record(self, label: str, data: Mapping[str, Any]) -> None:
        self.labels.append(label)
        for key, value in _leaves(data):
            self.origins[key] = label
            self.raw.append((label, key, value))

    def origin(self, key: str) -> str:
        """The layer that set `key`, or the latest layer that set anything below it."""
        if key in self.origins:
            return self.origins[key]
        below = [label for k, label in self.origins.items() if not key or k.startswith(f"{key}.")]
        return max(below, key=self.labels.index) if below else DEFAULTS_LABEL

    def origin_of_message(self, section: str, text: str) -> str:
        """For a rule across keys: the latest layer that set one of the keys it names."""
        names = re.findall(r"[a-z_]+(?:\.[a-z_]+)*", text)
        keys = [n if "." in n else f"{section}.{n}" if section else n for n in names]
        found = [self.origins[k] for k in keys if k in self.origins]
        return max(found, key=self.labels.index) if found else self.origin(section)


def arrange(argv: Sequence[str], command: str | None, variables: Sequence[str]) -> Request:
    """`COMMAND --config F ... --config <env JSON> ... FLAGS`, with every source recorded.

    Files are read here first: jsonargparse would take a missing path for an inline config
    string, and the strict type check needs the values as the file wrote them.
    """
    request = Request(command, [command] if command else [])
    rest, flags = list(argv[1:] if command else argv), []
    for key, _ in _leaves(packaged_defaults()):
        request.origins[key] = DEFAULTS_LABEL
    while rest:
        arg = rest.pop(0)
        if arg in ("--config", "-c") or arg.startswith("--config="):
            path = arg.partition("=")[2] if "=" in arg else rest.pop(0) if rest else ""
            if not path:
                raise ConfigError("--config: missing file name")
            request.record(path, read_toml(path))
            request.argv += ["--config", path]
        elif arg == "--print_config":
            request.print_config = True
        elif arg == "--force" and (not rest or rest[0].startswith("--")):
            flags.append("--force=true")  # jsonargparse's booleans take a value
        else:
            flags.append(arg)
    for variable in variables:
        data = read_env(variable)
        if data is not None:
            request.record(variable, data)
            request.argv += ["--config", json.dumps(data)]
    request.labels.append(COMMAND_LINE)
    for arg in flags:
        if arg.startswith("--") and len(arg) > 2:
            request.origins[arg[2:].partition("=")[0].removesuffix("+")] = COMMAND_LINE
    request.argv += flags
    return request


# --------------------------------------------------------------------------- strict values

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _kind(value: Any) -> str:
    for cls, name in _KINDS.items():
        if isinstance(value, cls):
            return name
    return type(value).__name__


def check_strict(request: Request, parsed: Any) -> None:
    """A value from a file or variable keeps its TOML/JSON type: jsonargparse would turn
    "2" into 2, 2.0 into 2 or true into 1, which the project refuses ("2" is not an int)."""
    for label, key, raw in request.raw:
        if isinstance(raw, list | dict) or request.origins.get(key) != label:
            continue
        try:
            value = parsed.get(key)
        except (KeyError, AttributeError):
            continue
        if raw == NULL and value is None:
            continue
        same = (
            isinstance(value, str | os.PathLike)
            if isinstance(raw, str)
            else isinstance(value, bool)
            if isinstance(raw, bool)
            else not isinstance(value, bool) and isinstance(value, int | float)
            if isinstance(raw, int)
            else isinstance(value, float)
        )
        if not same and value is not None:
            raise ConfigError(
                f"{label}: {key} = {_show(raw)}: expected {_kind(value)}, not {_kind(raw)}"
            )


# --------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _sections() -> dict[str, list[str]]:
    """Valid keys per table, for "did you mean" hints."""
    tables: dict[str, list[str]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        tables[prefix] = list(model.model_fields)
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{prefix}.{name}" if prefix else name)

    walk(ExperimentConfig, "")
    return tables


def unknown_key(request: Request, key: str, valid: Sequence[str] = ()) -> str:
    section, _, name = key.rpartition(".")
    if section == "trainer" and name in MANAGED_TRAINER_KEYS:
        return f"{request.origin(key)}: trainer.{name} cannot be set: {MANAGED_TRAINER_KEYS[name]}"
    if section == "trainer" and not valid:
        import inspect

        from lightning.pytorch import Trainer  # imported already by the command line

        names = inspect.signature(Trainer.__init__).parameters
        valid = [n for n in names if n != "self" and n not in MANAGED_TRAINER_KEYS]
    valid = list(valid) or _sections().get(section, [])
    close = difflib.get_close_matches(name, valid, n=1)
    where = f"[{section}]" if section else "the top level"
    hint = (
        f" (did you mean {close[0]}?)" if close else f"; valid keys in {where}: {', '.join(valid)}"
    )
    if section == "trainer" and not close:
        hint = " (not an argument of lightning.Trainer; see `ml-playground fit --help`)"
    return f"{request.origin(key)}: {key}: unknown key{hint}"


def describe_parse_error(request: Request, message: str) -> str:
    """jsonargparse's multi-line verdict as one line: `origin: key: problem`."""
    text = message.strip()
    if m := re.search(
        r"(?:(?:Group|Key) '([^']+)' )?does not accept (?:nested key|option) '([^']+)'", text
    ):
        return unknown_key(request, f"{m[1]}.{m[2]}" if m[1] else m[2])
    if m := re.search(r"Option '([^']+)' is not accepted", text):
        return unknown_key(request, m[1])
    if m := re.search(r"[Uu]nrecognized arguments: (\S+)", text):
        name = m[1].lstrip("-").partition("=")[0]
        return unknown_key(request, name)
    if m := re.search(r"No action for key \"([^\"]+)\"", text):
        return unknown_key(request, m[1])
    if m := re.search(r'(?:Parser key|Key) "([^"]+)":\s*(.*)', text, re.S):
        key = m[1]
        lines = [line.strip() for line in m[2].splitlines() if line.strip()]
        given = [line.partition("value:")[2] for line in lines if line.startswith("Given value:")]
        got = given or re.findall(r"Got value: (.*)$", m[2], re.M)
        lines = [
            line.split(". Got value")[0]
            for line in lines
            if not re.match(r"\d+ validation errors? for|For further|Given value", line)
        ]
        first = _classes(lines[0] if lines else "invalid value")
        first = re.sub(r"\s*\[type=.*$", "", first).strip().rstrip(".:")
        if "Does not validate against any of the" in first:
            kinds = next((line for line in lines if line.startswith("Subtypes:")), "")
            first = f"fits none of the accepted types {_classes(kinds.partition(':')[2].strip())}"
        value = f" = {got[0].strip()[:80]}" if got else ""
        return f"{request.origin(key)}: {key}{value}: {first}"
    if m := re.search(r"required: ([\w.]+)", text):
        return f"{request.origin(m[1])}: {m[1]}: missing (a table may have been given a value)"
    return re.sub(r"\s*\n\s*", "; ", text)


def _classes(text: str) -> str:
    """`Expected a <class 'int'>` as `expected an integer`; other `<class 'x'>` as `x`."""
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}
    text = re.sub(
        r"Expected a <class '(\w+)'>", lambda k: f"expected {names.get(k[1], k[1])}", text
    )
    return re.sub(r"<class '([\w.]+)'>", r"\1", text)


def validate(request: Request, data: Mapping[str, Any]) -> ExperimentConfig:
    """The whole experiment through the strict Pydantic models (every command does this)."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = [str(part) for part in first["loc"]]
        key = ".".join(loc)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        if first["type"] == "extra_forbidden":
            raise ConfigError(unknown_key(request, key) + more) from None
        text = first["msg"].removeprefix("Value error, ")
        if (
            first["type"].endswith("_error")
            and first["type"] == "value_error"
            and not ("input" in first and not isinstance(first["input"], dict))
        ):
            where = request.origin_of_message(key, text)  # a rule across keys
            raise ConfigError(f"{where}: {key + ': ' if key else ''}{text}{more}") from None
        value = first.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" = {_show(value)}"
        raise ConfigError(f"{request.origin(key)}: {key}{shown}: {text}{more}") from None


# --------------------------------------------------------------------------- TOML out


def _nulls(value: Any) -> Any:
    if value is None:
        return NULL
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nulls(v) for v in value]
    return value


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML that `--config` reads back (jsonargparse's dumper for the "toml" mode)."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    return tomli_w.dumps(_nulls({**scalars, **tables}))


# --------------------------------------------------------------------------- Python API


def load_config(
    config_files: Sequence[str | Path] = (),
    flags: Sequence[tuple[str, str]] = (),
    env_vars: Sequence[str] = (),
) -> ExperimentConfig:
    """Defaults < config files (in order) < environment overrides < flags, validated by the
    same LightningCLI parser as the console script (nothing is instantiated)."""
    from ml_playground.cli import parse_only  # the parser lives with the command line

    argv = [item for path in config_files for item in ("--config", str(path))]
    argv += [f"--{key}={value}" for key, value in flags]
    return parse_only(argv, env_vars)


def load_experiment_toml(path: Path) -> ExperimentConfig:
    """One experiment file over the packaged defaults, validated (no overrides)."""
    return load_config([path])


def load_full_experiment_config(
    path: Path, flags: Sequence[tuple[str, str]] = ()
) -> ExperimentConfig:
    """An experiment file with the training overrides of the environment and flags applied."""
    return load_config([path], flags, [TRAIN_OVERRIDES_ENV])
