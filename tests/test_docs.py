"""The documentation cannot drift from the code it describes."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from ml_playground.configuration.reference import render
from ml_playground.configuration.schema import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_matches_the_schema() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert text == render(), (
        "docs/configuration.md is out of date: run "
        "`uv run python -m ml_playground.configuration.reference > docs/configuration.md`"
    )


def test_every_schema_field_is_documented() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")

    def walk(model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation)
            else:
                assert info.description, f"{model.__name__}.{name} has no description"
                assert f"`{name}`" in text or name == "trainer"

    walk(ExperimentConfig)
