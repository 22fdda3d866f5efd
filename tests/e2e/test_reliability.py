"""Bad input, faults and untrusted files through the real console script.

Every row of docs/reliability.md that is about the CLI and not already covered by
tests/e2e/test_cli.py runs here. One tiny run is trained up front (`trained`). A row where the
process matters (it trains, is killed or limited, writes where it may not) runs as
`python -m ml_playground ...` in a subprocess: those commands start together in a small pool
(`runs`) and each test checks the outcome of its own. A row that only parses and checks its
input (`in_process=True`) runs `ml_playground.cli.main` in the test itself. Set
RELIABILITY_MESSAGES_OUT=FILE to collect what each case printed (the docs table quotes it).
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from filelock import MarkerSoftFileLock

from e2e import harness
from e2e.harness import (
    QUIET,
    TRAIN_ENV,
    Cli,
    JobPool,
    Result,
    Trained,
    all_finite,
    assert_one_error_line,
    ckpt_files,
    free_port,
    last_steps,
    leftovers,
    samples,
    start_fit,
    wait_for,
)
from ml_playground.locking import LOCK_FILENAME

MESSAGES_ENV = "RELIABILITY_MESSAGES_OUT"


# --------------------------------------------------------------------------- fixtures


class Unwritable:
    """Folders a command cannot write to: mode 0555, or (as root) a read-only tmpfs."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []
        self.chmodded: list[Path] = []

    def make(self, path: Path) -> Path | None:
        path.mkdir(parents=True)
        if os.geteuid() != 0:
            path.chmod(0o555)
            self.chmodded.append(path)
            return path
        # Root ignores permission bits: mount a read-only filesystem there instead.
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            return None
        self.mounted.append(path)
        return path

    def cleanup(self) -> None:
        for path in self.mounted:
            subprocess.run(["umount", str(path)], capture_output=True, check=False)
        for path in self.chmodded:
            path.chmod(0o755)


@dataclass(kw_only=True)
class Context(harness.Context):
    unwritable: Unwritable
    server: str  # base URL of a local HTTP server serving the corpus

    def fit_flags(self, folder: Path) -> tuple[str, ...]:
        return self.trained.fit_flags(folder)

    def data_copy(self, name: str) -> Path:
        folder = self.mktemp(name)
        shutil.copytree(self.trained.data, folder / "data")
        return folder


JOBS = JobPool()
job = JOBS.job


@pytest.fixture(scope="module")
def corpus_server(corpus_text: str, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("served")
    (folder / "corpus.txt").write_text(corpus_text, encoding="utf-8")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            """No request lines on stderr: an in-process row would read them as its own."""

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def runs(trained, cli, tmp_path_factory, make_experiment, corpus_server) -> Iterator[JobPool]:
    def mktemp(name: str) -> Path:
        return tmp_path_factory.mktemp(name).resolve()

    unwritable = Unwritable()
    context = Context(
        trained=trained, cli=cli, mktemp=mktemp, make_experiment=make_experiment,
        unwritable=unwritable, server=corpus_server,
    )  # fmt: skip
    context.notes["before"] = trained.snapshot()
    with JOBS.running(context) as pool:
        yield pool
    unwritable.cleanup()
    out = os.environ.get(MESSAGES_ENV)
    if out:
        collected = {
            name: [{"exit": r.returncode, "stderr": r.stderr, "stdout": r.stdout[-400:]}]
            for name, r in context.notes.get("in_process", {}).items()
        }
        for name, future in JOBS.futures.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                value = future.result()
                results = value if isinstance(value, tuple) else (value,)
                collected[name] = [
                    {"exit": r.returncode, "stderr": r.stderr, "stdout": r.stdout[-400:]}
                    for r in results
                    if isinstance(r, subprocess.CompletedProcess)
                ]
        Path(out).write_text(json.dumps(collected, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------- one-line errors


@dataclass
class Row:
    exit_code: int | None  # None: any non-zero code
    mentions: tuple[str, ...]
    run: Callable[[Context], Any]
    in_process: bool


ROWS: dict[str, Row] = {}


def row(exit_code: int | None, *mentions: str, in_process: bool = False) -> Callable:
    """A row of docs/reliability.md: the command (a function of the Context) ends with
    `exit_code` and one error line naming each of `mentions`. It runs in the pool of `runs`,
    or, `in_process`, in its test (`ctx.cli` is then conftest.py's `cli_in_process`)."""

    def register(fn: Callable[[Context], Any]) -> Callable[[Context], Any]:
        ROWS[fn.__name__] = Row(exit_code, mentions, fn, in_process)
        return fn if in_process else job(fn)

    return register


# config ---------------------------------------------------------------------------


@row(2, "bad.toml", "not valid TOML", in_process=True)
def not_toml(ctx: Context) -> Result:
    folder = ctx.mktemp("not_toml")
    (folder / "bad.toml").write_text("[model\nn_layer = 1\n", encoding="utf-8")
    return ctx.cli("fit", "--config", "bad.toml", cwd=folder, check=False)


@row(2, "command line", "model.dropout = 1.5", "less than 1", in_process=True)
def value_out_of_range(ctx: Context) -> Result:
    folder = ctx.mktemp("out_of_range")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--model.dropout", "1.5", cwd=folder, check=False)


@row(2, "n_embd (15) must be divisible by n_head (2)", in_process=True)
def n_embd_not_divisible(ctx: Context) -> Result:
    folder = ctx.mktemp("n_embd")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--model.n_embd", "15", cwd=folder, check=False)


@row(2, "data.block_size (32) exceeds the model's context model.block_size (16)", in_process=True)
def data_block_larger_than_model(ctx: Context) -> Result:
    folder = ctx.mktemp("block")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.block_size", "32", cwd=folder, check=False
    )


@row(2, "warmup_steps (50) must not exceed lr_decay_steps (20)", in_process=True)
def warmup_longer_than_decay(ctx: Context) -> Result:
    folder = ctx.mktemp("warmup")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--model.warmup_steps", "50", cwd=folder, check=False
    )


@row(2, "command line", "model.optimizer = sgd", "'adamw', 'muon'", in_process=True)
def unknown_optimizer(ctx: Context) -> Result:
    folder = ctx.mktemp("optimizer")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--model.optimizer", "sgd", cwd=folder,
                   check=False)  # fmt: skip


@row(2, "command line", "model.muon_lr = -0.01", "greater than or equal to 0", in_process=True)
def negative_muon_lr(ctx: Context) -> Result:
    folder = ctx.mktemp("muon_lr")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--model.optimizer", "muon",
                   "--model.muon_lr", "-0.01", cwd=folder, check=False)  # fmt: skip


