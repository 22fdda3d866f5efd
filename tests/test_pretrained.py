"""`model.init_from` and `sample.ckpt` from pretrained GPT-2 weights: a tiny GPT-2 built and
saved with `transformers` (the reference implementation, random weights) gives the same
logits and the same greedy tokens once loaded here; its shape replaces the config's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ml_playground import cli
from ml_playground.configuration import load_config
from ml_playground.errors import CheckpointError
from ml_playground.module import GPTLightningModule, ModelConfig
from ml_playground.pretrained import build, with_source_shape

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TIKTOKEN_CACHE = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or SHARED / "tiktoken_cache")
HAS_GPT2 = (TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").is_file()


def tiny_gpt2(folder: Path, activation: str) -> GPT2LMHeadModel:
    """2 layers, width 32, GPT-2's vocabulary, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=50257,
                        activation_function=activation)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(("activation", "ours"), [("gelu_new", "gelu_tanh"), ("gelu", "gelu")])
def test_init_from_a_hugging_face_folder_matches_transformers(
    activation: str, ours: str, tmp_path: Path
) -> None:
    reference = tiny_gpt2(tmp_path / "hf", activation)
    cfg = load_config(flags=[("model.init_from", str(tmp_path / "hf")),
                             ("model.vocab_multiple_of", "64"), ("model.n_layer", "7"),
                             ("data.block_size", "16")])  # fmt: skip
    assert cfg.model.n_layer == 7  # parsing reads nothing from the source
    shape = ModelConfig(**with_source_shape(cfg.model_dump())["model"])  # as fit's command does
    assert (shape.n_layer, shape.n_head, shape.n_embd, shape.block_size) == (2, 4, 32, 16)
    assert shape.bias is True and shape.activation == ours  # the source's, not the config's
    module = GPTLightningModule(50257, 64, **shape.model_dump()).eval()
    module.load_init_from()  # as fit does when it starts
    assert module.model.config.vocab_size == 50304  # padded; the extra rows are never sampled
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = module.model(idx, idx)
        torch.testing.assert_close(logits[..., :50257], reference(idx).logits, rtol=0, atol=1e-5)
        prompt = idx[:, :4]
        theirs = reference.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        mine = module.model.generate(prompt, 10, temperature=0.0, vocab_limit=50257)
    assert torch.equal(mine, theirs)


