"""`evaluate` and fit's `evaluate.every_n_steps`: HellaSwag scored as build-nanogpt scores it.

The examples are made from the tiny corpus in HellaSwag's format: a line's first half is the
context, its second half the right ending among three other lines' second halves; some
contexts span three lines, longer than the model's window.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from e2e.harness import QUIET, Cli, Result, Trained, assert_one_error_line, scalars
from e2e.test_distributed import two_ranks
from ml_playground.evaluation import ending_losses, read_examples, render
from ml_playground.sampling import load_model

SUMMARY = re.compile(r"^hellaswag: acc=(\d\.\d{4}) acc_norm=(\d\.\d{4}) \((\d+) examples\)$", re.M)


def write_hellaswag(path: Path, text: str, count: int = 40, seed: int = 0) -> list[dict]:
    """`count` HellaSwag-format examples from the corpus `text` (see the module docstring)."""
    rng = random.Random(seed)
    lines = [line for line in text.splitlines() if line.count(" ") >= 3]

    def halves(line: str) -> tuple[str, str]:
        words = line.split(" ")
        return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])

    examples = []
    for n in range(count):
        context, right = halves(lines[n])
        if n % 5 == 4:  # longer than a 64-token window with its ending
            context = f"{lines[n - 2]} {lines[n - 1]} {context}"
        others = [halves(line)[1] for line in rng.sample(lines[count:], 3 if n % 7 else 2)]
        label = rng.randrange(len(others) + 1)
        endings = [*others[:label], right, *others[label:]]
        examples.append({"ind": n, "ctx": context, "endings": endings, "label": label})
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return examples


def summary(result: Result) -> tuple[float, float, int]:
    found = SUMMARY.search(result.stdout)
    assert found, result.stdout + result.stderr
    return float(found[1]), float(found[2]), int(found[3])


# --------------------------------------------------------------------------- a fit that scores


@dataclass
class Scored:
    """A 10-step fit from the trained run's data with HellaSwag every 5 steps, logged to
    TensorBoard and a CSVLogger; its model has a 64-token window and a vocabulary padded to 64
    rows (the data's 50 tokens + 14 the tokenizer never produces)."""

    folder: Path
    hellaswag: Path
    examples: list[dict]
    fit: Result

    @property
    def checkpoint(self) -> Path:
        return self.folder / "ckpt" / "ckpt_last_00000010.pt"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, trained: Trained, corpus_text: str, cli: Cli) -> Scored:
    folder = tmp_path_factory.mktemp("scored")
    hellaswag = folder / "hellaswag.jsonl"
    examples = write_hellaswag(hellaswag, corpus_text)
    loggers = folder / "loggers.toml"
    loggers.write_text(
        '[[trainer.logger]]\nclass_path = "CSVLogger"\ninit_args = { save_dir = "csv" }\n'
        '[[trainer.logger]]\nclass_path = "ml_playground.tensorboard_logging.StepAlignedLogger"\n'
        'init_args = { save_dir = "tb", name = "tiny" }\n',
        encoding="utf-8",
    )
    fit = cli(
        "fit", *trained.fit_flags(folder), "--config", loggers,
        "--model.block_size", "64", "--model.vocab_multiple_of", "64",
        "--trainer.max_steps", "10", "--trainer.val_check_interval", "10",
        "--evaluate.every_n_steps", "5", "--evaluate.hellaswag", hellaswag, cwd=folder,
    )  # fmt: skip
    return Scored(folder, hellaswag, examples, fit)


def test_fit_logs_hellaswag_to_every_logger_and_the_console(scored: Scored) -> None:
    lines = [line for line in scored.fit.stdout.splitlines() if line.startswith("step ")]
    number = r"\d\.\d{4}"
    assert re.fullmatch(rf"step 5: hellaswag/acc {number} hellaswag/acc_norm {number}", lines[0])
    assert re.fullmatch(  # with the validation of the same step
        rf"step 10: train/loss {number} val/loss {number} hellaswag/acc {number} "
        rf"hellaswag/acc_norm {number} \(\d+\.\d ms/step\)",
        lines[1],
    ), lines
    board = scalars(scored.folder / "tb" / "tiny" / "version_0")
    assert [step for step, _ in board["hellaswag/acc_norm"]] == [5, 10]
    assert [step for step, _ in board["hellaswag/acc"]] == [5, 10]
    assert [step for step, _ in board["val/loss"]] == [10]  # the steps of checkpoint names
    with open(scored.folder / "csv" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(row["step"], row["hellaswag/acc_norm"]) for row in rows if row["hellaswag/acc_norm"]]
    # Lightning's numbering, one below (as its val/loss): each logger shows both at one step.
    assert [step for step, _ in logged] == ["4", "9"]
    assert [row["step"] for row in rows if row["val/loss"]] == ["9"]
    acc_norm = float(lines[1].split("hellaswag/acc_norm ")[1].split()[0])
    assert board["hellaswag/acc_norm"][1][1] == pytest.approx(acc_norm, abs=5e-5)
    assert float(logged[1][1]) == pytest.approx(acc_norm, abs=5e-5)