@row(
    2,
    'muon.toml: model.muon_lr is a setting for model.optimizer = "muon", but model.optimizer '
    'is "adamw"',
    "remove model.muon_lr",
    in_process=True,
)
def muon_setting_with_adamw(ctx: Context) -> Result:
    """A Muon recipe switched to AdamW on the command line: its muon_lr would be ignored."""
    folder = ctx.mktemp("muon_setting")
    (folder / "muon.toml").write_text('[model]\noptimizer = "muon"\nmuon_lr = 0.05\n')
    return ctx.cli("fit", *ctx.fit_flags(folder), "--config", "muon.toml", "--model.optimizer",
                   "adamw", cwd=folder, check=False)  # fmt: skip


@row(2, TRAIN_ENV, "model.n_layer", in_process=True)
def env_wrong_type(ctx: Context) -> Result:
    folder = ctx.mktemp("env_type")
    env = {TRAIN_ENV: json.dumps({"model": {"n_layer": "two"}})}
    return ctx.cli("fit", *ctx.fit_flags(folder), cwd=folder, env=env, check=False)


# configuration shapes and LightningCLI habits ----------------------------------------


@row(
    2,
    "arrays.toml: model: expected a table ([model]), got an array of tables",
    "[model]",
    in_process=True,
)
def array_of_tables_for_a_section(ctx: Context) -> Result:
    """Before: jsonargparse replaced the section with the defaults and trained on them."""
    folder = ctx.mktemp("array_of_tables")
    (folder / "arrays.toml").write_text("[[model]]\nn_layer = 2\n", encoding="utf-8")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--config", "arrays.toml", cwd=folder,
                   check=False)  # fmt: skip


@row(
    2,
    TRAIN_ENV,
    "checkpointing.keep: expected a table ([checkpointing.keep]), got null",
    in_process=True,
)
def null_section_in_an_override(ctx: Context) -> Result:
    folder = ctx.mktemp("null_section")
    env = {TRAIN_ENV: json.dumps({"checkpointing": {"keep": None}})}
    return ctx.cli("fit", *ctx.fit_flags(folder), cwd=folder, env=env, check=False)


@row(2, TRAIN_ENV, "got null; expected a JSON object", in_process=True)
def null_override(ctx: Context) -> Result:
    folder = ctx.mktemp("null_override")
    return ctx.cli("fit", *ctx.fit_flags(folder), cwd=folder, env={TRAIN_ENV: "null"}, check=False)


@row(2, "--config comes before the command", "ml-playground fit --config", in_process=True)
def config_before_the_command(ctx: Context) -> Result:
    folder = ctx.mktemp("config_first")
    return ctx.cli("--config", ctx.trained.config, "fit", cwd=folder, check=False)


@row(2, "callbacks.toml: trainer.callbacks: LearningRateMonitor has no argument "
     "'logging_intervall' (did you mean logging_interval?)", in_process=True)  # fmt: skip
def callback_argument_typo(ctx: Context) -> Result:
    folder = ctx.mktemp("callback_typo")
    (folder / "callbacks.toml").write_text(
        '[[trainer.callbacks]]\nclass_path = "LearningRateMonitor"\n'
        'init_args = { logging_intervall = "step" }\n',
        encoding="utf-8",
    )
    return ctx.cli("fit", *ctx.fit_flags(folder), "--config", "callbacks.toml", cwd=folder,
                   check=False)  # fmt: skip


@row(
    2,
    "command line: trainer.logger: CSVLogger has no argument 'save_dirr' (did you mean save_dir?)",
    in_process=True,
)
def logger_argument_typo(ctx: Context) -> Result:
    folder = ctx.mktemp("logger_typo")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.logger", "CSVLogger",
                   "--trainer.logger.save_dirr", "csv", cwd=folder, check=False)  # fmt: skip


@row(
    2,
    "command line: trainer.callbacks: LearningRateMonitor logging_interval = stepp",
    "'step'",
    in_process=True,
)
def callback_bad_value(ctx: Context) -> Result:
    folder = ctx.mktemp("callback_value")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.callbacks+=LearningRateMonitor",
                   "--trainer.callbacks.logging_interval", "stepp", cwd=folder, check=False)  # fmt: skip


@row(
    2,
    "trainer.callbacks = LearningRateMonitr: no callback class",
    "did you mean LearningRateMonitor",
    in_process=True,
)
def unknown_callback_name(ctx: Context) -> Result:
    folder = ctx.mktemp("unknown_callback")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.callbacks+=LearningRateMonitr",
                   cwd=folder, check=False)  # fmt: skip


@row(
    2,
    "trainer.logger = TensorBoardLoger: no logger class",
    "did you mean TensorBoardLogger",
    in_process=True,
)
def unknown_logger_name(ctx: Context) -> Result:
    folder = ctx.mktemp("unknown_logger")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.logger", "TensorBoardLoger",
                   cwd=folder, check=False)  # fmt: skip


@row(2, "WandbLogger cannot be used", "wandb", "install it")
def logger_package_not_installed(ctx: Context) -> Result:
    folder = ctx.mktemp("wandb")
    ctx.notes["wandb"] = folder
    return ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.logger", "WandbLogger",
                   cwd=folder, check=False)  # fmt: skip


@job
def fast_dev_run_then_fit(ctx: Context) -> tuple[Result, Result, Result, dict[str, int]]:
    """Lightning's smoke test writes nothing (before: real checkpoints, so the next fit was
    refused), also over an earlier run's checkpoints."""
    folder = ctx.mktemp("fast_dev_run")
    smoke = ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.fast_dev_run", "true", cwd=folder)
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    real = ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.max_steps", "5", cwd=folder)
    before = harness.snapshot(folder / "ckpt")
    again = ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.fast_dev_run", "2", cwd=folder)
    ctx.notes["fast_dev_run_written"] = written
    return smoke, real, again, before


# data -----------------------------------------------------------------------------


def without(ctx: Context, *names: str) -> Result:
    folder = ctx.data_copy(f"missing_{names[0].replace('.', '_')}")
    for name in names:
        (folder / "data" / name).unlink()
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.dataset_dir", folder / "data", cwd=folder,
        check=False,
    )  # fmt: skip


@row(1, "missing val.bin", "ml-playground prepare", in_process=True)
def missing_val_bin(ctx: Context) -> Result:
    return without(ctx, "val.bin")


