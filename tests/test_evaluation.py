"""HellaSwag scoring (evaluation.py): the losses against build-nanogpt's row-by-row algorithm,
the file checks, the tokens, the download, the shares of a distributed run."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ml_playground.configuration.loading import packaged_defaults
from ml_playground.errors import DataError
from ml_playground.evaluation import (
    EvaluateConfig,
    Example,
    Rendered,
    count_correct,
    ending_losses,
    hellaswag_file,
    read_examples,
    render,
    shard,
)
from ml_playground.model.gpt import GPT, GPTConfig
from ml_playground.prepare import CharTokenizer, cached_path_for

CPU = torch.device("cpu")
GOOD = {"ctx": "the fox", "endings": ["jumps", "sleeps", "runs", "sits"], "label": 2}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on one thread: the suite's two workers already share two cores, and torch's
    threads spin waiting for each other when the cores are taken (100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(**changes: object) -> EvaluateConfig:
    return EvaluateConfig(**{**packaged_defaults()["evaluate"], **changes})


def tiny_gpt(window: int, vocab: int = 64) -> GPT:
    torch.manual_seed(0)
    shape = GPTConfig(block_size=window, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32,
                      dropout=0.0, bias=False)  # fmt: skip
    return GPT(shape).eval()


def random_examples(count: int, vocab: int, seed: int = 1) -> list[Rendered]:
    """Contexts of 1-15 tokens, 2 or 4 endings of 1-12: with a window of 24 some rows are cut."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        context = [rng.randrange(vocab) for _ in range(rng.randint(1, 15))]
        endings = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
                   for _ in range(rng.choice([2, 4]))]  # fmt: skip
        out.append(Rendered(context, endings, rng.randrange(len(endings))))
    return out


@torch.no_grad()
def row_by_row(model: GPT, examples: list[Rendered], vocab: int) -> list[list[tuple[float, int]]]:
    """build-nanogpt's algorithm, one row at a time through the model's plain forward: the row
    cut to its last `block_size` tokens, cross-entropy over the first `vocab` logits, summed
    over the ending's tokens (those that have a token before them)."""
    window = model.config.block_size
    out = []
    for example in examples:
        found = []
        for ending in example.endings:
            row = torch.tensor([(example.context + ending)[-window:]])
            mask = torch.tensor([([0] * len(example.context) + [1] * len(ending))[-window:]])
            logits, _ = model(row, row)  # targets only to get every position's logits
            losses = F.cross_entropy(logits[0, :-1, :vocab], row[0, 1:], reduction="none")
            found.append((float((losses * mask[0, 1:]).sum()), int(mask[0, 1:].sum())))
        out.append(found)
    return out


def test_losses_are_build_nanogpts_whatever_the_batching() -> None:
    """Shared contexts (run once, endings continued from their keys and values), cut rows run
    whole, the padded vocabulary rows left out: the same losses as row by row, whatever the
    number of endings per pass."""
    model, vocab = tiny_gpt(window=24), 50  # 14 padded rows the tokenizer never produces
    examples = random_examples(30, vocab)
    assert any(len(e.context) + max(map(len, e.endings)) > 24 for e in examples)  # cut rows
    assert any(len(e.context) + max(map(len, e.endings)) <= 24 for e in examples)  # shared
    reference = row_by_row(model, examples, vocab)
    for batch_rows in (1, 3, 8, 1000):
        ours = ending_losses(model, examples, vocab, batch_rows, CPU)
        for mine, theirs in zip(ours, reference, strict=True):
            assert [n for _, n in mine] == [n for _, n in theirs]
            assert [s for s, _ in mine] == pytest.approx([s for s, _ in theirs], abs=1e-4)


def test_acc_by_sum_and_acc_norm_by_mean() -> None:
    """acc picks the lowest summed loss, acc_norm the lowest mean: they differ when a long
    ending has the larger sum but the smaller mean."""
    model, vocab = tiny_gpt(window=64), 50
    examples = random_examples(40, vocab, seed=3)
    losses = ending_losses(model, examples, vocab, 16, CPU)
    by_sum = sum(min(range(len(r)), key=lambda i: r[i][0]) == e.label
                 for r, e in zip(losses, examples, strict=True))  # fmt: skip
    by_mean = sum(min(range(len(r)), key=lambda i: r[i][0] / r[i][1]) == e.label
                  for r, e in zip(losses, examples, strict=True))  # fmt: skip
    model.train()
    assert count_correct(model, examples, vocab, 16, CPU) == (40, by_sum, by_mean)
    assert model.training  # its mode is given back


