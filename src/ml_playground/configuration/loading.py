"""Loading, merging and validating configuration: the only place that does it.

Layers, lowest precedence first: the packaged defaults, the `--config` files in order, the
JSON environment overrides, the command-line flags. Each layer's relative paths resolve
against its own base (a config file's folder; the working directory for the rest) before the
layers are deep-merged and validated as one `ExperimentConfig`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.errors import ConfigError

TRAIN_OVERRIDES_ENV = "ML_PLAYGROUND_TRAIN_OVERRIDES"
SAMPLE_OVERRIDES_ENV = "ML_PLAYGROUND_SAMPLE_OVERRIDES"

# Keys that may hold a path even though the schema types them as str.
_URL_PREFIXES = ("http://", "https://")
_CKPT_ALIASES = ("best", "last")
_PROMPT_FILE_PREFIX = "FILE:"


@dataclass
class Layer:
    """One source of settings: its parsed data, a label for messages, and its path base."""

    label: str
    data: dict[str, Any]
    base: Path = field(default_factory=Path.cwd)


# --------------------------------------------------------------------------- reading layers


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file as strict UTF-8; every failure is a one-line ConfigError."""
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
            f"{path}: not valid UTF-8 at byte {exc.start}; save the file as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def packaged_defaults() -> Layer:
    """The defaults shipped inside the package (`default.toml`)."""
    text = resources.files("ml_playground").joinpath("default.toml").read_text("utf-8")
    return Layer("packaged defaults", tomllib.loads(text))


def file_layer(path: Path) -> Layer:
    path = Path(path)
    return Layer(str(path), read_toml(path), path.resolve().parent)


def env_layer(variable: str) -> Layer | None:
    """The JSON object in an override variable, or None when the variable is unset/empty."""
    text = os.environ.get(variable, "")
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{variable}: invalid JSON ({exc.msg} at column {exc.colno}); "
            'expected an object such as {"trainer": {"max_steps": 5}}'
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{variable}: expected a JSON object such as "
            f'{{"trainer": {{"max_steps": 5}}}}, got {type(data).__name__}'
        )
    return Layer(variable, data)


def flags_layer(flags: Sequence[tuple[str, str]]) -> Layer | None:
    """Dotted command-line overrides (`--model.n_layer 2`) as one nested layer."""
    if not flags:
        return None
    data: dict[str, Any] = {}
    for dotted, raw in flags:
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"--{dotted}: malformed option name")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--{dotted}: {part} is set both as a value and as a section")
            node = child
        node[parts[-1]] = _parse_flag_value(parts, raw)
    return Layer("command line", data)


def _parse_flag_value(parts: list[str], raw: str) -> Any:
    """Strings stay strings where the schema wants text; other values are read as TOML."""
    if _wants_text(parts):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _wants_text(parts: list[str]) -> bool:
    model: type[BaseModel] = ExperimentConfig
    annotation: Any = None
    for part in parts:
        info = model.model_fields.get(part)
        if info is None:
            return False
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    if annotation in (str, Path):
        return True
    return typing.get_origin(annotation) is Literal and all(
        isinstance(arg, str) for arg in typing.get_args(annotation)
    )


# --------------------------------------------------------------------------- merging


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value (lists included) replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{dotted}.")
        else:
            yield dotted


def _path_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if annotation is Path:
            keys.append(prefix + name)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_path_keys(annotation, f"{prefix}{name}."))
    return keys


def _resolve_layer_paths(layer: Layer) -> dict[str, Any]:
    """Copy of the layer's data with relative paths anchored at the layer's base."""
    data = copy.deepcopy(layer.data)

    def anchor(text: str) -> str:
        if "\0" in text:
            raise ConfigError(f"{layer.label}: path {text!r} contains a NUL character")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~name of a user this machine does not know
            raise ConfigError(
                f"{layer.label}: cannot expand {text!r}: unknown user; write the full path"
            ) from None
        return str(path if path.is_absolute() else layer.base / path)

    def update(dotted: str, rewrite: typing.Callable[[str], str]) -> None:
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                return
        value = node.get(leaf)
        if isinstance(value, str) and value:
            node[leaf] = rewrite(value)

    for key in _path_keys():
        update(key, anchor)
    update("prepare.source", lambda s: s if s.startswith(_URL_PREFIXES) else anchor(s))
    update("sample.ckpt", lambda s: s if s in _CKPT_ALIASES else anchor(s))
    update("sample.output", anchor)
    update(
        "sample.prompt",
        lambda s: (
            _PROMPT_FILE_PREFIX + anchor(s[len(_PROMPT_FILE_PREFIX) :])
            if s.startswith(_PROMPT_FILE_PREFIX)
            else s
        ),
    )
    return data


