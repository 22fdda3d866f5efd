"""`ml-playground export` writes a Hugging Face GPT-2 folder that `transformers` (the reference
implementation, a development dependency) reads as it is: same logits, and for GPT-2 BPE runs a
working `pipeline("text-generation")`. In-process through `cli.main`."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from ml_playground import cli
from ml_playground.checkpoint_reading import find_checkpoint, load_checkpoint
from ml_playground.errors import ConfigError
from ml_playground.export import EXPORT_FILES, check_output
from ml_playground.sampling import model_from_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TIKTOKEN_CACHE = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or SHARED / "tiktoken_cache")
HAS_GPT2 = (TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").is_file()


def fit(config: Path, folder: Path, *flags: str) -> Path:
    """A 3-step fit into `folder`; its checkpoint folder."""
    ckpt = folder / "ckpt"
    code = cli.main(["fit", "--config", str(config), "--trainer.max_steps", "3",
                     "--trainer.val_check_interval", "3", "--checkpointing.dirpath", str(ckpt),
                     "--log_dir", str(folder / "logs"), *flags])  # fmt: skip
    assert code == 0
    return ckpt


def same_logits(ckpt: Path, exported: Path, vocab: int) -> None:
    path = find_checkpoint(ckpt, "last")
    ours = model_from_checkpoint(path, load_checkpoint(path)).eval()
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    idx = torch.randint(
        0, vocab, (2, ours.config.block_size), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits, _ = ours(idx, idx)
        torch.testing.assert_close(theirs(idx).logits, logits[..., :vocab], rtol=0, atol=1e-5)


def test_char_run_exports_weights_config_and_its_characters(
    prepared_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = fit(prepared_experiment, tmp_path, "--model.vocab_multiple_of", "64")
    out = tmp_path / "hf"
    code = cli.main(["export", "--config", str(prepared_experiment), "--ckpt_path", "last",
                     "--checkpointing.dirpath", str(ckpt), "--output", str(out)])  # fmt: skip
    assert code == 0 and f"to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "char_vocab.json",
        "config.json",
        "model.safetensors",
    ]
    chars = json.loads((out / "char_vocab.json").read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(chars) == 50  # the padding rows are dropped
    same_logits(ckpt, out, len(chars))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written atomically


def test_force_replaces_an_earlier_export_and_nothing_else(
    prepared_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = fit(prepared_experiment, tmp_path)
    out = tmp_path / "hf"
    argv = ["export", "--config", str(prepared_experiment), "--ckpt_path", "last",
            "--checkpointing.dirpath", str(ckpt), "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert {p.name for p in out.iterdir()} <= set(EXPORT_FILES)  # the list --force trusts
    earlier = (out / "model.safetensors").stat().st_ino
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "holds an earlier export; pass --force to replace it" in capsys.readouterr().err
    assert cli.main([*argv, "--force"]) == 0
    assert (out / "model.safetensors").stat().st_ino != earlier  # replaced
    (out / "keep.txt").write_text("mine")
    for flags in ([], ["--force"]):
        capsys.readouterr()
        assert cli.main([*argv, *flags]) == 2
        assert "holds keep.txt, which export did not write" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("layout", "named"),
    [
        ({"ckpt_last_00000005.pt": "x", "config.json": "{}"}, "holds ckpt_last_00000005.pt,"),
        ({".git/HEAD": "ref"}, "holds .git/,"),
        ({"model.safetensors/x": "a folder of that name"}, "holds model.safetensors/,"),
        ({"a.txt": "", "b.txt": "", "c.txt": ""}, "holds a.txt (and 2 more),"),
    ],
)
def test_force_refuses_a_folder_an_export_did_not_write(
    layout: dict[str, str], named: str, tmp_path: Path
) -> None:
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(named)):
        check_output(tmp_path, force=True)


def test_a_file_a_link_or_a_path_below_a_file_is_never_an_output(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "hf").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "hf")
    cases = {"notes.txt": "is a file", "link": "is a symbolic link", "notes.txt/hf": "below a file"}
    for name, what in cases.items():
        with pytest.raises(ConfigError, match=what):
            check_output(tmp_path / name, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    check_output(tmp_path / "hf", force=False)  # an empty folder, or a new one, is fine
    check_output(tmp_path / "new", force=False)


@pytest.mark.skipif(not HAS_GPT2, reason="GPT-2's BPE files are not in the tiktoken cache")
def test_gpt2_bpe_run_exports_a_folder_pipeline_reads(
    tmp_path: Path, make_experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    config = make_experiment(tmp_path)
    flags = ["--prepare.tokenizer", "tiktoken:gpt2", "--data.dataset_dir", str(tmp_path / "bpe")]
    assert cli.main(["prepare", "--config", str(config), *flags]) == 0
    ckpt = fit(config, tmp_path, *flags, "--data.block_size", "8", "--model.block_size", "8")
    out = tmp_path / "hf"
    assert cli.main(["export", "--config", str(config), *flags, "--ckpt_path", "last",
                     "--checkpointing.dirpath", str(ckpt), "--output", str(out)]) == 0  # fmt: skip
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    assert {p.name for p in out.iterdir()} <= set(EXPORT_FILES)  # the list --force trusts
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 8
    same_logits(ckpt, out, 50257)
    generate = pipeline("text-generation", model=str(out))
    text = generate("the king", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the king") and len(text) > len("the king")


def test_a_bpe_trained_here_travels_to_transformers(
    tmp_path: Path, make_experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bpe:512` on tinyshakespeare (the test corpus when ../shared is absent) -> fit -> sample
    -> export: AutoTokenizer decodes val.bin back to the corpus text, and greedy generation in
    transformers equals our greedy `sample`, with the dataset folder gone."""
    from transformers import AutoTokenizer

    from ml_playground.prepare import load_tokens, read_meta

    corpus = SHARED / "tinyshakespeare" / "input.txt"
    config = make_experiment(tmp_path)
    data = tmp_path / "bpe"
    vocab = 512 if corpus.is_file() else 300  # the small test corpus has text for 384 tokens
    flags = ["--prepare.tokenizer", f"bpe:{vocab}", "--data.dataset_dir", str(data)]
    if corpus.is_file():
        flags += ["--prepare.source", str(corpus)]
    assert cli.main(["prepare", "--config", str(config), *flags]) == 0
    meta = read_meta(data / "meta.pkl")
    assert meta["tokenizer"] == "hf" and meta["spec"] == f"bpe:{vocab}"
    assert meta["vocab_size"] == vocab
    ckpt = fit(config, tmp_path, *flags, "--data.block_size", "8", "--model.block_size", "32")
    out = tmp_path / "hf"
    assert cli.main(["export", "--config", str(config), *flags, "--ckpt_path", "last",
                     "--checkpointing.dirpath", str(ckpt), "--output", str(out)]) == 0  # fmt: skip
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    text = corpus.read_text(encoding="utf-8") if corpus.is_file() else None
    theirs = AutoTokenizer.from_pretrained(str(out))
    val = load_tokens(data / "val.bin", meta["dtype"]).tolist()
    if text is not None:  # contiguous split: val.bin is the corpus's last 10%
        assert theirs.decode(val) == text[int(len(text) * 0.9) :]
    shutil.rmtree(data)  # sample and export need the checkpoint alone
    capsys.readouterr()
    prompt = "ROMEO:"
    assert cli.main(["sample", "--config", str(config), *flags, "--sample.ckpt", "last",
                     "--checkpointing.dirpath", str(ckpt), "--sample.prompt", prompt,
                     "--sample.temperature", "0", "--sample.num_samples", "1",
                     "--sample.max_new_tokens", "12"]) == 0  # fmt: skip
    ours = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")[0]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = theirs(prompt, return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert theirs.decode(greedy[0]) == ours