@row(1, "missing meta.pkl, train.bin", "ml-playground prepare", in_process=True)
def missing_meta_pkl_and_train_bin(ctx: Context) -> Result:
    """(Both token files without meta.pkl are nanoGPT's GPT-2 BPE layout: accepted.)"""
    return without(ctx, "meta.pkl", "train.bin")


@row(1, "empty.txt is empty")
def empty_corpus(ctx: Context) -> Result:
    folder = ctx.mktemp("empty_corpus")
    ctx.notes["empty_corpus"] = folder
    (folder / "empty.txt").write_text("", encoding="utf-8")
    return ctx.cli(
        "prepare", "--config", ctx.trained.config, "--prepare.source", folder / "empty.txt",
        "--data.dataset_dir", folder / "data", cwd=folder, check=False,
    )  # fmt: skip


@row(1, "train.bin: 15 tokens, fewer than one window of data.block_size + 1 = 17")
def corpus_shorter_than_a_block(ctx: Context) -> tuple[Result, Result]:
    """prepare accepts a 30-character corpus (it knows no block size); fit refuses it."""
    folder = ctx.mktemp("short_corpus")
    ctx.notes["short_corpus"] = folder
    (folder / "short.txt").write_text("the quick brown fox jumps over", encoding="utf-8")
    prepare = ctx.cli(
        "prepare", "--config", ctx.trained.config, "--prepare.source", folder / "short.txt",
        "--prepare.val_fraction", "0.5", "--data.dataset_dir", folder / "data", cwd=folder,
    )  # fmt: skip
    fit = ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.dataset_dir", folder / "data", cwd=folder,
        check=False,
    )  # fmt: skip
    return fit, prepare


def with_meta(ctx: Context, name: str, meta: object) -> Result:
    folder = ctx.data_copy(name)
    (folder / "data" / "meta.pkl").write_bytes(pickle.dumps(meta))
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.dataset_dir", folder / "data", cwd=folder,
        check=False,
    )  # fmt: skip


@row(1, "meta.pkl holds a list, not a dict", in_process=True)
def meta_not_a_dict(ctx: Context) -> Result:
    return with_meta(ctx, "meta_list", [1, 2, 3])


@row(1, "meta.pkl lacks a positive int 'vocab_size'", in_process=True)
def meta_without_vocab_size(ctx: Context) -> Result:
    return with_meta(ctx, "meta_novocab", {"itos": {0: "a"}, "stoi": {"a": 0}})


@row(1, "train.bin", "not a multiple of 2", in_process=True)
def bin_not_a_multiple_of_the_dtype(ctx: Context) -> Result:
    folder = ctx.data_copy("odd_bin")
    with open(folder / "data" / "train.bin", "ab") as handle:
        handle.write(b"\x01")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.dataset_dir", folder / "data", cwd=folder,
        check=False,
    )  # fmt: skip


@job
def token_ids_outside_vocabulary(ctx: Context) -> Result:
    folder = ctx.data_copy("big_ids")
    tokens = np.fromfile(folder / "data" / "train.bin", dtype=np.uint16)
    tokens[100] = 60000  # the vocabulary has 50 tokens
    tokens.tofile(folder / "data" / "train.bin")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.dataset_dir", folder / "data",
        "--trainer.max_steps", "40", cwd=folder, check=False,
    )  # fmt: skip


@row(1, "sha256 mismatch for download of http://127.0.0.1:", "the file was not cached")
def download_sha256_mismatch(ctx: Context) -> Result:
    folder = ctx.mktemp("sha_mismatch")
    ctx.notes["sha_cache"] = folder / "cache"
    return ctx.cli(
        "prepare", "--config", ctx.trained.config, "--prepare.source",
        f"{ctx.server}/corpus.txt", "--prepare.source_sha256", "0" * 64,
        "--data.dataset_dir", folder / "data", cwd=folder,
        env={"ML_PLAYGROUND_CACHE": str(folder / "cache")}, check=False,
    )  # fmt: skip


@row(1, "could not download http://127.0.0.1:", "put the file at", "prepare.source")
def no_network_no_cache(ctx: Context) -> Result:
    folder = ctx.mktemp("no_network")
    url = f"http://127.0.0.1:{free_port()}/input.txt"  # nothing listens there
    return ctx.cli(
        "prepare", "--config", ctx.trained.config, "--prepare.source", url,
        "--prepare.source_sha256", "", "--data.dataset_dir", folder / "data", cwd=folder,
        env={"ML_PLAYGROUND_CACHE": str(folder / "cache")}, check=False,
    )  # fmt: skip


# checkpoints ------------------------------------------------------------------------


@row(1, "notes.pt: not a readable checkpoint", in_process=True)
def not_a_checkpoint(ctx: Context) -> Result:
    folder = ctx.mktemp("not_ckpt")
    (folder / "notes.pt").write_bytes(b"these are my notes, not a checkpoint\n" * 20)
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.ckpt", "notes.pt", cwd=folder,
        check=False,
    )  # fmt: skip


@row(1, "ckpt_last_00000020.pt: vocabulary of 50 tokens", "gives 53", in_process=True)
def other_vocabulary(ctx: Context) -> Result:
    folder = ctx.data_copy("other_vocab")
    meta_path = folder / "data" / "meta.pkl"
    meta = pickle.loads(meta_path.read_bytes())
    for extra in "€£¥":
        meta["stoi"][extra] = meta["vocab_size"]
        meta["itos"][meta["vocab_size"]] = extra
        meta["vocab_size"] += 1
    meta_path.write_bytes(pickle.dumps(meta))
    return ctx.cli(
        "fit", "--config", ctx.trained.config, "--data.dataset_dir", folder / "data",
        "--ckpt_path", "last", "--log_dir", folder / "logs", *QUIET, cwd=folder, check=False,
    )  # fmt: skip


def newer_checkpoint(ctx: Context, name: str) -> Path:
    folder = ctx.mktemp(name)
    checkpoint = torch.load(
        ctx.trained.ckpt / "ckpt_last_00000020.pt", map_location="cpu", weights_only=True
    )
    checkpoint["ml_playground"]["format_version"] = 99
    torch.save(checkpoint, folder / "newer.pt")
    return folder


@row(1, "newer.pt: checkpoint format 99 is newer than this ml-playground supports", in_process=True)
def newer_version_sample(ctx: Context) -> Result:
    folder = newer_checkpoint(ctx, "newer_sample")
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.ckpt", "newer.pt", cwd=folder,
        check=False,
    )  # fmt: skip


