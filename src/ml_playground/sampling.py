"""Text generation from a checkpoint file alone (weights, model shape and tokenizer inside)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from ml_playground.checkpoint_reading import (
    SECTION,
    checked_checkpoint,
    find_checkpoint,
    is_nanogpt_checkpoint,
    managed_files,
    read_checkpoint,
)
from ml_playground.errors import CheckpointError, SamplingError, shorten
from ml_playground.model.gpt import GPT, GPTConfig, strip_compile_prefix
from ml_playground.prepare import Tokenizer, read_meta, tokenizer_from_meta
from ml_playground.sections import (
    MAX_SEED,
    PROMPT_FILE_PREFIX,
    CheckpointRef,
    OptionalPath,
    Prompt,
    Section,
)


class SampleConfig(Section):
    """How `sample` generates text."""

    ckpt: CheckpointRef = Field(description='"best", "last" or a checkpoint file')
    prompt: Prompt = Field(description='text to continue, or "FILE:path" to read it from a file')
    num_samples: int = Field(description="samples generated together in one batch", gt=0)
    max_new_tokens: int = Field(description="tokens generated per sample", gt=0)
    temperature: float = Field(description="softmax temperature; 0 means greedy", ge=0.0)
    top_k: int = Field(description="sample among the k likeliest tokens; 0 disables", ge=0)
    top_p: float = Field(description="nucleus sampling mass; 1.0 disables", gt=0.0, le=1.0)
    seed: int = Field(description="random seed of the sampler", ge=0, le=MAX_SEED)
    output: OptionalPath = Field(
        description='also write the samples to this file ("" : only print them; {experiment} '
        "is replaced); relative paths resolve against the config file"
    )


def read_prompt(prompt: str) -> str:
    """The prompt text, read from a file when it is given as `FILE:path`."""
    if not prompt.startswith(PROMPT_FILE_PREFIX):
        return prompt
    path = Path(prompt[len(PROMPT_FILE_PREFIX) :])
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SamplingError(f"sample.prompt: prompt file {path} not found") from None
    except UnicodeDecodeError:
        raise SamplingError(f"sample.prompt: prompt file {path} is not UTF-8 text") from None


def model_from_checkpoint(path: Path, checkpoint: dict[str, Any]) -> GPT:
    """The plain GPT with the checkpoint's weights (EMA weights when the checkpoint has them)."""
    section = checkpoint[SECTION]
    try:
        with torch.device("meta"):  # no initialisation: the weights come from the checkpoint
            model = GPT(GPTConfig(**section["model_args"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model arguments ({exc})") from None
    weights = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    try:
        model.load_state_dict(strip_compile_prefix(weights), assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the stored model shape ({first})"
        ) from None
    model.float()  # as the float32 model the weights used to be copied into
    model.transformer.wte.weight = model.lm_head.weight  # assign=True untied the shared matrix
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise CheckpointError(
            f"{path}: the weights hold NaN or inf (saved from a run that diverged); sample "
            "from an earlier checkpoint"
        )
    return model


def generate_text(
    model: GPT, tokenizer: Tokenizer, settings: SampleConfig, device: torch.device | None = None
) -> list[str]:
    """All samples of the call generated together as one batch."""
    text = read_prompt(settings.prompt)
    if not text:
        raise SamplingError('sample.prompt is empty; give at least one token, e.g. "\\n"')
    try:
        ids = tokenizer.encode(text)
    except SamplingError as exc:
        where = settings.prompt if settings.prompt.startswith(PROMPT_FILE_PREFIX) else "text"
        raise SamplingError(f"sample.prompt ({shorten(where, 80)}): {exc}") from None
    if not ids:
        raise SamplingError("sample.prompt encodes to no tokens; give a longer prompt")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device).repeat(settings.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and torch.cuda.is_bf16_supported()
        else contextlib.nullcontext()
    )
    with autocast:
        out = model.generate(
            idx,
            settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k or None,
            top_p=settings.top_p if settings.top_p < 1.0 else None,
            generator=generator,
            refresh_keep=model.default_refresh_keep(),
            vocab_limit=tokenizer.vocab_size,
        )
    return [tokenizer.decode(row.tolist()) for row in out.cpu()]


def data_tokenizer(source: Path | str, vocab: int, dataset_dir: Path) -> dict[str, Any]:
    """nanoGPT's rule for a model that carries no tokenizer: `meta.pkl` beside the data, or
    GPT-2 BPE when there is none (`data.dataset_dir` is the data folder)."""
    meta_path = Path(dataset_dir) / "meta.pkl"
    if meta_path.is_file():
        return read_meta(meta_path)
    if vocab in (50257, 50304):
        return {"vocab_size": 50257, "tokenizer": "tiktoken", "encoding": "gpt2"}
    raise CheckpointError(
        f"{source}: a model with a vocabulary of {vocab} and no {meta_path}; set "
        "data.dataset_dir to the folder holding its meta.pkl"
    )


def from_nanogpt(
    path: Path, checkpoint: dict[str, Any], dataset_dir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our checkpoint layout for a nanoGPT `ckpt.pt`, with the tokenizer nanoGPT would use.

    nanoGPT keeps the tokenizer beside the data (`meta.pkl`), or means GPT-2 BPE when there is
    none: the same rule applies here, with `data.dataset_dir` as the data folder.
    """
    args = checkpoint["model_args"]
    keys = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")
    model_args = {key: args.get(key) for key in keys}
    model_args["dropout"] = float(model_args["dropout"] or 0.0)
    meta = data_tokenizer(path, model_args["vocab_size"], dataset_dir)
    weights = {
        f"model.{key}": value
        for key, value in strip_compile_prefix(checkpoint["model"]).items()
        if not key.endswith(".attn.bias")  # causal-mask buffers of old, non-flash nanoGPT
    }
    return {"state_dict": weights, SECTION: {"model_args": model_args, "meta": meta}}, meta


def sample(
    settings: SampleConfig, dirpath: Path, dataset_dir: Path, *, keeps_none: bool = False
) -> tuple[Path, list[str]]:
    """Resolve `sample.ckpt` (in the checkpoint folder `dirpath`), load it, and generate
    `sample.num_samples` texts; a nanoGPT checkpoint's meta.pkl is read from `dataset_dir`.
    `keeps_none`: checkpointing.keep.last and keep.best are both 0, so `fit` writes none."""
    which = str(settings.ckpt)
    kept = managed_files(dirpath, "best") or managed_files(dirpath, "last")
    if which in ("best", "last") and keeps_none and not kept:
        # "train first" or "use last" would send the user round in circles.
        raise CheckpointError(
            f"{dirpath}: no checkpoint to sample from: checkpointing.keep.last and keep.best "
            "are both 0, so fit wrote none; set one of them to 1 or more and train again, or "
            "set sample.ckpt to a checkpoint file"
        )
    if which == "best" and not managed_files(dirpath, "best") and managed_files(dirpath, "last"):
        print(
            f"note: {dirpath} holds no ckpt_best_* (checkpointing.keep.best = 0, or no "
            "validation improved yet); sampling from the newest ckpt_last_* instead",
            file=sys.stderr,
        )
        which = "last"
    path, model, tokenizer, _ = load_model(which, dirpath, dataset_dir)
    return path, generate_text(model, tokenizer, settings)


def load_model(
    which: str, dirpath: Path, dataset_dir: Path
) -> tuple[Path, GPT, Tokenizer, dict[str, Any]]:
    """The model `which` names (`best`, `last` or a checkpoint file, a Hugging Face folder or
    hub id), its tokenizer and the tokenizer's meta. Models that carry no tokenizer (nanoGPT,
    Hugging Face) take the data's, by nanoGPT's rule (`data_tokenizer`)."""
    foreign = which not in ("best", "last") and (
        Path(which).is_dir() or not Path(which).is_absolute()
    )
    if foreign:
        from ml_playground.pretrained import build  # a Hugging Face folder or hub id

        path, model = Path(which), build(which)
        meta = data_tokenizer(which, model.config.vocab_size, dataset_dir)
    else:
        path = find_checkpoint(dirpath, which)
        raw = read_checkpoint(path)
        foreign = is_nanogpt_checkpoint(raw)
        if foreign:
            checkpoint, meta = from_nanogpt(path, raw, dataset_dir)
        else:
            checkpoint = checked_checkpoint(path, raw)
            meta = checkpoint[SECTION]["meta"]
        model = model_from_checkpoint(path, checkpoint)
    tokenizer = tokenizer_from_meta(meta)
    padding = model.config.vocab_size - tokenizer.vocab_size  # nanoGPT pads to a multiple of 64
    if padding < 0 or (foreign and padding >= 64):
        raise CheckpointError(
            f"{path}: the model has {model.config.vocab_size} tokens but the tokenizer "
            f"{tokenizer.vocab_size}: they do not belong together; point data.dataset_dir at "
            "the data (meta.pkl) of the model's tokenizer"
        )
    return path, model, tokenizer, meta