def test_shares_cover_every_example_once() -> None:
    examples = [Example(i + 1, "c", ("a", "b"), 0) for i in range(7)]
    shares = [shard(examples, rank, 3) for rank in range(3)]
    assert sorted(e.line for share in shares for e in share) == list(range(1, 8))
    assert shard(examples, 0, 1) == examples


def test_render_puts_a_space_before_each_ending_and_names_unknown_characters(
    tmp_path: Path,
) -> None:
    tokenizer = CharTokenizer(sorted(set("the fox jumps")))
    example = Example(3, "the fox", ("jumps", "ox"), 1)
    [rendered] = render([example], tokenizer, tmp_path / "h.jsonl", window=12)
    assert rendered.endings[0] == tokenizer.encode(" jumps")
    assert rendered.tokens(window=12) == 12 + len("the fox ox")  # the first row is cut to 12
    with pytest.raises(DataError) as error:
        render([Example(5, "the Fox", ("x", "y"), 0)], tokenizer, tmp_path / "h.jsonl", 8)
    assert "h.jsonl, line 5: characters not in the vocabulary: 'F'" in str(error.value)


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join(f"{x if isinstance(x, str) else json.dumps(x)}\n" for x in lines))
    return path


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"ctx": "a", "endings": ["b" "c"], "label": 0}', "line 2: not valid JSON (Expecting ','"),
        ({**GOOD, "label": 4}, 'line 2: "label" 4 is out of range: the example has 4 endings'),
        ({**GOOD, "label": -1}, 'line 2: "label" -1 is out of range'),
        ({**GOOD, "endings": ["only"], "label": 0}, 'line 2: 1 ending(s); an example needs at least 2'),
        ({**GOOD, "label": "two"}, 'line 2: "label" must be an integer'),
        ({"ctx": "a", "endings": ["b", "c"]}, "line 2: no 'label'"),
        ([1, 2], "line 2: a JSON list, not an object"),
        ({**GOOD, "ctx": ""}, 'line 2: "ctx" must be non-empty text'),
    ],
    ids=["malformed", "label_too_big", "label_negative", "one_ending", "label_text", "no_label",
         "not_an_object", "empty_context"],
)  # fmt: skip
def test_a_bad_line_is_named_with_its_file_and_number(
    tmp_path: Path, line: object, says: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", GOOD, line, GOOD)
    with pytest.raises(DataError) as error:
        read_examples(path)
    assert str(error.value).startswith(f"{path}, ") and says in str(error.value)


def test_empty_file_blank_lines_limit_and_labels_as_text(tmp_path: Path) -> None:
    for text in ("", "\n\n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(DataError, match="holds no examples"):
            read_examples(tmp_path / "empty.jsonl")
    path = write_lines(tmp_path / "ok.jsonl", GOOD, "", {**GOOD, "label": "1"}, "not json")
    assert [e.line for e in read_examples(path, limit=2)] == [1, 3]  # stops before line 4
    assert read_examples(path, limit=2)[1].label == 1  # the Hugging Face copy's "1"


def test_the_url_offline_says_how_to_work_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ML_PLAYGROUND_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/hellaswag_val.jsonl"
    with pytest.raises(DataError) as error:
        hellaswag_file(settings(hellaswag=url))
    message = str(error.value)
    assert message.startswith(f"evaluate.hellaswag: could not download {url}")
    assert f"copy it to {cached_path_for(url)}" in message
    assert "set evaluate.hellaswag to a local .jsonl file" in message
    # Put there, it is used without the network, and checked when a sha256 is given.
    path = write_lines(cached_path_for(url), GOOD)
    assert hellaswag_file(settings(hellaswag=url)) == path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hellaswag_file(settings(hellaswag=url, hellaswag_sha256=digest.upper())) == path
    with pytest.raises(DataError, match="sha256 mismatch"):
        hellaswag_file(settings(hellaswag=url, hellaswag_sha256="0" * 64))


def test_a_missing_local_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"evaluate.hellaswag: .*nope.jsonl does not exist"):
        hellaswag_file(settings(hellaswag=str(tmp_path / "nope.jsonl")))