@row(1, "nope.pt: checkpoint file not found", in_process=True)
def ckpt_path_does_not_exist(ctx: Context) -> Result:
    folder = ctx.mktemp("ckpt_path")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--ckpt_path", "nope.pt", cwd=folder, check=False)


def copied_run(ctx: Context, name: str) -> Path:
    """A copy of the trained run's checkpoints (last 15 and 20, best 20) in a fresh folder."""
    folder = ctx.mktemp(name)
    shutil.copytree(ctx.trained.ckpt, folder / "ckpt")
    ctx.notes[name] = folder
    return folder


@row(1, "ckpt_last_00000099.pt: its name says step 99 but it holds step 15", "rename it to")
def last_named_after_a_later_step(ctx: Context) -> Result:
    """`last` is chosen by name: a copy named as a later step would be resumed from step 15,
    then overwrite ckpt_last_00000020.pt and rotate files away."""
    folder = copied_run(ctx, "misnamed_last")
    shutil.copy(
        folder / "ckpt" / "ckpt_last_00000015.pt", folder / "ckpt" / "ckpt_last_00000099.pt"
    )
    ctx.notes["misnamed_last_files"] = harness.snapshot(folder / "ckpt")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--ckpt_path", "last", "--trainer.max_steps",
                   "40", cwd=folder, check=False)  # fmt: skip


@row(1, "ckpt_best_00000030_", "its name says step 30 but it holds step 20", in_process=True)
def misnamed_file_given_as_ckpt_path(ctx: Context) -> Result:
    folder = copied_run(ctx, "misnamed_file")
    best = next((folder / "ckpt").glob("ckpt_best_*.pt"))
    renamed = best.with_name(best.name.replace("_00000020_", "_00000030_"))
    best.rename(renamed)
    return ctx.cli("fit", *ctx.fit_flags(folder), "--ckpt_path", renamed, cwd=folder, check=False)


@row(1, "ckpt_last_00000020.pt", 'trained with model.optimizer = "adamw"', "model.init_from",
     in_process=True)  # fmt: skip
def resume_with_another_optimizer(ctx: Context) -> Result:
    folder = copied_run(ctx, "another_optimizer")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--ckpt_path", "last", "--model.optimizer",
                   "muon", "--trainer.max_steps", "40", cwd=folder, check=False)  # fmt: skip


def only_best_left(ctx: Context, name: str) -> Path:
    folder = copied_run(ctx, name)
    for path in (folder / "ckpt").glob("ckpt_last_*.pt"):
        path.unlink()
    return folder


@row(2, "already holds checkpoints", "resume it with --ckpt_path best", in_process=True)
def fresh_fit_with_only_best_left(ctx: Context) -> Result:
    folder = only_best_left(ctx, "only_best_fresh")
    return ctx.cli("fit", *ctx.fit_flags(folder), cwd=folder, check=False)


@row(
    1,
    "no ckpt_last_* checkpoint (checkpointing.keep.last may be 0); use --ckpt_path best",
    in_process=True,
)
def resume_last_with_only_best_left(ctx: Context) -> Result:
    folder = only_best_left(ctx, "only_best_last")
    return ctx.cli("fit", *ctx.fit_flags(folder), "--ckpt_path", "last", cwd=folder, check=False)


class Planted:
    """Unpickling this runs `open(marker, 'w')`: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@row(1, "evil.pt: refusing to load: it references io.open", "nothing in it ran")
def malicious_checkpoint(ctx: Context) -> Result:
    folder = ctx.mktemp("evil")
    checkpoint = torch.load(
        ctx.trained.ckpt / "ckpt_last_00000020.pt", map_location="cpu", weights_only=True
    )
    checkpoint["ml_playground"]["payload"] = Planted(folder / "pwned")
    torch.save(checkpoint, folder / "evil.pt")
    ctx.notes["evil"] = folder
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.ckpt", "evil.pt", cwd=folder,
        check=False,
    )  # fmt: skip


# settings found late ------------------------------------------------------------------


@row(2, "Lightning refused the [trainer] settings", "gpu")
def gpu_recipe_without_a_gpu(ctx: Context) -> Result:
    folder = ctx.notes["gpu"] = ctx.mktemp("gpu")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--trainer.accelerator", "gpu", cwd=folder, check=False
    )


@row(1, "out of memory", "data.batch_size")
def batch_too_large_for_memory(ctx: Context) -> Result:
    folder = ctx.notes["oom"] = ctx.mktemp("oom")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.batch_size", "1000000000000", cwd=folder, check=False
    )


@row(1, "bomb.pt: refusing to load", "claim 50,000,000 bytes", in_process=True)
def checkpoint_zip_bomb(ctx: Context) -> Result:
    folder = ctx.mktemp("bomb")
    with zipfile.ZipFile(folder / "bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * 50_000_000)
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.ckpt", "bomb.pt", cwd=folder,
        check=False,
    )  # fmt: skip


# sampling ---------------------------------------------------------------------------


@row(2, "sample.max_new_tokens = 0", "greater than 0", in_process=True)
def max_new_tokens_zero(ctx: Context) -> Result:
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.max_new_tokens", "0",
        cwd=ctx.mktemp("max_new"), check=False,
    )  # fmt: skip


@row(2, "sample.temperature = -0.5", "greater than or equal to 0", in_process=True)
def negative_temperature(ctx: Context) -> Result:
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.temperature", "-0.5",
        cwd=ctx.mktemp("neg_temp"), check=False,
    )  # fmt: skip


@row(2, "sample.output", "is a folder")
def sample_output_is_a_folder(ctx: Context) -> Result:
    folder = ctx.notes["output_folder"] = ctx.mktemp("output_folder")
    (folder / "out").mkdir()
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.output", folder / "out",
        cwd=folder, check=False,
    )  # fmt: skip


@job
def zero_temperature(ctx: Context) -> Result:
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.temperature", "0",
        "--sample.num_samples", "3", cwd=ctx.mktemp("greedy"),
    )  # fmt: skip


@job
def top_k_larger_than_vocabulary(ctx: Context) -> Result:
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.top_k", "100000",
        cwd=ctx.mktemp("top_k"),
    )  # fmt: skip


# data against meta.pkl, advice ------------------------------------------------------


def fit_on_changed_data(ctx: Context, name: str, change: Callable[[Path], None]) -> Result:
    """`fit` on a copy of the trained run's data after `change(data folder)`."""
    folder = ctx.notes[name] = ctx.data_copy(name)
    change(folder / "data")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--data.dataset_dir", folder / "data", cwd=folder,
        check=False,
    )  # fmt: skip


