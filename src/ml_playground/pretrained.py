"""`model.init_from`: a model's shape and weights from published or earlier work.

A source is a Hugging Face hub id of a GPT-2 model (`gpt2` ... `gpt2-xl`, or `owner/name`,
fetched once into the hub's own cache with `huggingface_hub`), a local folder in the Hugging
Face GPT-2 layout (`config.json` + `model.safetensors`, read with `safetensors`), a nanoGPT
`ckpt.pt`, or an ml-playground checkpoint (its weights only). The shape comes from the source,
the weights are returned under our (nanoGPT's) names.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from ml_playground.errors import CheckpointError, ConfigError, shorten
from ml_playground.model.gpt import GPT, GPTConfig, strip_compile_prefix

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "activation")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASKS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of nanoGPT / old transformers
HUB_FILES = ["config.json", "model.safetensors"]
HF_SIZES = {  # our names -> config.json's
    "n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
    "vocab_size": "vocab_size",
}  # fmt: skip


def _folder(source: str, files: list[str]) -> Path | None:
    """The local folder holding a Hugging Face model's `files` for `source`, or None for a
    checkpoint file (a hub id fetches only `files`: the shape needs only config.json)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        return None  # a checkpoint file
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=files))
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"{source!r} (model.init_from / sample.ckpt): not in the Hugging Face cache and the hub cannot be "
            "reached; download it once with network (it is kept in the hub's cache; then "
            "HF_HUB_OFFLINE=1 works offline), or give a local folder with config.json and "
            "model.safetensors"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0], 160)
        raise ConfigError(f"{source!r} (model.init_from / sample.ckpt): {first}") from None


def _hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(
            f"{path}: not readable ({exc.strerror or exc}); a Hugging Face GPT-2 folder holds "
            "config.json and model.safetensors"
        ) from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise CheckpointError(
            f"{path}: not valid JSON ({shorten(str(exc), 120)}); the file is damaged: restore "
            "the config.json saved with the weights"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path}: holds a JSON {type(config).__name__}, not an object; the file is damaged"
        )
    if config.get("model_type") != "gpt2":
        raise ConfigError(
            f"model.init_from: {folder} holds a {config.get('model_type')!r} model; only GPT-2 "
            "models (model_type gpt2) can be loaded"
        )
    activation = ACTIVATIONS.get(config.get("activation_function", "gelu_new"))
    if activation is None or config.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ConfigError(
            f"model.init_from: {folder}: activation {config.get('activation_function')!r} / "
            f"layer_norm_epsilon {config.get('layer_norm_epsilon')} are not supported"
        )
    return config | {"activation": activation}


def _sizes(where: str, table: dict[str, Any], names: dict[str, str]) -> dict[str, int]:
    """The model's sizes as the source states them (`names`: ours -> the source's), each a
    positive integer: a damaged or edited file is refused here, naming the key, rather than
    as a setting of the user's config (which the source's shape replaces)."""
    sizes = {}
    for ours, theirs in names.items():
        value = table.get(theirs)
        if type(value) is not int or value < 1:
            found = f"is {value!r}, not a positive integer" if theirs in table else "is missing"
            raise CheckpointError(f"{where}: {theirs} {found}; the file is damaged or was edited")
        sizes[ours] = value
    if sizes["n_embd"] % sizes["n_head"]:
        raise CheckpointError(
            f"{where}: n_embd ({sizes['n_embd']}) is not a multiple of n_head "
            f"({sizes['n_head']}); the file is damaged or was edited"
        )
    return sizes