def _finalize_paths(data: dict[str, Any]) -> None:
    """Replace "{experiment}" in path values and turn them into `Path` objects."""
    name = data.get("experiment")
    for dotted in _path_keys():
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            text = node[leaf]
            if isinstance(name, str):
                text = text.replace("{experiment}", name)
            node[leaf] = Path(text)


# --------------------------------------------------------------------------- validation


def merge_layers(layers: Sequence[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    """Deep-merge resolved layers; also return which layer set each leaf key last."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer in layers:
        data = _resolve_layer_paths(layer)
        merged = deep_merge(merged, data)
        for key in _leaves(data):
            origins[key] = layer.label
    _finalize_paths(merged)
    return merged, origins


def validate(merged: dict[str, Any], origins: Mapping[str, str]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, origins)) from None


def _describe_errors(exc: ValidationError, origins: Mapping[str, str]) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    dotted = ".".join(loc)
    where = _origin(dotted, origins)
    kind = first["type"]
    if kind == "extra_forbidden":
        hint = _did_you_mean(loc)
        message = f"{dotted}: unknown key{hint}"
    elif kind == "missing":
        message = f"{dotted}: missing (add it to the config file)"
    else:
        text = first["msg"].removeprefix("Value error, ")
        if loc and loc != ["trainer"] and "input" in first and not isinstance(first["input"], dict):
            message = f"{dotted} = {_show(first['input'])}: {text}"
        else:
            message = f"{dotted}: {text}" if dotted else text
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {message}{more}"


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.dumps(value, default=str)


def _origin(dotted: str, origins: Mapping[str, str]) -> str:
    if dotted in origins:
        return origins[dotted]
    below = [label for key, label in origins.items() if key.startswith(f"{dotted}.") or not dotted]
    custom = [label for label in below if label != "packaged defaults"]
    return (custom or below or ["configuration"])[-1]


def _did_you_mean(loc: list[str]) -> str:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        info = model.model_fields.get(part)
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    valid = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1)
    section = f"[{'.'.join(loc[:-1])}]" if len(loc) > 1 else "the top level"
    if close:
        return f" (did you mean {close[0]}?)"
    return f"; valid keys in {section}: {', '.join(valid)}"


# --------------------------------------------------------------------------- public API


def load_config(
    config_files: Sequence[Path] = (),
    flags: Sequence[tuple[str, str]] = (),
    env_vars: Sequence[str] = (),
) -> ExperimentConfig:
    """Defaults < config files (in order) < environment overrides < flags, validated."""
    layers = [packaged_defaults()]
    layers += [file_layer(Path(path)) for path in config_files]
    layers += [layer for var in env_vars if (layer := env_layer(var)) is not None]
    if (flag_layer := flags_layer(flags)) is not None:
        layers.append(flag_layer)
    return validate(*merge_layers(layers))


def load_experiment_toml(path: Path) -> ExperimentConfig:
    """One experiment file over the packaged defaults, validated (no overrides)."""
    return load_config([path])


def load_full_experiment_config(
    path: Path, flags: Sequence[tuple[str, str]] = ()
) -> ExperimentConfig:
    """An experiment file with the training overrides of the environment and flags applied."""
    return load_config([path], flags, [TRAIN_OVERRIDES_ENV])


def config_from_toml_text(text: str, label: str) -> ExperimentConfig:
    """Validate a resolved configuration stored as TOML (for example inside a checkpoint)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: stored configuration is not valid TOML: {exc}") from None
    return validate(*merge_layers([packaged_defaults(), Layer(label, data)]))


def dump_toml(config: ExperimentConfig) -> str:
    """The resolved configuration as TOML that `--config` accepts again."""
    data = config.model_dump(mode="json")
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines += [f"{key} = {_toml_value(value)}" for key, value in scalars.items()]
    for name, table in tables.items():
        _dump_table(name, table, lines)
    return "\n".join(lines) + "\n"


def _dump_table(name: str, table: Mapping[str, Any], lines: list[str]) -> None:
    lines.append("")
    lines.append(f"[{name}]")
    subtables = {}
    for key, value in table.items():
        if isinstance(value, dict):
            subtables[key] = value
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in subtables.items():
        _dump_table(f"{name}.{_toml_key(key)}", value, lines)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


__all__ = [
    "SAMPLE_OVERRIDES_ENV",
    "TRAIN_OVERRIDES_ENV",
    "Layer",
    "config_from_toml_text",
    "deep_merge",
    "dump_toml",
    "load_config",
    "load_experiment_toml",
    "load_full_experiment_config",
    "merge_layers",
    "read_toml",
    "validate",
]
