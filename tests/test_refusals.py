"""Failures a real user meets, in-process through `cli.main` (fast): settings Lightning or
torch would trip over late, refused before any work (one line, the documented exit code,
nothing written); sampling from NaN weights or with a tiny temperature; `sample.output`;
a fit that died in its first step. tests/e2e run one case of each class through the console
script."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from ml_playground import cli

CASES = {
    "gpu_without_one": (["--trainer.accelerator", "gpu"], "No supported gpu backend"),
    "unknown_strategy": (["--trainer.strategy", "nonsense"], "strategy='nonsense'"),
    "zero_devices": (["--trainer.devices", "0"], "devices='0'"),
    "negative_devices": (["--trainer.devices", "-3"], "devices"),
    "fractional_devices": (["--trainer.devices", "1.5"], "devices"),
    "zero_nodes": (["--trainer.num_nodes", "0"], "num_nodes"),
    "zero_val_check_interval": (["--trainer.val_check_interval", "0"], "val_check_interval = 0"),
    "fractional_val_check": (["--trainer.val_check_interval", "0.5"], "val_check_interval"),
    "zero_accumulation": (["--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches"),
    "metric_never_logged": (["--checkpointing.metric", "val/acc"], "'val/acc' is never logged"),
    "metric_never_logged_with_patience": (
        ["--checkpointing.metric", "val/acc", "--checkpointing.patience", "2"],
        "'val/acc' is never logged",
    ),
    "train_loss_between_log_steps": (
        ["--checkpointing.metric", "train/loss", "--trainer.log_every_n_steps", "3"],
        "trainer.log_every_n_steps",
    ),
    "seed_too_large": (["--seed_everything", "99999999999"], "seed_everything"),
    "negative_seed": (["--seed_everything", "-1"], "seed_everything"),
    "sample_seed_negative": (["--sample.seed", "-1"], "sample.seed"),
    "infinite_learning_rate": (["--model.learning_rate", "inf"], "model.learning_rate"),
    "nan_dropout": (["--model.dropout", "nan"], "model.dropout"),
    "max_steps_zero": (["--trainer.max_steps", "0"], "fit would train nothing: trainer.max_steps"),
    "no_train_batches": (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches"),
    "astronomical_n_layer": (["--model.n_layer", "1000000000"], "lower model.n_layer"),
    "huge_n_embd": (["--model.n_embd", "1000000", "--model.n_head", "1"], "model.n_embd"),
}


@pytest.fixture(scope="module")
def experiment(prepared_experiment: Path) -> Path:
    return prepared_experiment


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_before_any_work(
    name: str, experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, named = CASES[name]
    run = tmp_path / "run"
    code = cli.main(["fit", "--config", str(experiment), *flags,
                     "--checkpointing.dirpath", str(run / "ckpt"), "--log_dir", str(run / "logs")])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ml-playground: error: "), err
    assert named in lines[0], err
    assert not run.exists()  # nothing written: a corrected rerun starts clean


# --------------------------------------------------------------------------- after a short fit


@pytest.fixture(scope="module")
def trained(experiment: Path, tmp_path_factory) -> Path:
    """A 4-step fit with keep.best 0 (no best file): its checkpoint folder."""
    folder = tmp_path_factory.mktemp("refusals_fit")
    ckpt = folder / "ckpt"
    code = cli.main(["fit", "--config", str(experiment), "--trainer.max_steps", "4",
                     "--checkpointing.keep.best", "0", "--checkpointing.dirpath", str(ckpt),
                     "--log_dir", str(folder / "logs")])  # fmt: skip
    assert code == 0
    return ckpt


def sample(experiment: Path, ckpt: Path, *flags: str) -> list[str]:
    return ["sample", "--config", str(experiment), "--checkpointing.dirpath", str(ckpt), *flags]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("ml-playground: error: "), lines
    return lines[0]


def test_sample_without_a_best_file_uses_last_and_says_so(
    experiment: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(sample(experiment, trained)) == 0
    err = capsys.readouterr().err
    assert (
        "holds no ckpt_best_*" in err
        and f"sampling from {trained / 'ckpt_last_00000004.pt'}" in err
    )


def test_sample_output_a_folder_or_below_a_file_is_refused_before_sampling(
    experiment: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep me")
    for output, what in (("folder", "is a folder"), ("file/x.txt", "is below a file")):
        assert cli.main(sample(experiment, trained, "--sample.output", str(tmp_path / output))) == 2
        assert what in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # nothing left
    assert (tmp_path / "file").read_text() == "keep me" and not any((tmp_path / "folder").iterdir())


def test_sample_output_replaces_experiment(experiment: Path, trained: Path, tmp_path: Path) -> None:
    output = tmp_path / "{experiment}" / "samples.txt"
    assert cli.main(sample(experiment, trained, "--sample.output", str(output))) == 0
    assert (tmp_path / "tiny" / "samples.txt").read_text().count("-" * 40) == 2


def test_nan_weights_are_refused_by_sample(
    experiment: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = torch.load(trained / "ckpt_last_00000004.pt", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.endswith("wte.weight"))
    checkpoint["state_dict"][name][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pt")
    assert cli.main(sample(experiment, trained, "--sample.ckpt", str(tmp_path / "nan.pt"))) == 1
    assert "the weights hold NaN or inf" in one_line(capsys)


def test_a_tiny_temperature_is_greedy_not_nan(
    experiment: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = []
    for temperature in ("1e-38", "0"):
        assert cli.main(sample(experiment, trained, "--sample.temperature", temperature)) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_a_step_zero_checkpoint_alone_does_not_block_a_fresh_fit(
    experiment: Path, tmp_path: Path
) -> None:
    """What a fit that failed in its first step leaves behind: only the untrained `last`."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "ckpt_last_00000000.pt").write_bytes(b"left by a failed first step")
    code = cli.main(["fit", "--config", str(experiment), "--trainer.max_steps", "2",
                     "--checkpointing.dirpath", str(ckpt), "--log_dir", str(tmp_path / "logs")])  # fmt: skip
    assert code == 0
    assert torch.load(ckpt / "ckpt_last_00000000.pt", weights_only=True)["global_step"] == 0


