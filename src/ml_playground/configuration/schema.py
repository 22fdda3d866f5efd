"""The configuration schema: one strict Pydantic model per TOML section.

Defaults are not written here: they live in the packaged `default.toml`, which the command line
(LightningCLI + jsonargparse, `cli.py`) sets under every experiment file, so every field below
is required. jsonargparse reads these models as the argument groups of `[prepare]`, `[data]`,
`[model]`, `[checkpointing]` and `[sample]`; Pydantic then validates the merged whole.
"""

from __future__ import annotations

import os
from pathlib import PosixPath
from typing import Any, Literal

from jsonargparse.typing import register_type
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import core_schema

from ml_playground.prepare.download import is_url

# Trainer arguments the project sets itself: a user value would silently fight ours.
MANAGED_TRAINER_KEYS = {
    "plugins": "ml-playground installs its own checkpoint I/O plugin",
    "enable_checkpointing": "use [checkpointing] keep.last / keep.best (0 disables a kind)",
    "default_root_dir": "use log_dir and checkpointing.dirpath",
}
CKPT_ALIASES = ("best", "last")
PROMPT_FILE_PREFIX = "FILE:"
EXPERIMENT = "{experiment}"


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
    try:
        return os.path.abspath(os.path.expanduser(text))
    except RuntimeError:  # ~name of an unknown user
        raise ValueError(f"cannot expand {text!r}: unknown user; write the full path") from None


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


class Source(_Anchored, str):
    """A corpus: an http(s) URL as it is, otherwise a path."""

    @classmethod
    def parse(cls, value: Any) -> Source:
        return cls(value if isinstance(value, str) and is_url(value) else anchor(value))


class CheckpointRef(_Anchored, str):
    """`best`, `last` or a checkpoint file."""

    @classmethod
    def parse(cls, value: Any) -> CheckpointRef:
        return cls(value if value in CKPT_ALIASES else anchor(value))


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


for _type in (AnchoredPath, Source, CheckpointRef, Prompt, OptionalPath):
    _type.register()


class Section(BaseModel):
    """Strict, closed, immutable: a typo or a wrong type is an error, never ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class PrepareConfig(Section):
    """How `prepare` turns a raw corpus into train.bin / val.bin / meta.pkl."""

    source: Source = Field(
        description="the raw corpus: a URL (downloaded once into the cache), a UTF-8 file, a "
        "folder (every *.txt below it, sorted) or a glob pattern; relative paths resolve "
        "against the config file"
    )
    source_sha256: str = Field(
        description='expected sha256 of the raw corpus; "" skips the check',
        pattern=r"^([0-9a-f]{64})?$",
    )
    tokenizer: str = Field(
        description='"char" (one token per character) or "tiktoken:<encoding>", e.g. tiktoken:gpt2',
        pattern=r"^(char|tiktoken:[A-Za-z0-9_.-]+)$",
    )
    val_fraction: float = Field(
        description="share of the corpus held out for validation: the last part of the text "
        '(split "contiguous") or of the documents (split "documents")',
        gt=0.0,
        lt=1.0,
    )
    split: Literal["contiguous", "documents"] = Field(
        description="\"contiguous\": nanoGPT's split, the text's last val_fraction validates; "
        '"documents": a random val_fraction of the documents (seeded by seed_everything)'
    )
    document_separator: str = Field(
        description='what separates documents inside a file ("" : each file is one document); '
        "with BPE, documents are joined by the end-of-text token"
    )
    chunk_bytes: int = Field(
        description="bytes read and tokenized at a time (prepare streams: memory stays bounded)",
        gt=0,
    )
    num_threads: int = Field(
        description="threads for BPE encoding (tiktoken's batch API); 0: one per CPU", ge=0
    )


class DataConfig(Section):
    """Where the prepared tokens are and how batches are drawn from them."""

    dataset_dir: AnchoredPath = Field(
        description="folder with train.bin, val.bin and meta.pkl ({experiment} is replaced)"
    )
    batch_size: int = Field(description="sequences per micro-batch (per device)", gt=0)
    block_size: int = Field(description="tokens per training sequence", gt=0)
    val_batches: int = Field(
        description="batches in the fixed validation set (evenly spaced windows of val.bin)",
        gt=0,
    )
    num_workers: int = Field(description="DataLoader worker processes (0: load in-process)", ge=0)
    pin_memory: bool = Field(description="pin host memory for faster copies to a GPU")


class ModelConfig(Section):
    """The GPT's shape, its optimizer and learning-rate schedule."""

    n_layer: int = Field(description="transformer blocks", gt=0)
    n_head: int = Field(description="attention heads per block", gt=0)
    n_embd: int = Field(description="embedding width (a multiple of n_head)", gt=0)
    block_size: int = Field(description="context length the model supports", gt=0)
    vocab_multiple_of: int = Field(
        description="round the vocabulary (from meta.pkl) up to a multiple of this for faster "
        "matmuls (GPT-2: 64 gives 50304); sampling never picks the padding tokens",
        gt=0,
    )
    dropout: float = Field(
        description="dropout probability (0 for small data / fine-tuning)", ge=0.0, lt=1.0
    )
    bias: bool = Field(description="biases in Linear and LayerNorm layers (GPT-2: true)")
    learning_rate: float = Field(description="peak learning rate of AdamW", gt=0.0)
    min_lr: float = Field(description="learning rate at the end of the cosine decay", ge=0.0)
    warmup_steps: int = Field(description="optimizer steps of linear warmup", ge=0)
    lr_decay_steps: int = Field(
        description="optimizer step at which the cosine decay reaches min_lr", gt=0
    )
    weight_decay: float = Field(description="AdamW weight decay (matrices only)", ge=0.0)
    beta1: float = Field(description="AdamW beta1", gt=0.0, lt=1.0)
    beta2: float = Field(description="AdamW beta2", gt=0.0, lt=1.0)
    compile: bool = Field(description="wrap the model in torch.compile")
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field(
        description="torch.compile's mode when compile is true: reduce-overhead adds CUDA graphs "
        "(fewer kernel launches, for small models on a GPU), max-autotune searches for faster "
        "kernels (minutes of compilation)"
    )
    compile_scope: Literal["model", "blocks"] = Field(
        description="what torch.compile wraps: the whole model, or each transformer block on "
        "its own (identical blocks share one compilation: a faster start, about the same speed)"
    )
    ema_decay: float = Field(
        description="keep an exponential moving average of the weights with this decay "
        "(e.g. 0.999); validation, best checkpoints and sampling then use it; 0 disables",
        ge=0.0,
        lt=1.0,
    )

    @model_validator(mode="after")
    def _check_shape_and_schedule(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.warmup_steps > self.lr_decay_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed "
                f"lr_decay_steps ({self.lr_decay_steps})"
            )
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})"
            )
        return self