def truncate_train_bin(data: Path) -> None:
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    tokens[: len(tokens) // 2].tofile(data / "train.bin")  # an even size: whole tokens


def swap_train_and_val(data: Path) -> None:
    (data / "train.bin").rename(data / "swap.bin")
    (data / "val.bin").rename(data / "train.bin")
    (data / "swap.bin").rename(data / "val.bin")


def rewrite_train_bin_as_uint32(data: Path) -> None:
    np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.uint32).tofile(data / "train.bin")


@row(1, "train.bin: meta.pkl records", "truncated or replaced", "ml-playground prepare --force")
def truncated_train_bin(ctx: Context) -> Result:
    return fit_on_changed_data(ctx, "truncated_train_bin", truncate_train_bin)


@row(1, "train.bin: meta.pkl records", "look swapped", "ml-playground prepare --force")
def swapped_train_and_val_bin(ctx: Context) -> Result:
    return fit_on_changed_data(ctx, "swapped_train_and_val_bin", swap_train_and_val)


@row(1, "train.bin: meta.pkl records", "in uint32", "ml-playground prepare --force")
def train_bin_rewritten_as_uint32(ctx: Context) -> Result:
    return fit_on_changed_data(ctx, "train_bin_rewritten_as_uint32", rewrite_train_bin_as_uint32)


@row(1, "train.bin: meta.pkl records", "truncated or replaced", in_process=True)
def validate_on_a_truncated_train_bin(ctx: Context) -> Result:
    folder = ctx.data_copy("validate_truncated")
    truncate_train_bin(folder / "data")
    return ctx.cli(
        "validate", *ctx.fit_flags(folder), "--data.dataset_dir", folder / "data",
        "--ckpt_path", ctx.trained.ckpt / "ckpt_last_00000020.pt", cwd=folder, check=False,
    )  # fmt: skip


@row(
    2,
    "prepare.tokenizer",
    "unknown tiktoken encoding 'nope'",
    "gpt2",
    "cl100k_base",
    in_process=True,
)
def unknown_tiktoken_encoding(ctx: Context) -> Result:
    folder = ctx.mktemp("nope_encoding")
    return ctx.cli(
        "prepare", "--config", ctx.trained.config, "--prepare.tokenizer", "tiktoken:nope",
        "--data.dataset_dir", folder / "data", cwd=folder, check=False,
    )  # fmt: skip


@row(2, "checkpointing.dirpath", "ckpt is a file", "give the path of a folder", in_process=True)
def checkpoint_dirpath_is_a_file(ctx: Context) -> Result:
    folder = ctx.mktemp("dirpath_file")
    (folder / "ckpt").write_text("not a folder", encoding="utf-8")
    return ctx.cli("fit", *ctx.fit_flags(folder), cwd=folder, check=False)


@row(
    1,
    "list.pt: not a readable checkpoint",
    "a checkpoint: Weights only load failed)",
    in_process=True,
)
def checkpoint_reason_cut_at_its_first_sentence(ctx: Context) -> Result:
    """torch's reason here is a 300-character paragraph: its first sentence, not 120 chars."""
    folder = ctx.mktemp("list_pt")
    (folder / "list.pt").write_bytes(pickle.dumps([1, 2, 3], protocol=0))
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--sample.ckpt", folder / "list.pt",
        cwd=folder, check=False,
    )  # fmt: skip


@row(
    1,
    "no checkpoint to sample from",
    "keep.last and keep.best are both 0",
    "fit wrote none",
    in_process=True,
)
def sample_after_a_fit_that_kept_no_checkpoints(ctx: Context) -> Result:
    """The folder a `fit` with both keeps 0 leaves: made by its lock, then left empty."""
    folder = ctx.mktemp("keep_none")
    (folder / "ckpt").mkdir()
    return ctx.cli(
        "sample", "--config", ctx.trained.config, "--checkpointing.dirpath", folder / "ckpt",
        "--checkpointing.keep.last", "0", "--checkpointing.keep.best", "0", cwd=folder,
        check=False,
    )  # fmt: skip


@job
def log_dir_with_a_space(ctx: Context) -> Result:
    folder = ctx.notes["log_dir_with_a_space"] = ctx.mktemp("log_space")
    return ctx.cli(
        *("fit", *ctx.fit_flags(folder), "--log_dir", folder / "my logs"),
        "--trainer.max_steps", "2", cwd=folder,
    )  # fmt: skip


# runtime ----------------------------------------------------------------------------


@row(1, "is not writable", "checkpointing.dirpath")
def checkpoint_folder_not_writable(ctx: Context) -> Result | None:
    folder = ctx.mktemp("ro_ckpt")
    if ctx.unwritable.make(folder / "ckpt") is None:
        return None
    return ctx.cli("fit", *ctx.fit_flags(folder), cwd=folder, check=False)


@row(1, "logs")
def log_folder_not_writable(ctx: Context) -> Result | None:
    folder = ctx.mktemp("ro_logs")
    if ctx.unwritable.make(folder / "logs") is None:
        return None
    return ctx.cli("fit", *ctx.fit_flags(folder), cwd=folder, check=False)


@row(1, "data")
def dataset_folder_not_writable(ctx: Context) -> Result | None:
    folder = ctx.mktemp("ro_data")
    if ctx.unwritable.make(folder / "data") is None:
        return None
    return ctx.cli(
        "prepare", "--config", ctx.trained.config, "--data.dataset_dir", folder / "data",
        cwd=folder, check=False,
    )  # fmt: skip


@row(1, "loss became nan at step", "--ckpt_path last")
def loss_becomes_nan(ctx: Context) -> Result:
    folder = ctx.mktemp("nan_loss")
    ctx.notes["loss_becomes_nan"] = folder
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--model.learning_rate", "1e6", "--model.min_lr", "0",
        "--trainer.log_every_n_steps", "1", cwd=folder, check=False,
    )  # fmt: skip


@row(1, "weights became NaN or inf by step", "no checkpoint of step", "last good checkpoint: ")
def weights_become_nan_between_log_steps(ctx: Context) -> Result:
    """The loss is checked only every log_every_n_steps; a checkpoint in between is refused.
    The step at which float32 overflows depends on the CPU (AVX-512 or not): the test reads it
    from the message (test_nan_keeps_only_good_checkpoints)."""
    folder = ctx.mktemp("nan_weights")
    ctx.notes["weights_become_nan_between_log_steps"] = folder
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--model.learning_rate", "1e6", "--model.min_lr", "0",
        "--trainer.log_every_n_steps", "50", "--checkpointing.every_n_steps", "2",
        cwd=folder, check=False,
    )  # fmt: skip


