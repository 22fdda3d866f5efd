"""Fuzzing the configuration loader: whatever the TOML file, the environment overrides and the
flags hold, `load_config` returns an `ExperimentConfig` or raises `ConfigError`, nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_playground.configuration import load_config
from ml_playground.configuration.loading import TRAIN_OVERRIDES_ENV, dump_toml
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.errors import ConfigError

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # the same examples every run: a shared suite stays reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def known_keys() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {"": []}
    for name, info in ExperimentConfig.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            sections[name] = list(annotation.model_fields)
        else:
            sections[""].append(name)
    sections["trainer"] = ["max_steps", "devices", "precision", "accelerator", "max_stepz"]
    sections["checkpointing"].append("keep")
    return sections


KNOWN = known_keys()
ALL_KEYS = sorted({key for keys in KNOWN.values() for key in keys} | set(KNOWN) - {""})

keys = st.one_of(
    st.sampled_from(ALL_KEYS),
    st.text(min_size=1, max_size=12),
    st.sampled_from(["", "{experiment}", "a.b", "null"]),
)
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(
        [
            "null",
            "char",
            "tiktoken:gpt2",
            "best",
            "FILE:x.txt",
            "~/x",
            "{experiment}",
            "https://example.invalid/x.txt",
            "min",
            "32-true",
            "auto",
            "../up",
        ]
    ),
    st.sampled_from([0, 1, -1, 2, 16, 64, 0.0, 0.5, 1.0, 1e-3]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly the real sections and keys with random values, plus random extra keys."""
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(KNOWN)), max_size=5, unique=True)):
        names = KNOWN[section]
        chosen = draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
        table = {name: draw(values) for name in chosen}
        if section:
            doc[section] = draw(st.one_of(st.just(table), values)) if draw(st.booleans()) else table
        else:
            doc.update(table)
    doc.update(draw(st.dictionaries(keys, values, max_size=2)))
    return doc


def to_toml(doc: dict[str, Any]) -> str:
    """The project's TOML writer (it also writes --print_config and config.toml)."""
    try:
        return dump_toml(doc)
    except (TypeError, ValueError):  # what TOML cannot hold (nan keys, mixed arrays are fine)
        return ""


def check(call: Any) -> None:
    try:
        config = call()
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
    else:
        assert isinstance(config, ExperimentConfig)


@SETTINGS
@given(doc=documents())
def test_random_toml_documents(doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    check(lambda: load_config([path]))


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_random_bytes_as_a_config_file(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(raw)
    check(lambda: load_config([path]))


@SETTINGS
@given(
    override=st.one_of(
        documents().map(json.dumps),
        values.map(json.dumps),
        st.text(max_size=60),
    ),
    flags=st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from(
                    [
                        "model.n_layer",
                        "trainer.max_steps",
                        "sample.prompt",
                        "data",
                        "log_dir",
                        "checkpointing.keep.last",
                        "checkpointing.keep",
                        "a..b",
                        "model.n_layer.x",
                    ]
                ),
                st.text(min_size=1, max_size=15),
            ),
            st.one_of(st.text(max_size=15), st.sampled_from(["1", "-1", "[1]", "{a=1}", "nan"])),
        ),
        max_size=3,
    ),
)
def test_random_overrides_and_flags(
    override: str, flags: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRAIN_OVERRIDES_ENV, override)
    check(lambda: load_config([], flags, [TRAIN_OVERRIDES_ENV]))


def test_path_with_an_unknown_user_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "tilde.toml"
    path.write_text('[data]\ndataset_dir = "~no_such_user_ml_playground/x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data\.dataset_dir: cannot expand .*: unknown user"):
        load_config([path])