def test_init_from_gpt2_on_a_char_dataset_is_one_line(
    prepared_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_gpt2(tmp_path / "hf", "gelu_new")
    capsys.readouterr()  # transformers' own progress bars
    code = cli.main(["fit", "--config", str(prepared_experiment),
                     "--model.init_from", str(tmp_path / "hf"), "--checkpointing.dirpath",
                     str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs")])  # fmt: skip
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and "has 50257 tokens but the dataset (meta.pkl) 50" in err[0], err
    assert not list((tmp_path / "ckpt").glob("ckpt_*"))


def test_a_hub_id_offline_without_a_cached_copy_is_one_line(
    tmp_path: Path, experiment_toml: Path, run_cli
) -> None:
    result = run_cli(
        "fit", "--config", experiment_toml, "--model.init_from", "gpt2", "--print_config",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}, check=False,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]


@pytest.mark.skipif(not HAS_GPT2, reason="GPT-2's BPE files are not in the tiktoken cache")
def test_fine_tune_and_sample_from_pretrained_weights(
    tmp_path: Path, make_experiment, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    tiny_gpt2(tmp_path / "hf", "gelu_new")
    config = make_experiment(tmp_path)
    data = ["--prepare.tokenizer", "tiktoken:gpt2", "--data.dataset_dir", str(tmp_path / "bpe"),
            "--data.block_size", "8"]  # fmt: skip
    assert cli.main(["prepare", "--config", str(config), *data]) == 0
    run = [*data, "--model.init_from", str(tmp_path / "hf"), "--model.vocab_multiple_of", "64"]
    assert cli.main(["fit", "--config", str(config), *run, "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2"]) == 0  # fmt: skip
    saved = (tmp_path / "logs" / "tiny" / "version_0" / "config.toml").read_text()
    assert "n_layer = 2" in saved and 'activation = "gelu_tanh"' in saved  # the shape used
    capsys.readouterr()
    assert cli.main(["sample", "--config", str(config), *data,
                     "--sample.ckpt", str(tmp_path / "hf"), "--sample.prompt", "the"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("-" * 40) == 2


@pytest.mark.skipif(not HAS_GPT2, reason="GPT-2's BPE files are not in the tiktoken cache")
def test_round_trip_folder_fit_at_learning_rate_zero_export(
    tmp_path: Path, make_experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hugging Face folder -> init_from -> fit (learning rate 0) -> export: the same tensors."""
    from safetensors.torch import load_file

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    tiny_gpt2(tmp_path / "hf", "gelu_new")
    config = make_experiment(tmp_path)
    run = ["--prepare.tokenizer", "tiktoken:gpt2", "--data.dataset_dir", str(tmp_path / "bpe"),
           "--data.block_size", "8", "--model.init_from", str(tmp_path / "hf"),
           "--model.vocab_multiple_of", "64", "--model.learning_rate", "0", "--model.min_lr", "0"]  # fmt: skip
    assert cli.main(["prepare", "--config", str(config), *run]) == 0
    assert cli.main(["fit", "--config", str(config), *run, "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2"]) == 0  # fmt: skip
    assert cli.main(["export", "--config", str(config), *run, "--ckpt_path", "last",
                     "--output", str(tmp_path / "back")]) == 0  # fmt: skip
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert before.keys() - {"lm_head.weight"} == after.keys() - {"lm_head.weight"}
    for name in after:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)

    # Resuming and validating take the checkpoint's weights: the source's are never read.
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert cli.main(["fit", "--config", str(config), *run, "--ckpt_path", "last",
                     "--trainer.max_steps", "3", "--trainer.val_check_interval", "1"]) == 0  # fmt: skip
    assert cli.main(["validate", "--config", str(config), *run, "--ckpt_path", "last"]) == 0


def test_a_nanogpt_checkpoint_can_be_fine_tuned(prepared_experiment: Path, tmp_path: Path) -> None:
    """nanoGPT's ckpt.pt (keys model, model_args, iter_num, config) as init_from."""
    from ml_playground.model.gpt import GPT, GPTConfig

    args = dict(n_layer=3, n_head=2, n_embd=24, block_size=16, bias=True, vocab_size=50,
                dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))  # type: ignore[arg-type]
    nanogpt = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
               "model_args": args, "iter_num": 5000, "config": {}}  # fmt: skip
    torch.save(nanogpt, tmp_path / "ckpt.pt")
    ckpt = tmp_path / "ckpt"
    code = cli.main(["fit", "--config", str(prepared_experiment), "--model.init_from",
                     str(tmp_path / "ckpt.pt"), "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--checkpointing.dirpath", str(ckpt),
                     "--log_dir", str(tmp_path / "logs")])  # fmt: skip
    assert code == 0
    first = torch.load(ckpt / "ckpt_last_00000000.pt", weights_only=True)  # before any step
    assert first["ml_playground"]["model_args"]["n_layer"] == 3  # the source's shape
    for name, value in model.state_dict().items():
        torch.testing.assert_close(first["state_dict"][f"model.{name}"], value, rtol=0, atol=0)
    assert first["global_step"] == 0  # fresh counters, not nanoGPT's iter_num


def test_commands_that_build_no_model_from_it_do_not_fetch_the_source(
    prepared_experiment: Path, tmp_path: Path
) -> None:
    """`prepare` with `init_from = "gpt2"` needs no hub (nor the weights)."""
    code = cli.main(["prepare", "--config", str(prepared_experiment), "--model.init_from",
                     "no-such-owner/no-such-model", "--data.dataset_dir", str(tmp_path / "d")])  # fmt: skip
    assert code == 0 and (tmp_path / "d" / "meta.pkl").is_file()


def edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(hf: Path) -> None:
        config = json.loads((hf / "config.json").read_text()) | changes
        config = {key: value for key, value in config.items() if value is not None}
        (hf / "config.json").write_text(json.dumps(config))

    return edit


def truncate(hf: Path) -> None:
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])


BROKEN_FOLDERS = {  # what breaks the folder, what the one line says
    "n_embd_edited": (edit_config(n_embd=64), "model.safetensors holds transformer.wte.weight "
                      r"of shape \(50257, 32\), but .*config.json \(.*n_embd 64.*\) calls for"),
    "fewer_layers": (edit_config(n_layer=1), r"holds transformer.h.1.attn.c_attn.bias, which "
                     r".*config.json \(n_layer 1.*\) has no place for"),
    "more_layers": (edit_config(n_layer=3), "has no transformer.h.2.ln_1.weight"),
    "n_positions_edited": (edit_config(n_positions=32), r"wpe.weight of shape \(16, 32\)"),
    "key_missing": (edit_config(vocab_size=None), "config.json: vocab_size is missing"),
    "key_not_a_number": (edit_config(n_layer="2"), "config.json: n_layer is '2', not a positive"),
    "heads_do_not_divide": (edit_config(n_head=5), r"n_embd \(32\) is not a multiple of n_head"),
    "not_json": (lambda hf: (hf / "config.json").write_text("{"), "config.json: not valid JSON"),
    "json_list": (lambda hf: (hf / "config.json").write_text("[]"), "holds a JSON list"),
    "truncated": (truncate, "model.safetensors: not readable .*truncated"),
    "no_weights": (lambda hf: (hf / "model.safetensors").unlink(), "safetensors: not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_a_broken_hugging_face_folder_is_a_checkpoint_error(case: str, tmp_path: Path) -> None:
    """Its config.json edited, damaged or at odds with model.safetensors: refused, naming the
    file, before a weight is copied (a traceback or, worse, weights loaded half before)."""
    edit, message = BROKEN_FOLDERS[case]
    tiny_gpt2(tmp_path / "hf", "gelu_new")
    edit(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=message):
        build(str(tmp_path / "hf"))


def nanogpt_checkpoint(path: Path, **changes: object) -> dict[str, torch.Tensor]:
    """A nanoGPT ckpt.pt (old, non-flash layout: causal-mask buffers among the weights) of a
    GPT whose model_args are then changed by `changes`; its weights."""
    from ml_playground.model.gpt import GPT, GPTConfig

    args = dict(n_layer=2, n_head=2, n_embd=24, block_size=16, bias=True, vocab_size=50,
                dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    weights = GPT(GPTConfig(**args)).state_dict()  # type: ignore[arg-type]
    masks = {f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 16, 16) for i in range(2)}
    args = {key: value for key, value in (args | changes).items() if value is not None}
    torch.save({"model": weights | masks, "model_args": args, "iter_num": 1, "config": {}}, path)
    return weights


def test_a_nanogpt_checkpoint_with_mask_buffers_loads(tmp_path: Path) -> None:
    weights = nanogpt_checkpoint(tmp_path / "ckpt.pt")
    model = build(str(tmp_path / "ckpt.pt"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_embd": 48}, r"ckpt.pt holds transformer.wte.weight of shape \(50, 24\), but its "
                         r"model_args \(.*n_embd 48.*\) calls for \(50, 48\)"),
        ({"n_layer": 1}, "holds transformer.h.1.attn.c_attn.bias, which its model_args"),
        ({"vocab_size": None}, "ckpt.pt: model_args: vocab_size is missing"),
        ({"bias": "yes"}, "ckpt.pt: model_args: bias is 'yes'"),
    ],
)  # fmt: skip
def test_a_nanogpt_checkpoint_at_odds_with_its_model_args_is_refused(
    changes: dict[str, object], message: str, tmp_path: Path
) -> None:
    nanogpt_checkpoint(tmp_path / "ckpt.pt", **changes)
    with pytest.raises(CheckpointError, match=message):
        build(str(tmp_path / "ckpt.pt"))