@row(1, "could not write checkpoint", "File too large", "ckpt_last_00000005.pt", "intact")
def disk_full_while_writing_a_checkpoint(ctx: Context) -> Result:
    """RLIMIT_FSIZE in the child: writes past 60 kB fail (EFBIG, SIGXFSZ ignored), so the
    step-0 checkpoint (no optimizer state yet, ~40 kB) fits and the step-5 one (~80 kB) not."""
    folder = ctx.mktemp("disk_full")
    ctx.notes["disk_full"] = folder
    return ctx.cli("fit", *ctx.fit_flags(folder), "--trainer.max_steps", "10", cwd=folder,
                   check=False, file_size_limit=60_000)  # fmt: skip


# export and init_from ------------------------------------------------------------------


def export_into(ctx: Context, output: Path | str, cwd: Path, *flags: str) -> Result:
    return ctx.cli(
        "export", "--config", ctx.trained.config, "--data.dataset_dir", ctx.trained.data,
        "--checkpointing.dirpath", ctx.trained.ckpt, "--output", output, *flags, cwd=cwd,
        check=False,
    )  # fmt: skip


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@row(2, "ckpt holds ckpt_best_00000020_", "which export did not write", "earlier export")
def export_force_into_a_checkpoint_folder(ctx: Context) -> Result:
    folder = ctx.notes["export_ckpt"] = ctx.mktemp("export_ckpt")
    shutil.copytree(ctx.trained.ckpt, folder / "ckpt")
    return ctx.cli(
        "export", "--config", ctx.trained.config, "--data.dataset_dir", ctx.trained.data,
        "--checkpointing.dirpath", folder / "ckpt", "--output", folder / "ckpt", "--force",
        cwd=folder, check=False,
    )  # fmt: skip


@row(2, "holds ckpt/ (and 1 more), which export did not write")
def export_force_into_the_working_folder(ctx: Context) -> Result:
    """`--output .` from a run's folder: its checkpoints and dataset must survive."""
    folder = ctx.notes["export_dot"] = ctx.mktemp("export_dot")
    shutil.copytree(ctx.trained.ckpt, folder / "ckpt")
    shutil.copytree(ctx.trained.data, folder / "data")
    ctx.notes["export_dot_before"] = contents(folder)
    return ctx.cli(
        "export", "--config", ctx.trained.config, "--data.dataset_dir", "data",
        "--checkpointing.dirpath", "ckpt", "--output", ".", "--force", cwd=folder, check=False,
    )  # fmt: skip


@row(2, "model.bin is a file", "not even with --force")
def export_over_a_file(ctx: Context) -> Result:
    folder = ctx.notes["export_file"] = ctx.mktemp("export_file")
    (folder / "model.bin").write_bytes(b"my own weights")
    return export_into(ctx, folder / "model.bin", folder, "--force")


@job
def export_force_over_an_earlier_export(ctx: Context) -> tuple[Result, Result, int]:
    folder = ctx.mktemp("export_again")
    ctx.notes["export_again"] = folder / "hf"
    first = export_into(ctx, folder / "hf", folder)
    inode = (folder / "hf" / "model.safetensors").stat().st_ino
    return first, export_into(ctx, folder / "hf", folder, "--force"), inode


_EXPORTED = threading.Lock()


def broken_source(ctx: Context, name: str, edit: Callable[[Path], Any]) -> Result:
    """fit with `model.init_from` a copy of the trained run's Hugging Face folder that `edit`
    broke; `ctx.notes[name]` is the folder, for the check that no checkpoint folder remains."""
    with _EXPORTED:  # the trained run as a Hugging Face folder, exported once
        if "hf" not in ctx.notes:
            hf = ctx.mktemp("exported") / "hf"
            ctx.cli("export", "--config", ctx.trained.config, "--output", hf, cwd=hf.parent)
            ctx.notes["hf"] = hf
    folder = ctx.notes[name] = ctx.mktemp(name)
    shutil.copytree(ctx.notes["hf"], folder / "hf")
    edit(folder / "hf")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--model.init_from", folder / "hf", cwd=folder,
        check=False,
    )  # fmt: skip


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(hf: Path) -> None:
        config = json.loads((hf / "config.json").read_text()) | changes
        config = {key: value for key, value in config.items() if value is not None}
        (hf / "config.json").write_text(json.dumps(config))

    return edit


@row(1, "hf/model.safetensors holds transformer.wte.weight of shape (50, 16)",
     "hf/config.json (", "calls for (50, 32)")  # fmt: skip
def init_from_config_json_disagrees_with_weights(ctx: Context) -> Result:
    name = "init_from_config_json_disagrees_with_weights"
    return broken_source(ctx, name, edit_config(n_embd=32))


@row(1, "hf/model.safetensors has no transformer.h.1.ln_1.weight", "config.json (n_layer 2")
def init_from_config_json_with_more_layers(ctx: Context) -> Result:
    return broken_source(ctx, "init_from_config_json_with_more_layers", edit_config(n_layer=2))


@row(1, "hf/config.json: n_embd is missing")
def init_from_config_json_without_n_embd(ctx: Context) -> Result:
    return broken_source(ctx, "init_from_config_json_without_n_embd", edit_config(n_embd=None))


@row(1, "hf/config.json: not valid JSON")
def init_from_config_json_not_json(ctx: Context) -> Result:
    def edit(hf: Path) -> None:
        (hf / "config.json").write_text('{"n_layer": 1,')

    return broken_source(ctx, "init_from_config_json_not_json", edit)


