"""`[trainer]` checking without Lightning: the type trees agree with Pydantic's strict mode on
every Trainer argument, the cache is written, read and rebuilt, and `prepare` does not import
Lightning once it exists."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import Trainer
from pydantic import ConfigDict, TypeAdapter, ValidationError

from ml_playground.configuration import trainer_args
from ml_playground.configuration.schema import MANAGED_TRAINER_KEYS
from ml_playground.configuration.trainer_args import accepts, from_lightning, tree_of

HINTS = typing.get_type_hints(Trainer.__init__)
NAMES = [  # the managed ones (callbacks, logger, ...) are refused before any type check
    name
    for name in inspect.signature(Trainer.__init__).parameters
    if name != "self" and name not in MANAGED_TRAINER_KEYS
]
STRICT = ConfigDict(arbitrary_types_allowed=True, strict=True)


def literal_values(hint: Any) -> list[Any]:
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [v for arg in typing.get_args(hint) for v in literal_values(arg)]


LITERALS = sorted(
    {repr(v): v for n in NAMES for v in literal_values(HINTS.get(n))}.values(), key=repr
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 100),
    st.sampled_from([0, 1, 16, 32, 64, -1, 2**40]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, 0.25, 16.0]),
    st.text(max_size=8),
    st.sampled_from([*LITERALS, "null", "auto", "cpu", "ddp", "1", "00:01:00:00", "simple"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def pydantic_accepts(name: str, value: Any) -> bool:
    try:
        TypeAdapter(HINTS.get(name, Any), config=STRICT).validate_python(value)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None)
@given(value=values)
def test_trees_agree_with_pydantic_strict(name: str, value: Any) -> None:
    tree = tree_of(HINTS.get(name, Any))
    ours, theirs = accepts(tree, value), pydantic_accepts(name, value)
    if theirs and not ours and isinstance(value, float):
        # Pydantic lets 16.0 match Literal[16]; Lightning itself refuses precision "16.0".
        assert value.is_integer() and value in literal_values(HINTS[name]), (name, value)
        return
    assert ours == theirs, (name, value, tree)


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("precision", "bf16-mixed", True),
        ("precision", "bf16-mix", False),
        ("precision", 16, True),
        ("precision", True, False),
        ("devices", [0, 1], True),
        ("devices", [0, "1"], False),
        ("max_steps", 5.0, False),
        ("gradient_clip_val", 1, True),
        ("max_time", {"hours": 1}, True),
        ("accelerator", "gpu", True),
        ("deterministic", "warn", True),
    ],
)
def test_known_values(name: str, value: Any, ok: bool) -> None:
    assert accepts(tree_of(HINTS[name]), value) is ok
    assert pydantic_accepts(name, value) is ok


def test_cache_is_written_read_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_PLAYGROUND_CACHE", str(tmp_path))
    monkeypatch.setattr(trainer_args, "_memo", {})
    signature = trainer_args.trainer_signature()  # Lightning is imported here: from its hints
    assert signature == from_lightning()
    files = list(tmp_path.glob("trainer-signature-lightning-*.json"))
    assert len(files) == 1
    version = files[0].name.removeprefix("trainer-signature-lightning-").removesuffix(".json")
    assert trainer_args._read_cache(version) == signature

    files[0].write_text('{"lightning": "' + version + '", "arguments": {"x": [{"bad": 1}, ""]}}')
    assert trainer_args._read_cache(version) is None  # damaged: ignored
    files[0].write_text("not json")
    assert trainer_args._read_cache(version) is None
    monkeypatch.setattr(trainer_args, "_memo", {})
    assert trainer_args.trainer_signature() == signature
    assert json.loads(files[0].read_text())["lightning"] == version  # rewritten


def test_prepare_and_sample_configs_load_without_lightning(tmp_path: Path, experiment_toml) -> None:
    """With the cache in place, loading (and checking) a config imports no Lightning; a bad
    [trainer] value is still refused."""
    code = f"""
import sys
from pathlib import Path
from ml_playground.configuration import load_config
from ml_playground.errors import ConfigError
cfg = load_config([Path({str(experiment_toml)!r})], [("trainer.precision", "bf16-mixed")])
assert cfg.trainer["precision"] == "bf16-mixed"
try:
    load_config([Path({str(experiment_toml)!r})], [("trainer.precision", "bf16-mix")])
except ConfigError as exc:
    assert "trainer.precision" in str(exc), exc
else:
    raise AssertionError("bf16-mix accepted")
print("lightning imported:", "lightning.pytorch" in sys.modules)
"""
    env = {"ML_PLAYGROUND_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "lightning imported: True" in first.stdout  # no cache yet: built from Lightning
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "lightning imported: False" in second.stdout


def test_a_float_never_matches_an_int_literal() -> None:
    """Unlike Pydantic (which lets 16.0 match Literal[16]): Lightning refuses precision=16.0."""
    assert not accepts(tree_of(HINTS["precision"]), 16.0)
    assert accepts(tree_of(HINTS["precision"]), 16)
