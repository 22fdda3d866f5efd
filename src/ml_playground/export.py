"""`ml-playground export`: a checkpoint as a Hugging Face GPT-2 folder.

`config.json` and `model.safetensors` in the layout `transformers.GPT2LMHeadModel` reads (its
Conv1D weights are our Linear weights transposed; the padded vocabulary rows are dropped; a
model without biases gets zero biases, which GPT-2 always has), and for GPT-2 BPE runs the
tokenizer files (`vocab.json`, `merges.txt`), so `pipeline("text-generation", model=DIR)` works
as it is. A char run gets `char_vocab.json`: the characters in id order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ml_playground.errors import ConfigError
from ml_playground.files import fsync_dir, temporary_name
from ml_playground.prepare.tokenizers import GPT2_FILES, HF_FILES
from ml_playground.sampling import load_model

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BIASED = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
CONFIG, WEIGHTS, CHARS = "config.json", "model.safetensors", "char_vocab.json"
# Every name an export writes (the weights, and each tokenizer kind's files): --force replaces
# a folder that holds nothing else.
EXPORT_FILES = (CONFIG, WEIGHTS, *GPT2_FILES, *HF_FILES, CHARS)


def hf_weights(weights: dict[str, torch.Tensor], n_layer: int, vocab: int) -> dict[str, Any]:
    """Our GPT's state dict (nanoGPT names) as GPT2LMHeadModel's."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name == "lm_head.weight":
            continue  # tied to the token embedding, as in GPT-2
        tensor = tensor.detach().float().cpu()
        if name.endswith(CONV1D):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            tensor = tensor[:vocab]  # the rows padded to model.vocab_multiple_of
        out[name] = tensor.contiguous()
    for i in range(n_layer):
        for part in BIASED:
            weight = out[f"transformer.h.{i}.{part}.weight"]
            width = weight.shape[1] if part.endswith(("c_attn", "c_proj", "c_fc")) else len(weight)
            out.setdefault(f"transformer.h.{i}.{part}.bias", torch.zeros(width))
    out.setdefault("transformer.ln_f.bias", torch.zeros(len(out["transformer.ln_f.weight"])))
    return out


def hf_config(args: dict[str, Any], vocab: int, eot: int | None) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": args["block_size"],
        "n_ctx": args["block_size"],
        "n_embd": args["n_embd"],
        "n_layer": args["n_layer"],
        "n_head": args["n_head"],
        "activation_function": "gelu_new" if args["activation"] == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "bos_token_id": eot if eot is not None else 0,
        "eos_token_id": eot if eot is not None else 0,
        "torch_dtype": "float32",
    }


def export(ckpt: str, dirpath: Path, dataset_dir: Path, output: Path, force: bool) -> Path:
    """Write `output` (atomically: a temporary folder, then a rename); return it."""
    output = Path(output)
    check_output(output, force)  # before the model is read: a refusal costs nothing
    path, model, tokenizer, meta = load_model(ckpt, dirpath, dataset_dir)
    vocab = tokenizer.vocab_size
    files = tokenizer.export_files(model.config.block_size)
    keys = ("block_size", "n_embd", "n_layer", "n_head", "activation")
    args = {k: getattr(model.config, k) for k in keys}
    output.parent.mkdir(parents=True, exist_ok=True)
    work = temporary_name(output)
    work.mkdir()
    try:
        save_file(hf_weights(model.state_dict(), model.config.n_layer, vocab),
                  str(work / WEIGHTS), metadata={"format": "pt"})  # fmt: skip
        config = hf_config(args, vocab, meta.get("eot_token"))
        (work / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, content in files.items():
            (work / name).write_bytes(content)
        for child in work.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        check_output(output, force)  # again: the folder may have changed while we wrote
        if output.exists():
            aside = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(aside)
            shutil.rmtree(aside)
        work.rename(output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return path


def check_output(output: Path, force: bool) -> None:
    """Refuse an --output export may not write: a file, a link, or a folder holding anything
    but an earlier export's files (--force replaces those alone: pointed at a checkpoint
    folder, a dataset or a repository, it must not delete them)."""
    below = any(p.is_file() for p in output.parents)
    if output.is_symlink() or (output.exists() and not output.is_dir()) or below:
        what = "below a file" if below else "a symbolic link" if output.is_symlink() else "a file"
        raise ConfigError(
            f"export: --output {output} is {what}; give a new or empty folder (export never "
            "replaces a file or a link, not even with --force)"
        )
    entries = sorted(output.iterdir()) if output.is_dir() else []
    foreign = [
        p for p in entries if p.name not in EXPORT_FILES or p.is_symlink() or not p.is_file()
    ]
    if foreign:
        first = foreign[0].name + ("/" if foreign[0].is_dir() else "")
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ConfigError(
            f"export: --output {output} holds {first}{more}, which export did not write; "
            "--force replaces only a folder of an earlier export: give a new or empty folder"
        )
    if entries and not force:
        raise ConfigError(
            f"export: --output {output} holds an earlier export; pass --force to replace it "
            "or choose another --output"
        )