@row(1, "hf/model.safetensors: not readable", "truncated")
def init_from_truncated_safetensors(ctx: Context) -> Result:
    def edit(hf: Path) -> None:
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[: len(data) // 2])

    return broken_source(ctx, "init_from_truncated_safetensors", edit)


def checkpoint_source(ctx: Context, name: str, nanogpt: bool, **changes: Any) -> Result:
    """fit with `model.init_from` the trained run's last checkpoint, as nanoGPT's ckpt.pt or
    as ours, its model_args changed."""
    folder = ctx.notes[name] = ctx.mktemp(name)
    checkpoint = torch.load(
        ctx.trained.ckpt / "ckpt_last_00000020.pt", map_location="cpu", weights_only=True
    )
    args = checkpoint["ml_playground"]["model_args"] | changes
    if nanogpt:
        weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        checkpoint = {"model": weights, "model_args": args, "iter_num": 20, "config": {}}
    else:
        checkpoint["ml_playground"]["model_args"] = args
    torch.save(checkpoint, folder / "source.pt")
    return ctx.cli(
        "fit", *ctx.fit_flags(folder), "--model.init_from", folder / "source.pt", cwd=folder,
        check=False,
    )  # fmt: skip


@row(1, "source.pt holds transformer.wte.weight of shape (50, 16)", "its model_args (")
def init_from_nanogpt_ckpt_of_another_shape(ctx: Context) -> Result:
    return checkpoint_source(ctx, "init_from_nanogpt_ckpt_of_another_shape", True, n_embd=32)


@row(1, "source.pt has no transformer.h.1.ln_1.weight", "its model_args (n_layer 2")
def init_from_checkpoint_of_another_shape(ctx: Context) -> Result:
    return checkpoint_source(ctx, "init_from_checkpoint_of_another_shape", False, n_layer=2)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_one_clear_line(name: str, runs: JobPool, cli_in_process: Cli) -> None:
    case = ROWS[name]
    if case.in_process:
        result = case.run(dataclasses.replace(runs.context, cli=cli_in_process))
        runs.context.notes.setdefault("in_process", {})[name] = result
    else:
        result = runs[name]
    if result is None:
        pytest.skip("cannot make a read-only folder here (root without mount)")
    if isinstance(result, tuple):
        result = result[0]
    assert_one_error_line(result, case.exit_code, *case.mentions)


# --------------------------------------------------------------------------- row specifics


def test_failed_commands_leave_the_trained_run_untouched(trained: Trained, runs: JobPool) -> None:
    runs.wait_all()
    assert trained.snapshot() == runs.context.notes["before"]


def test_empty_and_short_corpus_write_no_broken_artifacts(runs: JobPool) -> None:
    _, prepare = runs["corpus_shorter_than_a_block"]
    assert "prepare: wrote" in prepare.stdout
    folder = runs.context.notes["short_corpus"]
    assert not (folder / "ckpt").exists()  # refused before anything was written
    runs["empty_corpus"]
    data = runs.context.notes["empty_corpus"] / "data"
    assert not data.exists() or not any(data.iterdir())


def test_refused_settings_write_nothing(runs: JobPool) -> None:
    runs["gpu_recipe_without_a_gpu"]
    assert list(runs.context.notes["gpu"].iterdir()) == []  # no ckpt/, logs/ or lock
    runs["batch_too_large_for_memory"]
    assert not list(runs.context.notes["oom"].rglob("ckpt_*"))  # nothing blocks a rerun
    runs["sample_output_is_a_folder"]
    folder = runs.context.notes["output_folder"]
    assert [p.name for p in folder.iterdir()] == ["out"] and not any((folder / "out").iterdir())


def test_token_ids_outside_the_vocabulary_are_refused(runs: JobPool) -> None:
    assert_one_error_line(runs["token_ids_outside_vocabulary"], 1, "train.bin", "50")


def test_sha256_mismatch_caches_nothing(runs: JobPool) -> None:
    runs["download_sha256_mismatch"]
    cache = runs.context.notes["sha_cache"]
    downloads = [p for p in cache.rglob("*") if p.is_file()]
    # The cache folder also keeps Trainer's signature (configuration/trainer_args.py).
    assert [p.name for p in downloads if not p.name.startswith("trainer-signature-")] == []


def test_malicious_checkpoint_runs_no_code(runs: JobPool) -> None:
    runs["malicious_checkpoint"]
    folder = runs.context.notes["evil"]
    assert not (folder / "pwned").exists()  # refused by weights_only=True: nothing ran
    torch.load(folder / "evil.pt", weights_only=False)  # the file really would run code
    assert (folder / "pwned").exists()


def test_zero_temperature_is_greedy(runs: JobPool) -> None:
    result = runs["zero_temperature"]
    texts = samples(result.stdout)
    assert len(texts) == 3 and len(set(texts)) == 1, texts  # greedy: every sample the same
    assert texts[0].startswith("the ")


def test_top_k_larger_than_the_vocabulary_is_clamped(runs: JobPool) -> None:
    result = runs["top_k_larger_than_vocabulary"]
    texts = samples(result.stdout)
    assert len(texts) == 2 and all(t.startswith("the ") for t in texts)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["loss_becomes_nan", "weights_become_nan_between_log_steps"])
def test_nan_keeps_only_good_checkpoints(name: str, runs: JobPool) -> None:
    runs[name]
    ckpt = runs.context.notes[name] / "ckpt"
    files = ckpt_files(ckpt)
    assert "ckpt_last_00000000.pt" in files, files
    assert all(all_finite(ckpt / name) for name in files), files
    assert leftovers(ckpt) == [] and not (ckpt / LOCK_FILENAME).exists()


def test_nan_weights_name_the_step_refused_and_the_good_checkpoint_kept(runs: JobPool) -> None:
    """Whatever step the weights overflow at on this CPU, the message names it truthfully."""
    line = assert_one_error_line(runs["weights_become_nan_between_log_steps"], 1)
    found = re.search(r"by step (\d+); no checkpoint of step (\d+) was written \(last good "
                      r"checkpoint: (.+?ckpt_last_\d{8}\.pt)\)", line)  # fmt: skip
    assert found, line
    step, good = int(found[1]), Path(found[3])
    ckpt = runs.context.notes["weights_become_nan_between_log_steps"] / "ckpt"
    assert int(found[2]) == step and not list(ckpt.glob(f"ckpt_*_{step:08d}*"))
    assert good.parent == ckpt and good.is_file() and all_finite(good)
    assert last_steps(ckpt)[-1] == int(good.stem.rsplit("_", 1)[1]) < step


def test_fast_dev_run_writes_nothing_and_the_next_fit_runs(runs: JobPool) -> None:
    smoke, real, again, before = runs["fast_dev_run_then_fit"]
    assert runs.context.notes["fast_dev_run_written"] == []  # no checkpoint, log or lock
    assert "no checkpoint or log was written" in smoke.stdout + again.stdout
    assert "ckpt_last_00000005.pt" in real.stdout
    folder = Path(real.args[real.args.index("--checkpointing.dirpath") + 1])
    assert harness.snapshot(folder) == before


def test_a_logger_that_cannot_be_used_writes_nothing(runs: JobPool) -> None:
    runs["logger_package_not_installed"]
    assert list(runs.context.notes["wandb"].iterdir()) == []