class KeepConfig(Section):
    """How many checkpoint files of each kind stay on disk (0 disables that kind)."""

    last: int = Field(description="ckpt_last_* files kept (the newest)", ge=0)
    best: int = Field(description="ckpt_best_* files kept (the best)", ge=0)


class CheckpointingConfig(Section):
    """Where checkpoints go, when they are written and how many are kept."""

    dirpath: AnchoredPath = Field(description="checkpoint folder ({experiment} is replaced)")
    every_n_steps: int = Field(description="write a last checkpoint every N optimizer steps", gt=0)
    metric: str = Field(description="logged metric that decides the best checkpoint")
    mode: Literal["min", "max"] = Field(description="whether a lower or a higher metric is better")
    patience: int = Field(
        description="stop training when the metric has not improved for this many "
        "validations (the best checkpoint stays); 0 disables early stopping",
        ge=0,
    )
    keep: KeepConfig


class SampleConfig(Section):
    """How `sample` generates text."""

    ckpt: CheckpointRef = Field(description='"best", "last" or a checkpoint file')
    prompt: Prompt = Field(description='text to continue, or "FILE:path" to read it from a file')
    num_samples: int = Field(description="samples generated together in one batch", gt=0)
    max_new_tokens: int = Field(description="tokens generated per sample", gt=0)
    temperature: float = Field(description="softmax temperature; 0 means greedy", ge=0.0)
    top_k: int = Field(description="sample among the k likeliest tokens; 0 disables", ge=0)
    top_p: float = Field(description="nucleus sampling mass; 1.0 disables", gt=0.0, le=1.0)
    seed: int = Field(description="random seed of the sampler")
    output: OptionalPath = Field(
        description='also write the samples to this file ("" : only print them); relative '
        "paths resolve against the config file"
    )


class ExperimentConfig(Section):
    """A whole experiment: every section of the TOML file, validated together."""

    experiment: str = Field(
        description="name of the run, used for log and checkpoint folders",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    )
    seed_everything: int = Field(description="global random seed (torch, numpy, python, data)")
    log_dir: AnchoredPath = Field(
        description="TensorBoard logs go to <log_dir>/<experiment>/version_N"
    )
    prepare: PrepareConfig
    data: DataConfig
    model: ModelConfig
    trainer: dict[str, Any] = Field(
        description="keyword arguments of lightning.Trainer (checked by jsonargparse against its signature)"
    )
    checkpointing: CheckpointingConfig
    sample: SampleConfig

    @model_validator(mode="before")
    @classmethod
    def _name_paths(cls, data: Any) -> Any:
        """ "{experiment}" in the folders becomes the experiment's name."""
        if not isinstance(data, dict) or not isinstance(data.get("experiment"), str):
            return data
        name, data = data["experiment"], dict(data)
        for section, key in (
            ("", "log_dir"),
            ("data", "dataset_dir"),
            ("checkpointing", "dirpath"),
        ):
            table = dict(data.get(section) or {}) if section else data
            if isinstance(table.get(key), str | os.PathLike):
                table[key] = os.fspath(table[key]).replace(EXPERIMENT, name)
                if section:
                    data[section] = table
        return data

    @model_validator(mode="after")
    def _check_across_sections(self) -> ExperimentConfig:
        if self.data.block_size > self.model.block_size:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) exceeds the model's context "
                f"model.block_size ({self.model.block_size})"
            )
        accumulate = self.trainer.get("accumulate_grad_batches", 1)
        interval = self.trainer.get("val_check_interval")
        if (
            isinstance(accumulate, int)
            and isinstance(interval, int)
            and not isinstance(interval, bool)
            and accumulate > 1
            and interval % accumulate
        ):
            # Lightning counts val_check_interval in micro-batches: a validation (and a best
            # checkpoint) in the middle of an accumulated step could not be resumed exactly.
            raise ValueError(
                f"trainer.val_check_interval ({interval}) counts micro-batches and must be a "
                f"multiple of trainer.accumulate_grad_batches ({accumulate}); for a validation "
                f"every N optimizer steps use N x {accumulate}"
            )
        return self

    @property
    def runtime(self) -> ExperimentConfig:
        """The runtime part (trainer, checkpointing, logging) as the seed note names it."""
        return self