# --------------------------------------------------------------------------- untrusted files


def saved_variant(ckpt: Path, folder: Path, name: str, change) -> Path:
    """A copy of the fit's last checkpoint with `change(checkpoint)` applied."""
    checkpoint = torch.load(ckpt / "ckpt_last_00000004.pt", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, folder / name)
    return folder / name


def test_a_checkpoint_that_expands_past_its_size_is_refused_unread(
    experiment: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * 50_000_000)
    assert bomb.stat().st_size < 200_000
    assert cli.main(sample(experiment, trained, "--sample.ckpt", str(bomb))) == 1
    assert "refusing to load: its contents claim 50,000,000 bytes" in one_line(capsys)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda c: c["ml_playground"].update(meta=[1, 2]), "meta is not a table"),
        (lambda c: c["ml_playground"]["meta"]["itos"].update({0: 5}), "entries text"),
    ],
    ids=["meta_not_a_table", "itos_not_text"],
)
def test_wrong_types_inside_a_checkpoint_are_one_line(
    change, named: str, experiment: Path, trained: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = saved_variant(trained, tmp_path, "odd.pt", change)
    assert cli.main(sample(experiment, trained, "--sample.ckpt", str(path))) == 1
    assert named in one_line(capsys)


def test_a_nanogpt_checkpoint_of_another_vocabulary_is_refused(
    experiment: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ml_playground.model.gpt import GPT, GPTConfig

    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False, vocab_size=50304,
                dropout=0.0)  # fmt: skip
    model = GPT(GPTConfig(**args))  # type: ignore[arg-type]
    nanogpt = {"model": model.state_dict(), "model_args": args, "iter_num": 1, "config": {}}
    torch.save(nanogpt, tmp_path / "ckpt.pt")
    assert cli.main(sample(experiment, trained, "--sample.ckpt", str(tmp_path / "ckpt.pt"))) == 1
    assert "the model has 50304 tokens but the tokenizer 50" in one_line(capsys)


def data_copy(experiment: Path, folder: Path, change) -> Path:
    """The experiment's dataset copied into `folder`, with `change(meta)` written to meta.pkl."""
    shutil.copytree(experiment.parent / "data", folder)
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    change(meta)
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return folder


def test_resume_on_another_corpus_of_the_same_vocabulary_size_is_refused(
    experiment: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def shuffle(meta: dict) -> None:
        chars = [meta["itos"][i] for i in range(meta["vocab_size"])][::-1]
        meta["itos"], meta["stoi"] = dict(enumerate(chars)), {c: i for i, c in enumerate(chars)}

    data = data_copy(experiment, tmp_path / "other", shuffle)
    before = sorted(p.name for p in trained.iterdir())
    code = cli.main(["fit", "--config", str(experiment), "--data.dataset_dir", str(data),
                     "--checkpointing.dirpath", str(trained), "--ckpt_path", "last",
                     "--trainer.max_steps", "6", "--log_dir", str(tmp_path / "logs")])  # fmt: skip
    assert code == 1
    assert "the checkpoint's tokenizer is not this dataset's" in one_line(capsys)
    assert sorted(p.name for p in trained.iterdir()) == before


def test_init_from_a_checkpoint_of_another_tokenizer_of_the_same_size_is_refused(
    experiment: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Our checkpoints carry their tokenizer: fine-tuning one on data whose token ids mean
    other characters (as many of them) is refused before anything is written."""

    def shuffle(meta: dict) -> None:
        chars = [meta["itos"][i] for i in range(meta["vocab_size"])][::-1]
        meta["itos"], meta["stoi"] = dict(enumerate(chars)), {c: i for i, c in enumerate(chars)}

    data = data_copy(experiment, tmp_path / "other", shuffle)
    source = sorted(trained.glob("ckpt_last_*.pt"))[-1]
    flags = ["--config", str(experiment), "--model.init_from", str(source),
             "--checkpointing.dirpath", str(tmp_path / "ckpt"), "--trainer.max_steps", "2",
             "--log_dir", str(tmp_path / "logs")]  # fmt: skip
    assert cli.main(["fit", *flags, "--data.dataset_dir", str(data)]) == 1
    line = one_line(capsys)
    assert f"{source}: the checkpoint's tokenizer is not this dataset's" in line
    assert "prepare the data with the tokenizer the checkpoint was trained with" in line
    assert not (tmp_path / "ckpt").exists()
    assert cli.main(["fit", *flags]) == 0  # its own dataset: fine-tunes


def test_fit_refuses_a_meta_pkl_at_odds_with_its_own_table(
    experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = data_copy(experiment, tmp_path / "odd", lambda meta: meta.update(vocab_size=60))
    code = cli.main(["fit", "--config", str(experiment), "--data.dataset_dir", str(data),
                     "--checkpointing.dirpath", str(tmp_path / "ckpt")])  # fmt: skip
    assert code == 1
    assert "meta.pkl says vocab_size 60" in one_line(capsys)
    assert not (tmp_path / "ckpt").exists()


def test_prepare_over_another_source_says_so(
    experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.txt"
    other.write_text((experiment.parent / "corpus.txt").read_text() * 2)
    data = experiment.parent / "data"
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    for flag, value in (("--prepare.source", str(other)), ("--prepare.val_fraction", "0.2")):
        assert cli.main(["prepare", "--config", str(experiment), flag, value]) == 1
        assert "holds artifacts prepared with" in one_line(capsys)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


# --------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["fit", "--data.batch_size", "1000000000000"], "data.batch_size"),
        (["fit", "--data.val_batches", "1000000000"], "data.val_batches"),
        (["sample", "--sample.num_samples", "1000000000"], "sample.num_samples"),
    ],
    ids=["batch_size", "val_batches", "num_samples"],
)
def test_an_allocation_that_cannot_succeed_is_one_line(
    flags: list[str], named: str, experiment: Path, trained: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    folder = trained if flags[0] == "sample" else tmp_path / "ckpt"
    code = cli.main([flags[0], "--config", str(experiment), *flags[1:],
                     "--checkpointing.dirpath", str(folder), "--log_dir", str(tmp_path / "logs")])  # fmt: skip
    assert code == 1
    line = one_line(capsys)
    assert "out of memory" in line and named in line
    assert not list((tmp_path / "ckpt").glob("ckpt_*"))  # no checkpoint blocks a rerun


def test_runs_started_together_get_their_own_log_folder(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ml_playground.tensorboard_logging import StepAlignedLogger

    def version(_: int) -> int:
        return StepAlignedLogger(save_dir=str(tmp_path), name="tiny").version

    with ThreadPoolExecutor(8) as pool:
        versions = sorted(pool.map(version, range(8)))
    assert versions == list(range(8))
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        f"version_{v}" for v in range(8)
    ]