def test_a_misnamed_checkpoint_is_refused_before_anything_changes(runs: JobPool) -> None:
    runs["last_named_after_a_later_step"]
    ckpt = runs.context.notes["misnamed_last"] / "ckpt"
    assert harness.snapshot(ckpt) == runs.context.notes["misnamed_last_files"]


def test_disk_full_keeps_earlier_checkpoints_and_no_partial_file(runs: JobPool) -> None:
    runs["disk_full_while_writing_a_checkpoint"]
    ckpt = runs.context.notes["disk_full"] / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt_last_00000000.pt"]
    torch.load(ckpt / "ckpt_last_00000000.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "name", ["truncated_train_bin", "swapped_train_and_val_bin", "train_bin_rewritten_as_uint32"]
)
def test_data_that_meta_pkl_contradicts_is_refused_before_any_checkpoint(
    name: str, runs: JobPool
) -> None:
    runs[name]
    folder = runs.context.notes[name]
    assert not (folder / "ckpt").exists()  # no checkpoint, no lock: a rerun is not blocked
    assert not (folder / "logs").exists()


def test_tensorboard_hint_can_be_pasted_into_a_shell(runs: JobPool) -> None:
    result = runs["log_dir_with_a_space"]
    logs = runs.context.notes["log_dir_with_a_space"] / "my logs" / "tiny"
    hints = [line for line in result.stdout.splitlines() if line.startswith("tensorboard ")]
    assert [shlex.split(line) for line in hints] == [["tensorboard", "--logdir", str(logs)]]


def test_export_force_deletes_and_renames_nothing_it_did_not_write(
    trained: Trained, runs: JobPool
) -> None:
    runs["export_force_into_a_checkpoint_folder"]
    notes = runs.context.notes
    assert contents(notes["export_ckpt"] / "ckpt") == contents(trained.ckpt)  # every byte kept
    runs["export_force_into_the_working_folder"]
    assert contents(notes["export_dot"]) == notes["export_dot_before"]
    runs["export_over_a_file"]
    assert [p.name for p in notes["export_file"].iterdir()] == ["model.bin"]  # not renamed
    assert (notes["export_file"] / "model.bin").read_bytes() == b"my own weights"


def test_export_force_replaces_an_earlier_export(runs: JobPool) -> None:
    first, again, inode = runs["export_force_over_an_earlier_export"]
    assert first.returncode == again.returncode == 0, (first.stderr, again.stderr)
    hf = runs.context.notes["export_again"]
    assert sorted(p.name for p in hf.iterdir()) == [
        "char_vocab.json", "config.json", "model.safetensors",
    ]  # fmt: skip
    assert (hf / "model.safetensors").stat().st_ino != inode  # written anew
    assert [p.name for p in hf.parent.iterdir()] == ["hf"]  # no temporary or set-aside folder


@pytest.mark.parametrize(
    "name",
    [
        "init_from_config_json_disagrees_with_weights", "init_from_config_json_with_more_layers",
        "init_from_config_json_without_n_embd", "init_from_config_json_not_json",
        "init_from_truncated_safetensors", "init_from_nanogpt_ckpt_of_another_shape",
        "init_from_checkpoint_of_another_shape",
    ],
)  # fmt: skip
def test_a_broken_init_from_source_leaves_no_checkpoint_folder(name: str, runs: JobPool) -> None:
    runs[name]
    folder = runs.context.notes[name]
    assert not (folder / "ckpt").exists()  # an empty one would only confuse the rerun
    assert not (folder / "logs").exists()


# --------------------------------------------------------------------------- kill, lock, resume


@pytest.mark.cold
@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_ctrl_c_during_start_up_is_one_line(trained: Trained, tmp_path: Path, delay: float) -> None:
    """The console script itself, cold (the test server's processes have Lightning imported
    already): a Ctrl-C while it imports Lightning and torch or parses ends like one later on."""
    script = Path(sys.executable).with_name("ml-playground")
    process = subprocess.Popen(
        [script, "fit", *trained.fit_flags(tmp_path)], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # As in a terminal: a runner in the background (nohup, `cmd &`) ignores SIGINT, and
        # the script would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1].startswith("ml-playground: interrupted (Ctrl-C)"), stderr
    assert "Traceback" not in stderr


@pytest.mark.cold
def test_random_sigkills_then_resume_with_lock(tmp_path: Path, make_experiment, cli) -> None:
    """Three runs killed with SIGKILL at random moments, each resumed; a second fit is refused
    while one runs; the stale lock a killed run leaves does not block the next one."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    ckpt = tmp_path / "ckpt"
    every = ("--checkpointing.every_n_steps", "2", "--trainer.val_check_interval", "3", *QUIET)
    rng = random.Random(8)
    killed_at = -1
    for attempt in range(3):
        resume = () if attempt == 0 else ("--ckpt_path", "last")
        process = start_fit(cli, config, *resume, "--trainer.max_steps", "100000", *every)
        try:
            wait_for(lambda since=killed_at: any(s > since for s in last_steps(ckpt)), process, 120)
            if attempt == 0:
                busy = cli("fit", "--config", config, "--ckpt_path", "last", *every,
                           cwd=tmp_path, check=False)  # fmt: skip
                assert_one_error_line(busy, 1, "in use by another fit", str(process.pid))
            time.sleep(rng.uniform(0.0, 1.5))  # between two writes, or in the middle of one
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert MarkerSoftFileLock(ckpt / LOCK_FILENAME).owner.pid == process.pid  # stale now
        for path in ckpt.glob("ckpt_*.pt"):  # every file under a final name is whole
            torch.load(path, map_location="cpu", weights_only=True)
        killed_at = max(last_steps(ckpt))
    final = killed_at + 4
    cli("fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", str(final),
        *every, cwd=tmp_path)  # fmt: skip
    assert leftovers(ckpt) == []
    assert not (ckpt / LOCK_FILENAME).exists()
    assert last_steps(ckpt) == [final - 2, final]  # keep.last = 2, every 2 steps
    best = [p for p in ckpt.iterdir() if p.name.startswith("ckpt_best_")]
    assert len(best) == 1  # keep.best = 1, also when a kill fell between a best and its rotation
    # A kill between a step's best and its last leaves a best newer than the newest last: the
    # resume from `last` keeps it in the best window (no branch folder).
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(ckpt_files(ckpt))
    last = torch.load(ckpt / f"ckpt_last_{final:08d}.pt", map_location="cpu", weights_only=True)
    assert last["global_step"] == final
