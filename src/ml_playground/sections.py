"""The base of every settings section, and the path values sections hold.

Each section is a strict Pydantic model that lives beside the class it configures
(`ModelConfig` in `module.py`, `DataConfig` in `data.py`, ...); LightningCLI reads them as
that class's init arguments. Defaults are not written in them: `default.toml` holds them.
"""

from __future__ import annotations

import os
from pathlib import PosixPath
from typing import Annotated, Any

from jsonargparse.typing import register_type
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import core_schema

CKPT_ALIASES = ("best", "last")
MAX_SEED = 2**32 - 1  # numpy's generators take no more
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
PROMPT_FILE_PREFIX = "FILE:"


class Section(BaseModel):
    """Strict, closed, immutable: a typo or a wrong type is an error, never ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- path values
# jsonargparse parses a config file with that file's folder as the working directory, so a
# value anchored (made absolute) when it is parsed resolves against the file that holds it;
# flags and environment overrides resolve against the real working directory.


def anchor(value: object) -> str:
    """An absolute path: relative ones are taken from the current working directory."""
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"expected a path, got {value!r}")
    text = os.fspath(value)
    if not text or "\0" in text:
        raise ValueError(f"not a usable path: {text!r}")
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):  # ~name of a user this machine does not know
        raise ValueError(f"cannot expand {text!r}: unknown user; write the full path")
    return os.path.abspath(expanded)


class _Anchored:
    """A value type whose text is anchored when parsed; registered with jsonargparse and
    accepted by the strict Pydantic models (as text or, for paths, a path)."""

    @classmethod
    def parse(cls, value: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            lambda v: v if isinstance(v, cls) else cls.parse(v),
            serialization=core_schema.to_string_ser_schema(),
        )

    @classmethod
    def register(cls) -> None:
        register_type(cls, serializer=str, deserializer=cls.parse)


class AnchoredPath(_Anchored, PosixPath):
    """A folder or file; relative to the config file that names it."""

    @classmethod
    def parse(cls, value: Any) -> AnchoredPath:
        return cls(anchor(value))


def is_url(source: str | os.PathLike[str]) -> bool:
    """True for ``http://`` and ``https://`` sources (the one URL test)."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


class Source(_Anchored, str):
    """A corpus: a URL (http(s), hf://, any fsspec protocol) as it is, otherwise a path."""

    @classmethod
    def parse(cls, value: Any) -> Source:
        remote = isinstance(value, str) and "://" in value  # http(s) or any fsspec URL
        return cls(value if remote else anchor(value))


class CheckpointRef(_Anchored, str):
    """`best`, `last`, a checkpoint file, a Hugging Face folder, or a hub id (a name that is
    not a path here)."""

    @classmethod
    def parse(cls, value: Any) -> CheckpointRef:
        if value in CKPT_ALIASES or (isinstance(value, str) and _hub_id(value)):
            return cls(value)
        return cls(anchor(value))


class Pretrained(_Anchored, str):
    """`scratch`, a Hugging Face hub id (`gpt2`, `openai-community/gpt2`, ...) or a path (a
    Hugging Face folder or a checkpoint file): a path when it exists, else a hub id."""

    @classmethod
    def parse(cls, value: Any) -> Pretrained:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected scratch, a hub id or a path, got {value!r}")
        return cls(value if value == "scratch" or _hub_id(value) else anchor(value))


def _hub_id(value: str) -> bool:
    """`name` or `owner/name` that is not a path here, nor a file name (`ckpt.pt`)."""
    parts = value.split("/")
    return (
        len(parts) <= 2
        and all(p and p not in (".", "..") and " " not in p for p in parts)
        and not value.endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".toml"))
        and not os.path.exists(os.path.expanduser(value))
    )


class Prompt(_Anchored, str):
    """Text, or `FILE:path` with the path anchored."""

    @classmethod
    def parse(cls, value: Any) -> Prompt:
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        if value.startswith(PROMPT_FILE_PREFIX):
            return cls(PROMPT_FILE_PREFIX + anchor(value[len(PROMPT_FILE_PREFIX) :]))
        return cls(value)


class OptionalPath(_Anchored, str):
    """A file, or "" for none."""

    @classmethod
    def parse(cls, value: Any) -> OptionalPath:
        return cls("" if value == "" else anchor(value))


for _type in (AnchoredPath, Source, CheckpointRef, Pretrained, Prompt, OptionalPath):
    _type.register()