@torch.no_grad()
def build_nanogpt_on_transformers(folder: Path, examples: list[dict]) -> list[list[float]]:
    """build-nanogpt's hellaswag.py, written afresh against the exported folder: transformers'
    GPT2LMHeadModel and the char table export wrote; each example's rows padded to its
    longest and cut to the model's last n_positions tokens, the loss summed over the ending's
    tokens (mask shifted by one). Returns each ending's summed loss, then its mean."""
    from transformers import GPT2LMHeadModel

    chars = json.loads((folder / "char_vocab.json").read_text(encoding="utf-8"))
    stoi = {ch: i for i, ch in enumerate(chars)}
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    window = model.config.n_positions
    out = []
    for example in examples:
        context = [stoi[ch] for ch in example["ctx"]]
        rows, masks = [], []
        for ending in example["endings"]:
            tokens = [stoi[ch] for ch in " " + ending]
            rows.append((context + tokens)[-window:])
            masks.append(([0] * len(context) + [1] * len(tokens))[-window:])
        width = max(map(len, rows))
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        for r, (row, m) in enumerate(zip(rows, masks, strict=True)):
            idx[r, : len(row)], mask[r, : len(m)] = torch.tensor(row), torch.tensor(m)
        logits = model(idx).logits
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none"
        )
        losses = losses.view(len(rows), -1) * mask[:, 1:]
        sums = losses.sum(dim=1)
        out.append([*sums.tolist(), *(sums / mask[:, 1:].sum(dim=1)).tolist()])
    return out


def test_evaluate_equals_build_nanogpts_algorithm_on_the_exported_folder(
    scored: Scored, trained: Trained, cli: Cli
) -> None:
    """The same model two ways: `evaluate` on the checkpoint, and an independent
    implementation through transformers on `export`'s folder (which has no padded rows)."""
    folder, ckpt = scored.folder, scored.checkpoint
    output = folder / "figures" / "hellaswag.json"
    config, data = trained.config, trained.data
    common = ("--config", config, "--data.dataset_dir", data, "--evaluate.hellaswag",
              scored.hellaswag, "--ckpt_path", ckpt)  # fmt: skip
    result = cli("evaluate", *common, "--evaluate.output", output, cwd=folder)
    written = json.loads(output.read_text(encoding="utf-8"))
    acc, acc_norm, count = summary(result)
    assert count == written["examples"] == len(scored.examples) == 40
    assert (written["acc"], written["acc_norm"]) == pytest.approx((acc, acc_norm), abs=5e-5)
    cli("export", "--config", config, "--data.dataset_dir", data, "--ckpt_path", ckpt,
        "--output", folder / "hf", cwd=folder)  # fmt: skip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_evaluation.py's one_thread says why
    try:
        reference = build_nanogpt_on_transformers(folder / "hf", scored.examples)
        _, model, tokenizer, _ = load_model(str(ckpt), folder / "ckpt", data)
        examples = read_examples(scored.hellaswag)
        rendered = render(examples, tokenizer, scored.hellaswag, model.config.block_size)
        cpu = torch.device("cpu")
        ours = ending_losses(model.eval(), rendered, tokenizer.vocab_size, 64, cpu)
    finally:
        torch.set_num_threads(threads)
    picks, theirs = [], []
    for example, endings, row in zip(scored.examples, ours, reference, strict=True):
        k = len(example["endings"])
        assert [s for s, _ in endings] == pytest.approx(row[:k], abs=1e-3)  # summed losses
        assert [s / n for s, n in endings] == pytest.approx(row[k:], abs=1e-4)
        pick = min(range(k), key=lambda i: endings[i][0])
        pick_norm = min(range(k), key=lambda i: endings[i][0] / endings[i][1])
        picks.append((pick, pick_norm))
        theirs.append((int(torch.tensor(row[:k]).argmin()), int(torch.tensor(row[k:]).argmin())))
    assert picks == theirs  # the same ending picked for every example, both ways
    labels = [example["label"] for example in scored.examples]
    assert written["correct"] == sum(p == y for (p, _), y in zip(theirs, labels, strict=True))
    assert written["correct_norm"] == sum(p == y for (_, p), y in zip(theirs, labels, strict=True))
    # The fit's own score at step 10 is of these weights.
    line = next(line for line in scored.fit.stdout.splitlines() if line.startswith("step 10:"))
    assert f"hellaswag/acc {acc:.4f} hellaswag/acc_norm {acc_norm:.4f}" in line