def _checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A nanoGPT or ml-playground checkpoint's model arguments and weights, memory-mapped:
    reading the shape costs no tensor reads, and the weights are copied once, into the model."""
    from ml_playground.checkpoint_reading import (
        SECTION,
        checked_checkpoint,
        is_nanogpt_checkpoint,
        read_checkpoint,
    )

    raw = read_checkpoint(path, mmap=True)
    nanogpt = is_nanogpt_checkpoint(raw)
    if nanogpt:
        args, state = raw["model_args"], raw["model"]
    else:
        checkpoint = checked_checkpoint(path, raw)
        args, state = checkpoint[SECTION]["model_args"], checkpoint["state_dict"]
    if not isinstance(args, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: its model_args or weights are not a table; it is damaged")
    if not nanogpt:
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    weights = {k: v for k, v in strip_compile_prefix(state).items() if not k.endswith(MASKS)}
    if not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise CheckpointError(f"{path}: its weights are not all tensors; it is damaged")
    return dict(args), weights


def with_source_shape(sections: dict[str, Any]) -> dict[str, Any]:
    """The experiment's sections with `model.init_from`'s shape in place of the config's, as
    nanoGPT's init_from does (a hub id's config.json is fetched: only commands that build the
    model call this, never the parsing)."""
    model: Any = sections.get("model")
    source = model.get("init_from") if isinstance(model, dict) else None
    if not isinstance(source, str) or source == "scratch":
        return sections
    shape = source_shape(source)
    return {**sections, "model": {**model, **{key: shape[key] for key in SHAPE_KEYS}}}


def source_shape(source: str) -> dict[str, Any]:
    """The shape keys of `source` (and `vocab_size`, the rows of its token embedding)."""
    return dict(_shape(source))


@functools.cache
def _shape(source: str) -> dict[str, Any]:  # read once per process: config, then the module
    folder = _folder(source, ["config.json"])
    if folder is None:
        args, _ = _checkpoint(Path(source))
        where = f"{source}: model_args"
        sizes = _sizes(where, args, {key: key for key in HF_SIZES})
        shape: dict[str, Any] = {"bias": True, "activation": "gelu"}  # nanoGPT's defaults
        for key, allowed in (("bias", (True, False)), ("activation", ("gelu", "gelu_tanh"))):
            shape[key] = args.get(key, shape[key])
            if shape[key] not in allowed:
                raise CheckpointError(f"{where}: {key} is {args[key]!r}, not one of {allowed}")
        return shape | sizes
    config = _hf_config(folder)
    sizes = _sizes(str(folder / "config.json"), config, HF_SIZES)
    return {**sizes, "bias": True, "activation": config["activation"]}  # GPT-2 has biases


def check_source_tokenizer(source: str, dataset_meta: dict[str, Any]) -> None:
    """An ml-playground checkpoint carries its tokenizer: fine-tuning it on data tokenized
    otherwise, even with as many tokens, would train on the wrong token ids. (A hub model or
    a nanoGPT ckpt.pt carries none; `check_tokens` compares their sizes.)"""
    from ml_playground.checkpoint_reading import SECTION, check_same_tokenizer, read_checkpoint

    if not Path(source).is_file():  # a hub id or a Hugging Face folder
        return
    raw = read_checkpoint(Path(source), mmap=True)
    meta = raw.get(SECTION, {}).get("meta") if isinstance(raw.get(SECTION), dict) else None
    if isinstance(meta, dict) and meta and dataset_meta:
        fix = "prepare the data with the tokenizer the checkpoint was trained with"
        check_same_tokenizer(Path(source), meta, dataset_meta, fix)


def source_weights(source: str) -> dict[str, torch.Tensor]:
    """The source's weights under our names (`lm_head.weight` tied to the token embedding),
    checked against the shape the source states."""
    folder = _folder(source, HUB_FILES)
    if folder is None:
        weights = _checkpoint(Path(source))[1]
        where, stated, names = source, "its model_args", {key: key for key in HF_SIZES}
    else:
        weights = _safetensors(folder / "model.safetensors")
        where, stated, names = f"{folder}/model.safetensors", f"{folder}/config.json", HF_SIZES
    shape = source_shape(source)
    sizes = ", ".join(f"{theirs} {shape[ours]}" for ours, theirs in names.items())
    _check_shapes(where, f"{stated} ({sizes})", weights, shape)
    return weights


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found; a Hugging Face GPT-2 folder holds config.json and "
            "model.safetensors"
        )
    try:
        loaded = load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0], 120)
        raise CheckpointError(
            f"{path}: not readable ({first}); the file is truncated or damaged: download or "
            "export it again"
        ) from None
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in loaded.items():
        name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if not name.endswith(MASKS):
            weights[name] = tensor.t() if name.endswith(CONV1D) else tensor
    if "transformer.wte.weight" in weights:
        weights.setdefault("lm_head.weight", weights["transformer.wte.weight"])
    return weights


def _check_shapes(
    where: str, stated: str, weights: dict[str, torch.Tensor], shape: dict[str, Any]
) -> None:
    """Every weight the stated shape needs, of its size, and no other: a config.json (or
    model_args) edited or swapped is refused by name before any weight is copied."""
    config = GPTConfig(dropout=0.0, **{key: shape[key] for key in (*SHAPE_KEYS, "vocab_size")})
    with torch.device("meta"):  # the sizes alone: nothing is allocated
        needed = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    for name in [*needed, *sorted(found.keys() - needed.keys())]:
        if name not in found:
            problem = f"has no {name}, which {stated} calls for"
        elif name not in needed:
            problem = f"holds {name}, which {stated} has no place for"
        elif found[name] != needed[name]:
            problem = f"holds {name} of shape {found[name]}, but {stated} calls for {needed[name]}"
        else:
            continue
        raise CheckpointError(
            f"{where} {problem}: the two do not belong together (a file edited or swapped); "
            "use the files as they were saved"
        )


def build(source: str) -> GPT:
    """A GPT of the source's shape (its whole vocabulary) holding its weights, for sampling."""
    shape = source_shape(source)
    config = GPTConfig(dropout=0.0, **{key: shape[key] for key in (*SHAPE_KEYS, "vocab_size")})
    model = GPT(config)
    load_into(model, source, config.vocab_size)
    return model


def check_tokens(source: str, rows: int, vocab: int, model: GPT) -> None:
    """The source's `rows` token rows must cover the data's `vocab` tokens and fit the model's
    (padded) table: its tokenizer is the data's."""
    if not vocab <= rows <= model.transformer.wte.weight.shape[0]:
        raise ConfigError(
            f"model.init_from = {source!r} has {rows} tokens but the dataset (meta.pkl) "
            f"{vocab}: prepare the data with the source's tokenizer (GPT-2: prepare.tokenizer "
            '= "tiktoken:gpt2")'
        )


def load_into(model: GPT, source: str, vocab: int) -> None:
    """Copy `source`'s weights into `model`, which has the source's shape (see check_tokens):
    source_weights checked them against it."""
    weights = source_weights(source)
    rows = weights["transformer.wte.weight"].shape[0]
    check_tokens(source, rows, vocab, model)
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                target[:rows].copy_(weights[name])
            else:
                target.copy_(weights[name])
