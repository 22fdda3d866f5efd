"""A nanoGPT data folder trains as it is, through the real CLI: its three-key meta.pkl
(shakespeare_char), or no meta.pkl at all (GPT-2 BPE, as data/shakespeare and openwebtext)."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TIKTOKEN_CACHE = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or SHARED / "tiktoken_cache")
HAS_GPT2 = (TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").is_file()
FEW_STEPS = ("--trainer.max_steps", "4", "--trainer.val_check_interval", "4")
SEPARATOR = "-" * 40


def nanogpt_char_folder(folder: Path, text: str) -> None:
    """What nanoGPT's data/shakespeare_char/prepare.py writes."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    cut = int(len(text) * 0.9)
    folder.mkdir()
    np.array([stoi[c] for c in text[:cut]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[cut:]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)


def nanogpt_gpt2_folder(folder: Path, text: str) -> None:
    """What nanoGPT's data/shakespeare/prepare.py writes: GPT-2 ids, uint16, no meta.pkl."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    cut = int(len(text) * 0.9)
    folder.mkdir()
    np.array(enc.encode_ordinary(text[:cut]), dtype=np.uint16).tofile(folder / "train.bin")
    np.array(enc.encode_ordinary(text[cut:]), dtype=np.uint16).tofile(folder / "val.bin")


@pytest.mark.skipif(not HAS_GPT2, reason=f"no tiktoken gpt2 files in {TIKTOKEN_CACHE}")
def test_nanogpt_folders_train_as_they_are(
    tmp_path: Path,
    experiment_toml: Path,
    corpus_text: str,
    run_cli: Callable[..., subprocess.CompletedProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    text = corpus_text * 4  # enough GPT-2 tokens for a few validation windows
    nanogpt_char_folder(tmp_path / "char", text)
    nanogpt_gpt2_folder(tmp_path / "gpt2", text)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "gpt2").iterdir())}
    env = {"TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE)}

    def loop(name: str, *extra: str) -> subprocess.CompletedProcess:
        return run_cli(
            "loop",
            "--config",
            experiment_toml,
            "--experiment",
            name,
            "--data.dataset_dir",
            tmp_path / name,
            "--checkpointing.dirpath",
            tmp_path / f"ckpt_{name}",
            *FEW_STEPS,
            *extra,
            env=env,
        )

    with ThreadPoolExecutor(2) as pool:
        char_run = pool.submit(loop, "char")
        # A data folder without meta.pkl is GPT-2 BPE; a config that says char would not match.
        gpt2_run = pool.submit(loop, "gpt2", "--prepare.tokenizer", "tiktoken:gpt2")
        char, gpt2 = char_run.result(), gpt2_run.result()

    for result, name in ((char, "char"), (gpt2, "gpt2")):
        assert "already prepared; skipped" in result.stdout
        assert list((tmp_path / f"ckpt_{name}").glob("ckpt_last_00000004.pt")), result.stdout
        # sample printed sample.num_samples = 2 texts, each starting with the prompt "the "
        assert result.stdout.endswith(SEPARATOR + "\n"), result.stdout
        assert len(re.findall(r"(?m)^the ", result.stdout)) >= 2, result.stdout
    # Nothing was written into the nanoGPT folder: no meta.pkl appeared, the bins are untouched.
    assert {p: p.read_bytes() for p in sorted((tmp_path / "gpt2").iterdir())} == before
