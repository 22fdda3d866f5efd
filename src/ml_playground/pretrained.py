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

from ml_playground.errors import CheckpointError, ConfigError
from ml_playground.model.gpt import GPT, GPTConfig, strip_compile_prefix

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "activation")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_FILES = ["config.json", "model.safetensors"]


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
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"{source!r} (model.init_from / sample.ckpt): {first}") from None


def _hf_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.init_from: {folder}/config.json is not readable ({exc})"
        ) from None
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
    if is_nanogpt_checkpoint(raw):
        return dict(raw["model_args"]), strip_compile_prefix(raw["model"])
    checkpoint = checked_checkpoint(path, raw)
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return dict(checkpoint[SECTION]["model_args"]), strip_compile_prefix(weights)


def source_shape(source: str) -> dict[str, Any]:
    """The shape keys of `source` (and `vocab_size`, the rows of its token embedding)."""
    return dict(_shape(source))


@functools.cache
def _shape(source: str) -> dict[str, Any]:  # read once per process: config, then the module
    folder = _folder(source, ["config.json"])
    if folder is None:
        args, _ = _checkpoint(Path(source))
        shape = {key: args[key] for key in SHAPE_KEYS if key in args}
        return {"activation": "gelu", **shape, "vocab_size": args["vocab_size"]}
    config = _hf_config(folder)
    return {
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "n_embd": config["n_embd"],
        "block_size": config["n_positions"],
        "bias": True,  # GPT-2 always has biases
        "activation": config["activation"],
        "vocab_size": config["vocab_size"],
    }


def source_weights(source: str) -> dict[str, torch.Tensor]:
    """The source's weights under our names (`lm_head.weight` tied to the token embedding)."""
    folder = _folder(source, HUB_FILES)
    if folder is None:
        return _checkpoint(Path(source))[1]
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}/model.safetensors: not readable ({exc})") from None
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in loaded.items():
        name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions
        weights[name] = tensor.t() if name.endswith(CONV1D) else tensor
    weights.setdefault("lm_head.weight", weights["transformer.wte.weight"])
    return weights


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
    """Copy `source`'s weights into `model` (see check_tokens)."""
    weights = source_weights(source)
    rows = weights["transformer.wte.weight"].shape[0]
    check_tokens(source, rows, vocab, model)
    state = model.state_dict()
    with torch.no_grad():
        for name, target in state.items():
            if name not in weights:
                raise CheckpointError(f"model.init_from = {source!r}: no weights for {name}")
            value = weights[name]
            if name in ("transformer.wte.weight", "lm_head.weight"):
                target[:rows].copy_(value)
            elif value.shape != target.shape:
                raise CheckpointError(
                    f"model.init_from = {source!r}: {name} is {tuple(value.shape)}, the model "
                    f"expects {tuple(target.shape)}"
                )
            else:
                target.copy_(value)
