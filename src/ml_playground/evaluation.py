"""HellaSwag in completion style, scored as build-nanogpt's and llm.c's `hellaswag.py` score
it: `ml-playground evaluate`, and the callback that scores it every N steps while `fit` trains.

Each ending makes a row: the context's tokens, then those of `" " + ending`. The model's loss
is summed over the ending's tokens only; `acc` counts the examples whose correct ending has the
lowest summed loss, `acc_norm` those whose correct ending has the lowest mean loss (per token).
Rows longer than the model's window keep their last tokens.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ml_playground.errors import ConfigError, DataError, MLPlaygroundError, shorten
from ml_playground.files import write_atomic
from ml_playground.model.gpt import GPT, KVCache
from ml_playground.prepare import Tokenizer, cached_path_for, fetch, tokenizer_from_meta
from ml_playground.sampling import load_model
from ml_playground.sections import OptionalPath, Section, Source, is_url

METRICS = ("hellaswag/acc", "hellaswag/acc_norm")


class EvaluateConfig(Section):
    """How `evaluate` scores HellaSwag (and `fit`, every `every_n_steps` steps)."""

    hellaswag: Source = Field(
        description="HellaSwag's examples in its JSONL format (ctx, endings, label on each "
        "line): an http(s) URL (downloaded once into the cache) or a local .jsonl; relative "
        "paths resolve against the config file"
    )
    hellaswag_sha256: str = Field(
        description='expected sha256 of the file (hex, any case); "" skips the check',
        pattern=r"^([0-9a-fA-F]{64})?$",
    )
    limit: int = Field(description="score the first N examples; 0: all of them", ge=0)
    batch_size: int = Field(
        description="endings scored per forward pass (4 per HellaSwag example); the "
        "contexts of a pass have one length and run once, their endings continue from them",
        gt=0,
    )
    every_n_steps: int = Field(
        description="during fit, score every N optimizer steps and log hellaswag/acc and "
        "hellaswag/acc_norm (the ranks of a distributed run share the examples); 0: off",
        ge=0,
    )
    output: OptionalPath = Field(
        description='`evaluate` also writes its figures as JSON to this file ("" : only print '
        "them; {experiment} is replaced); relative paths resolve against the config file"
    )

    @field_validator("hellaswag_sha256")
    @classmethod
    def _lower_case(cls, value: str) -> str:
        return value.lower()  # as hashlib writes it


# --------------------------------------------------------------------------- the examples


@dataclass(frozen=True)
class Example:
    """One HellaSwag example and the line of the file it came from."""

    line: int
    context: str
    endings: tuple[str, ...]
    label: int


def hellaswag_file(settings: EvaluateConfig) -> Path:
    """The local file of `evaluate.hellaswag`, downloaded into the cache when it is a URL."""
    source = str(settings.hellaswag)
    expected = settings.hellaswag_sha256 or None
    if not is_url(source):
        path = Path(source)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise DataError(
                f"evaluate.hellaswag: {path} {what}; give a .jsonl file of HellaSwag examples "
                "or its URL"
            )
        return fetch(path, expected)  # checks the sha256 when one is given
    try:
        return fetch(source, expected)
    except DataError as exc:
        if cached_path_for(source).is_file():
            raise  # the cached copy fails its sha256: the message says what to do
        first = str(exc).split("; put the file at")[0]  # fetch's own advice names prepare
        raise DataError(
            f"evaluate.hellaswag: {first}; to work offline, download it elsewhere and copy it "
            f"to {cached_path_for(source)}, or set evaluate.hellaswag to a local .jsonl file"
        ) from None


def read_examples(path: Path, limit: int = 0) -> list[Example]:
    """The first `limit` examples of a HellaSwag JSONL file (0: all), each checked."""
    examples: list[Example] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if limit and len(examples) >= limit:
                    break
                if line.strip():
                    examples.append(parse_example(path, number, line))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if not examples:
        raise DataError(
            f"{path} holds no examples; give a HellaSwag .jsonl file: one JSON object per line "
            'with "ctx", "endings" and "label"'
        )
    return examples


def parse_example(path: Path, number: int, line: str) -> Example:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one "
            'HellaSwag example: a JSON object with "ctx", "endings" and "label"'
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f'{where}: a JSON {type(record).__name__}, not an object with "ctx", "endings" and '
            '"label"'
        )
    missing = [key for key in ("ctx", "endings", "label") if key not in record]
    if missing:
        raise DataError(f"{where}: no {', '.join(repr(k) for k in missing)} (a HellaSwag example "
                        "has ctx, endings and label; the test split has no labels)")  # fmt: skip
    context, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(context, str) or not context:
        raise DataError(f'{where}: "ctx" must be non-empty text, got {shorten(repr(context), 60)}')
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise DataError(f'{where}: "endings" must be a list of texts')
    if len(endings) < 2:
        raise DataError(
            f'{where}: {len(endings)} ending(s); an example needs at least 2 "endings" to choose '
            "from"
        )
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy writes "3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f'{where}: "label" must be an integer, got {shorten(repr(label), 40)}')
    if not 0 <= label < len(endings):
        raise DataError(
            f'{where}: "label" {label} is out of range: the example has {len(endings)} endings '
            f"(0..{len(endings) - 1})"
        )
    return Example(number, context, tuple(endings), label)


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Rendered:
    """An example in tokens: the context's, and those of `" " + ending` for each ending (a row
    is the context followed by one ending)."""

    context: list[int]
    endings: list[list[int]]
    label: int

    def tokens(self, window: int) -> int:
        """The tokens of its rows (cut to the model's `window`), as build-nanogpt runs them."""
        return sum(min(window, len(self.context) + len(ending)) for ending in self.endings)


def render(
    examples: Sequence[Example], tokenizer: Tokenizer, path: Path, window: int
) -> list[Rendered]:
    """The examples in the model's tokens (build-nanogpt's rendering: a space before each
    ending); `window` is the model's context, which must hold more than one token."""
    if window < 2:
        raise DataError(f"a model with a context of {window} token cannot score an ending")
    rendered = []
    for example in examples:
        try:
            context = tokenizer.encode(example.context)
            endings = [tokenizer.encode(" " + ending) for ending in example.endings]
        except MLPlaygroundError as exc:  # a character a char model has never seen
            raise DataError(
                f"{path}, line {example.line}: {exc}; evaluate a model whose tokenizer covers "
                "the examples (GPT-2 BPE covers any text)"
            ) from None
        rendered.append(Rendered(context, endings, example.label))
    return rendered


# --------------------------------------------------------------------------- scoring

Losses = list[list[tuple[float, int]]]  # per example, per ending: summed loss, tokens scored


@torch.no_grad()
def ending_losses(
    model: GPT, examples: Sequence[Rendered], vocab: int, batch_rows: int, device: torch.device
) -> Losses:
    """Each ending's loss summed over its tokens, and their number, computed over the
    tokenizer's `vocab` real tokens (no padded rows); `batch_rows` rows per forward pass.

    The 4 rows of an example share its context, so it runs once: examples whose contexts have
    the same length go through the model together, then their endings continue from the
    context's keys and values. A row longer than the model's window keeps its last tokens
    instead (its ending may then lose its first tokens); such rows run whole.
    """
    window = model.config.block_size
    losses: Losses = [[(0.0, 0)] * len(example.endings) for example in examples]
    fits: list[int] = []
    cut: list[int] = []
    for e, example in enumerate(examples):
        longest = max(map(len, example.endings))
        (fits if len(example.context) + longest <= window else cut).append(e)
    by_length: dict[int, list[int]] = {}
    for e in fits:
        by_length.setdefault(len(examples[e].context), []).append(e)
    head = model.lm_head.weight[:vocab]  # (V, C)
    for group in by_length.values():
        for batch in batches(group, lambda e: len(examples[e].endings), batch_rows):
            shared_context(model, head, examples, batch, losses, device)
    rows = [(e, i) for e in cut for i in range(len(examples[e].endings))]
    rows.sort(key=lambda r: len(examples[r[0]].context) + len(examples[r[0]].endings[r[1]]))
    for batch_of_rows in batches(rows[::-1], lambda _: 1, batch_rows):
        whole_rows(model, head, examples, batch_of_rows, losses, device)
    return losses


def batches(items: Sequence[Any], rows: Callable[[Any], int], limit: int) -> list[list[Any]]:
    """`items` in order, cut into batches of at most `limit` rows (at least one item each)."""
    out: list[list[Any]] = [[]]
    used = 0
    for item in items:
        if out[-1] and used + rows(item) > limit:
            out.append([])
            used = 0
        out[-1].append(item)
        used += rows(item)
    return [batch for batch in out if batch]


def row_sums(head: Tensor, hidden: Tensor, targets: Tensor) -> list[float]:
    """Per row of targets (R, T) (-1 where nothing is scored), the summed cross-entropy of
    the logits that `hidden` (R, T, C) gives at the scored positions."""
    where = targets >= 0
    logits = F.linear(hidden[where], head).float()  # (K, V): only the scored positions
    losses = F.cross_entropy(logits, targets[where], reduction="none")
    owner = torch.arange(len(targets), device=targets.device).unsqueeze(1).expand_as(where)
    sums = torch.zeros(len(targets), device=targets.device, dtype=torch.float32)
    return sums.index_add_(0, owner[where], losses).tolist()


def shared_context(
    model: GPT, head: Tensor, examples: Sequence[Rendered], batch: list[int],
    losses: Losses, device: torch.device,
) -> None:  # fmt: skip
    """Examples whose contexts have one length: the contexts, then all their endings."""
    context = torch.tensor([examples[e].context for e in batch], device=device)  # (E, Tc)
    owners = [(j, e, i) for j, e in enumerate(batch) for i in range(len(examples[e].endings))]
    width = max(len(examples[e].endings[i]) for _, e, i in owners)
    endings = torch.full((len(owners), width), -1, dtype=torch.long)  # (R, Te)
    for r, (_, e, i) in enumerate(owners):
        ending = examples[e].endings[i]
        endings[r, : len(ending)] = torch.tensor(ending)
    endings = endings.to(device)
    cache = KVCache(model.config.n_layer, context.size(1) + width)
    last = model.hidden_states(context, cache)[:, -1]  # (E, C): predicts each first token
    rows = torch.tensor([j for j, _, _ in owners], device=device)
    cache = cache.select(rows)
    after = model.hidden_states(endings.clamp(min=0), cache, context.size(1))  # (R, Te, C)
    # the context's last position predicts an ending's first token, the ending the rest
    hidden = torch.cat([last[rows].unsqueeze(1), after[:, :-1]], dim=1)
    for (_, e, i), total in zip(owners, row_sums(head, hidden, endings), strict=True):
        losses[e][i] = (total, len(examples[e].endings[i]))


def whole_rows(
    model: GPT, head: Tensor, examples: Sequence[Rendered], batch: list[tuple[int, int]],
    losses: Losses, device: torch.device,
) -> None:  # fmt: skip
    """Rows cut to the model's window, each run whole (longest first: little padding)."""
    window = model.config.block_size
    cut = [(examples[e].context + examples[e].endings[i])[-window:] for e, i in batch]
    width = max(map(len, cut))
    idx = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.full((len(batch), width), -1, dtype=torch.long)
    scored = []
    for r, ((e, i), row) in enumerate(zip(batch, cut, strict=True)):
        k = min(len(examples[e].endings[i]), len(row) - 1)  # the first token has no predictor
        idx[r, : len(row)] = torch.tensor(row)
        # position p predicts token p + 1: the last k tokens, from positions n-k-1 .. n-2
        targets[r, len(row) - k - 1 : len(row) - 1] = torch.tensor(row[len(row) - k :])
        scored.append(k)
    idx, targets = idx.to(device), targets.to(device)
    sums = row_sums(head, model.hidden_states(idx), targets)
    for (e, i), total, k in zip(batch, sums, scored, strict=True):
        losses[e][i] = (total, k)


def count_correct(
    model: GPT, examples: Sequence[Rendered], vocab: int, batch_rows: int, device: torch.device
) -> tuple[int, int, int]:
    """(examples, correct by summed loss, correct by mean loss)."""
    was_training = model.training
    model.eval()
    try:
        losses = ending_losses(model, examples, vocab, batch_rows, device)
    finally:
        model.train(was_training)
    correct = correct_norm = 0
    for example, endings in zip(examples, losses, strict=True):
        # min picks the first of equal losses, as torch's argmin does
        span = range(len(endings))
        correct += min(span, key=lambda i: endings[i][0]) == example.label
        correct_norm += min(span, key=lambda i: endings[i][0] / endings[i][1]) == example.label
    return len(examples), correct, correct_norm


def shard(examples: Sequence[Any], rank: int, world: int) -> list[Any]:
    """This rank's share of the examples (every world-th from its rank: each counts once)."""
    return list(examples[rank::world])


def figures(total: int, correct: int, correct_norm: int) -> dict[str, float]:
    return {METRICS[0]: correct / total, METRICS[1]: correct_norm / total}


def summary(total: int, correct: int, correct_norm: int) -> str:
    acc, acc_norm = figures(total, correct, correct_norm).values()
    return f"hellaswag: acc={acc:.4f} acc_norm={acc_norm:.4f} ({total} examples)"


# --------------------------------------------------------------------------- `evaluate`


def evaluate(
    settings: EvaluateConfig,
    ckpt: str,
    dirpath: Path,
    dataset_dir: Path,
    trainer: dict[str, Any],
) -> dict[str, Any]:
    """Score the model `ckpt` names (as sample.ckpt: best, last, a file, a Hugging Face folder
    or hub id); the examples are shared among the ranks `trainer`'s settings start. Prints
    the figures on rank 0 and returns them."""
    output = Path(settings.output) if settings.output else None
    if output is not None and (output.is_dir() or any(p.is_file() for p in output.parents)):
        what = "a folder" if output.is_dir() else "below a file"
        raise ConfigError(f"evaluate.output = {output} is {what}; give the path of a file to write")
    path = hellaswag_file(settings)
    examples = read_examples(path, settings.limit)  # checked before the model is read
    fabric = launch(trainer)
    source, model, tokenizer, _ = load_model(ckpt, dirpath, dataset_dir)
    # Every rank renders them all: a bad example stops every rank alike, none waits for it.
    rendered = shard(render(examples, tokenizer, path, model.config.block_size),
                     fabric.global_rank, fabric.world_size)  # fmt: skip
    if fabric.global_rank == 0:
        print(f"evaluating {source} on {len(examples):,} examples of {path}", file=sys.stderr)
    model.to(fabric.device)
    started = time.perf_counter()
    local = count_correct(model, rendered, tokenizer.vocab_size, settings.batch_size, fabric.device)
    tokens = sum(example.tokens(model.config.block_size) for example in rendered)
    counts = torch.tensor([*local, tokens], dtype=torch.long, device=fabric.device)
    total, correct, correct_norm, tokens = map(int, fabric.all_reduce(counts, reduce_op="sum"))
    seconds = time.perf_counter() - started
    result = {
        "task": "hellaswag",
        "model": str(source),
        "source": str(settings.hellaswag),
        "examples": total,
        "acc": correct / total,
        "acc_norm": correct_norm / total,
        "correct": correct,
        "correct_norm": correct_norm,
    }
    if fabric.global_rank == 0:
        print(summary(total, correct, correct_norm))
        print(f"scored {tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)",
              file=sys.stderr)  # fmt: skip
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(output, json.dumps(result, indent=2) + "\n")
            print(f"figures written to {output}", file=sys.stderr)
    return result


def launch(trainer: dict[str, Any]) -> Any:
    """Lightning Fabric on the devices `[trainer]` names: `--trainer.devices 2` starts the
    other ranks as `fit` does, and ranks started by torchrun or SLURM join each other."""
    from lightning.fabric import Fabric

    keys = ("accelerator", "devices", "num_nodes", "strategy")
    chosen = {key: trainer[key] for key in keys if isinstance(trainer.get(key), str | int | list)}
    if "spawn" in str(chosen.get("strategy", "")):
        raise ConfigError(
            f"evaluate cannot use trainer.strategy = {chosen['strategy']!r}: its ranks are "
            'started as fit starts them; use "ddp"'
        )
    fabric = Fabric(**chosen)
    fabric.launch()
    return fabric


# --------------------------------------------------------------------------- while fitting


class HellaSwag(pl.Callback):
    """Scores HellaSwag every `every_n_steps` optimizer steps of `fit`, on the weights
    validation uses (the EMA weights when EMA is on), each rank on its share of the examples;
    logs hellaswag/acc and hellaswag/acc_norm to every logger and hands them to `report`
    (the console line of that step)."""

    def __init__(
        self,
        settings: EvaluateConfig,
        meta: dict[str, Any],
        report: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.meta = meta
        self.report = report
        self.examples: list[Rendered] | None = None  # this rank's, read when fit starts
        self.tokenizer: Tokenizer | None = None
        self.last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The examples are read, checked and tokenized before training starts."""
        if stage != "fit" or self.examples is not None:
            return
        path = hellaswag_file(self.settings)
        examples = read_examples(path, self.settings.limit)
        window = cast(GPT, pl_module.model).config.block_size
        self.tokenizer = tokenizer_from_meta(self.meta)
        rendered = render(examples, self.tokenizer, path, window)  # all: see `evaluate`
        self.examples = shard(rendered, trainer.global_rank, trainer.world_size)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step  # optimizer steps completed
        every = self.settings.every_n_steps
        if (
            self.examples is None
            or self.tokenizer is None
            or step % every
            or step == self.last_step
        ):
            return  # not a step to score, or a micro-batch of an accumulated step
        self.last_step = step
        model = self.weights(trainer, pl_module)
        with trainer.precision_plugin.forward_context():
            local = count_correct(
                model, self.examples, self.tokenizer.vocab_size, self.settings.batch_size,
                pl_module.device,
            )  # fmt: skip
        counts = torch.tensor(local, dtype=torch.long, device=pl_module.device)
        total, correct, correct_norm = map(int, trainer.strategy.reduce(counts, reduce_op="sum"))
        scores = figures(total, correct, correct_norm)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                # Lightning's number for the step in progress (completed_step's inverse), as
                # it logs val/loss: each logger then shows both at the same step.
                logger.log_metrics(scores, step=step - 1)
        if self.report is not None:
            self.report(step, scores)

    @staticmethod
    def weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> GPT:
        """The EMA weights when an EMAWeightAveraging callback keeps them, else the module's."""
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            average = getattr(callback, "_average_model", None)  # WeightAveraging's
            if average is not None:
                return cast(GPT, average.module.model)
        return cast(GPT, pl_module.model)