# --------------------------------------------------------------------------- processes


@pytest.mark.cold  # how the ranks start matters
def test_one_and_two_processes_give_the_same_figures(
    tmp_path: Path, trained: Trained, corpus_text: str, cli: Cli
) -> None:
    """The examples are shared among the ranks and the counts summed: `evaluate` on one
    process and on two, and a fit on two ranks scoring its first step at learning rate 0
    (the checkpoint's weights, unchanged), give the same figures."""
    hellaswag = tmp_path / "hellaswag.jsonl"
    write_hellaswag(hellaswag, corpus_text, count=39)  # odd: the ranks get 20 and 19
    ckpt = trained.ckpt / "ckpt_last_00000020.pt"
    args = ("evaluate", "--config", trained.config, "--data.dataset_dir", trained.data,
            "--evaluate.hellaswag", hellaswag, "--ckpt_path", ckpt)  # fmt: skip
    one = summary(cli(*args, *QUIET, cwd=tmp_path))
    two = summary(two_ranks(cli, *args, cwd=tmp_path))
    assert one == two and one[2] == 39
    fit = two_ranks(
        cli, "fit", *trained.fit_flags(tmp_path), "--model.init_from", ckpt,
        "--model.learning_rate", "0", "--model.min_lr", "0", "--trainer.max_steps", "1",
        "--evaluate.every_n_steps", "1", "--evaluate.hellaswag", hellaswag, cwd=tmp_path,
    )  # fmt: skip
    line = next(line for line in fit.stdout.splitlines() if line.startswith("step 1:"))
    assert f"hellaswag/acc {one[0]:.4f} hellaswag/acc_norm {one[1]:.4f}" in line, fit.stdout


# --------------------------------------------------------------------------- bad input

GOOD = {"ctx": "The fox", "endings": ["jumps over", "sleeps"], "label": 0}


def jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


BAD_INPUT = {  # name: (file text, flags, exit code, what the line names)
    "malformed_line": (jsonl(GOOD, '{"ctx": "The", "endings": ["a" "b"], "label": 0}'), (), 1,
                       ("hellaswag.jsonl, line 2: not valid JSON",)),
    "label_out_of_range": (jsonl(GOOD, {**GOOD, "label": 2}), (), 1,
                           ('line 2: "label" 2 is out of range: the example has 2 endings',)),
    "fewer_than_two_endings": (jsonl({**GOOD, "endings": ["jumps"]}), (), 1,
                               ("line 1: 1 ending(s); an example needs at least 2",)),
    "empty_file": ("", (), 1, ("hellaswag.jsonl holds no examples",)),
    "character_outside_the_vocabulary": (jsonl(GOOD, {**GOOD, "ctx": "The Zebra"}), (), 1,
                                         ("line 2: characters not in the vocabulary: 'Z'",)),
    "url_offline": (jsonl(GOOD), ("--evaluate.hellaswag", "http://127.0.0.1:9/hellaswag_val.jsonl"),
                    1, ("could not download", "to work offline", "evaluate.hellaswag to a local")),
    "ckpt_path_no_such_file": (jsonl(GOOD), ("--ckpt_path", "missing.pt"), 1,
                               ("missing.pt: checkpoint file not found",)),
    "ckpt_path_no_such_model": (jsonl(GOOD), ("--ckpt_path", "no-such-model"), 2,
                                ("'no-such-model'", "not in the Hugging Face cache")),
    "output_is_a_folder": (jsonl(GOOD), ("--evaluate.output", "."), 2,
                           ("evaluate.output = ", "is a folder; give the path of a file to write")),
    "ckpt_path_best_without_checkpoints": (jsonl(GOOD), ("--checkpointing.dirpath", "none"), 1,
                                           ("no checkpoint found",)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(
    name: str, tmp_path: Path, trained: Trained, cli_in_process: Cli
) -> None:
    text, flags, code, mentions = BAD_INPUT[name]
    (tmp_path / "hellaswag.jsonl").write_text(text, encoding="utf-8")
    result = cli_in_process(
        "evaluate", "--config", trained.config, "--data.dataset_dir", trained.data,
        "--checkpointing.dirpath", trained.ckpt, "--evaluate.hellaswag", "hellaswag.jsonl",
        "--evaluate.output", "figures.json", *flags, cwd=tmp_path, check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert_one_error_line(result, code, *mentions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hellaswag.jsonl"]
