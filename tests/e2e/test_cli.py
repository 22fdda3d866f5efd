"""End-to-end tests of the console script: `python -m ml_playground ...` in real subprocesses.

Every run uses the tiny experiment of conftest.py in its own temporary folder. Starting Python
with torch and Lightning costs several seconds per command, so the module trains one run up
front (`trained`) and starts the independent commands of all tests at once in a small pool
(`jobs`, as many workers as CPUs); each test then checks the outcome of its own commands.
The user errors, whose outcome is one line and an exit code, run in-process instead
(`cli_in_process`).
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from e2e import harness
from e2e.harness import (
    BEST_RE,
    LAST_RE,
    QUIET,
    SAMPLE_ENV,
    TRAIN_ENV,
    Cli,
    JobPool,
    Result,
    Trained,
    assert_one_error_line,
    samples,
    scalars,
    snapshot,
)

PROMPT = "the "  # sample.prompt of the tiny experiment


# --------------------------------------------------------------------------- helpers


def files(folder: Path, kind: str) -> list[str]:
    """Sorted names of the `last` or `best` checkpoints in a folder."""
    pattern = LAST_RE if kind == "last" else BEST_RE
    prefix = f"ckpt_{kind}_"
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix))
    assert all(pattern.fullmatch(name) for name in names), names
    return names


def last(step: int) -> str:
    return f"ckpt_last_{step:08d}.pt"


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --------------------------------------------------------------------------- fixtures


Context = harness.Context
JOBS = JobPool()
job = JOBS.job


@pytest.fixture(scope="module")
def jobs(trained, cli, tmp_path_factory, make_experiment) -> Iterator[JobPool]:
    def mktemp(name: str) -> Path:
        return tmp_path_factory.mktemp(name).resolve()

    context = Context(trained=trained, cli=cli, mktemp=mktemp, make_experiment=make_experiment)
    longest = ("resume_and_validate", "loop_fresh", "print_config_round_trip")
    with JOBS.running(context, first=longest) as pool:
        yield pool


# --------------------------------------------------------------------------- prepare, fit, sample


@job
def sample_trained(ctx: Context) -> Result:
    return ctx.cli("sample", "--config", ctx.trained.config, cwd=ctx.trained.folder)


def test_prepare_fit_sample_end_to_end(trained: Trained, jobs: JobPool) -> None:
    assert "prepare: wrote" in trained.prepare.stdout
    for name in ("train.bin", "val.bin", "meta.pkl"):
        assert (trained.data / name).is_file()
    out = trained.fit.stdout
    assert re.search(r"^best val/loss: \d+\.\d{4}  .*ckpt_best_", out, re.M), out
    assert f"last checkpoint: {trained.ckpt / last(20)}" in out
    assert "tensorboard --logdir" in out

    result = jobs["sample_trained"]
    texts = samples(result.stdout)
    assert len(texts) == 2  # sample.num_samples
    for text in texts:
        assert text.startswith(PROMPT)
        assert len(text) == len(PROMPT) + 24  # char tokens: sample.max_new_tokens characters
    assert "Traceback" not in result.stderr


def test_issue_scenario_checkpoints_and_tensorboard(trained: Trained) -> None:
    # fit --trainer.max_steps 20 --trainer.val_check_interval 10 --checkpointing.keep.last 2
    assert files(trained.ckpt, "last") == [last(15), last(20)]
    best = files(trained.ckpt, "best")
    assert len(best) == 1  # keep.best = 1
    assert best[0].startswith(("ckpt_best_00000010_", "ckpt_best_00000020_"))
    # Only managed files: no temporary files or anything else.
    assert sorted(p.name for p in trained.ckpt.iterdir()) == sorted([*best, last(15), last(20)])

    checkpoint = torch.load(trained.ckpt / last(20), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 20
    section = checkpoint["ml_playground"]
    assert section["meta"]["vocab_size"] > 0
    assert tomllib.loads(section["config_toml"])["trainer"]["max_steps"] == 20
    # The best of step 20 (if any) was written before the last of step 20, so resuming from
    # ckpt_last_00000020.pt starts with the best score reached so far.
    state = checkpoint["callbacks"]["GPTCheckpoint"]
    best_value = float(re.search(r"=(\d+\.\d{4})\.pt$", best[0]).group(1))
    assert float(state["best_model_score"]) == pytest.approx(best_value, abs=5e-5)

    assert (trained.log_dir / "config.toml").is_file()
    assert list(trained.log_dir.glob("events.out.tfevents.*"))
    logged = scalars(trained.log_dir)
    for tag in ("train/loss", "val/loss", "lr"):
        assert logged.get(tag), f"{tag} missing from {sorted(logged)}"
    assert len(logged["val/loss"]) == 2  # validations at steps 10 and 20
    assert len(logged["train/loss"]) == 20  # log_every_n_steps = 1


@job
def loop_fresh(ctx: Context) -> tuple[Path, Result]:
    folder = ctx.mktemp("loop")
    config = ctx.make_experiment(folder)
    steps = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3"]
    result = ctx.cli("loop", "--config", config, *steps, *QUIET, cwd=folder)
    return folder, result


def test_loop_prepares_fits_and_ends_with_samples(jobs: JobPool) -> None:
    folder, result = jobs["loop_fresh"]
    out = result.stdout
    board = f"tensorboard --logdir {folder / 'logs' / 'tiny'}\n"
    assert out.index("prepare: wrote") < out.index("best val/loss") < out.index(board)
    texts = samples(out[out.index(board) + len(board) :])
    assert len(texts) == 2
    assert all(text.startswith(PROMPT) for text in texts)
    assert files(folder / "ckpt", "last") == [last(5), last(6)]  # every_n_steps = 5
    assert (folder / "data" / "meta.pkl").is_file()


# --------------------------------------------------------------------------- printed / logged config


PATH_KEYS = (
    ("log_dir",),
    ("data", "dataset_dir"),
    ("checkpointing", "dirpath"),
    ("prepare", "source"),
)


@job
def print_config_round_trip(ctx: Context) -> tuple[Path, Result, Result]:
    first = ctx.cli("fit", "--config", ctx.trained.config, "--print_config", cwd=ctx.trained.folder)
    elsewhere = ctx.mktemp("printed")
    printed = elsewhere / "sub" / "printed.toml"
    printed.parent.mkdir()
    printed.write_text(first.stdout, encoding="utf-8")
    second = ctx.cli("fit", "--config", printed, "--print_config", cwd=elsewhere)
    return elsewhere, first, second


def test_print_config_is_toml_that_config_accepts(trained: Trained, jobs: JobPool) -> None:
    elsewhere, first, second = jobs["print_config_round_trip"]
    assert second.stdout == first.stdout
    data = tomllib.loads(first.stdout)
    for keys in PATH_KEYS:
        value = data
        for key in keys:
            value = value[key]
        assert Path(value).is_absolute(), f"{'.'.join(keys)} = {value!r} is relative"
    assert same_path(data["data"]["dataset_dir"], trained.data)
    assert same_path(data["checkpointing"]["dirpath"], trained.ckpt)
    assert same_path(data["log_dir"], trained.folder / "logs")
    assert data["model"]["n_layer"] == 1
    assert data["trainer"]["max_steps"] == 20
    # Printing writes nothing.
    assert sorted(p.name for p in elsewhere.rglob("*")) == ["printed.toml", "sub"]


@job
def logged_config_fed_back(ctx: Context) -> Result:
    logged = ctx.trained.log_dir / "config.toml"
    return ctx.cli("fit", "--config", logged, "--print_config", cwd=ctx.mktemp("fed_back"))


def test_logged_config_can_be_fed_back(trained: Trained, jobs: JobPool) -> None:
    result = jobs["logged_config_fed_back"]
    logged = (trained.log_dir / "config.toml").read_text(encoding="utf-8")
    assert result.stdout == logged
    data = tomllib.loads(logged)
    assert data["checkpointing"]["keep"]["last"] == 2
    assert data["trainer"]["val_check_interval"] == 10


# --------------------------------------------------------------------------- user errors


@dataclass
class ErrorCase:
    args: tuple[str, ...]
    mentions: tuple[str, ...]
    exit_code: int | None = 2  # None: any non-zero code
    env: dict[str, str] = field(default_factory=dict)


def error_cases(folder: Path, trained: Trained) -> dict[str, ErrorCase]:
    """The cases, with the files they need written into `folder`."""
    text = trained.config.read_text(encoding="utf-8")
    (folder / "typo.toml").write_text(
        text.replace("n_layer = 1\n", "n_layer = 1\nn_lyer = 2\n"), encoding="utf-8"
    )
    (folder / "wrong_type.toml").write_text(
        text.replace("n_layer = 1\n", 'n_layer = "two"\n'), encoding="utf-8"
    )
    (folder / "latin1.toml").write_bytes(("# café\n" + text).encode("latin-1"))
    (folder / "empty_ckpt").mkdir()
    whole = (trained.ckpt / last(20)).read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    exp = str(trained.config)
    return {
        "unknown_key": ErrorCase(("fit", "--config", "typo.toml"), ("typo.toml", "n_lyer")),
        "unknown_key_elsewhere": ErrorCase(  # prepare validates [model] too
            ("prepare", "--config", "typo.toml"), ("typo.toml", "model.n_lyer")
        ),
        "wrong_type": ErrorCase(
            ("fit", "--config", "wrong_type.toml"), ("wrong_type.toml", "model.n_layer")
        ),
        "negative_keep": ErrorCase(
            ("fit", "--config", exp, "--checkpointing.keep.last", "-1"),
            ("checkpointing.keep.last",),
        ),
        "invalid_env_json": ErrorCase(
            ("fit", "--config", exp), (TRAIN_ENV,), env={TRAIN_ENV: '{"trainer": {"max_steps": 5}'}
        ),
        "env_unknown_key": ErrorCase(
            ("fit", "--config", exp),
            (TRAIN_ENV, "n_lyer"),
            env={TRAIN_ENV: '{"model": {"n_lyer": 2}}'},
        ),
        "env_bad_value": ErrorCase(
            ("sample", "--config", exp),
            (SAMPLE_ENV, "sample.num_samples"),
            env={SAMPLE_ENV: '{"sample": {"num_samples": 0}}'},
        ),
        "env_not_an_object": ErrorCase(
            ("sample", "--config", exp), (SAMPLE_ENV,), env={SAMPLE_ENV: "[1, 2]"}
        ),
        "no_prepared_data": ErrorCase(
            (
                "fit",
                "--config",
                exp,
                "--data.dataset_dir",
                "nodata",
                "--checkpointing.dirpath",
                "nockpt",
                "--log_dir",
                "nologs",
            ),
            ("nodata", "meta.pkl"),
            exit_code=None,
        ),
        "no_checkpoint": ErrorCase(
            ("sample", "--config", exp, "--checkpointing.dirpath", "empty_ckpt"),
            ("empty_ckpt",),
            exit_code=None,
        ),
        "prompt_outside_vocabulary": ErrorCase(
            ("sample", "--config", exp, "--sample.prompt", "the €"), ("€",), exit_code=None
        ),
        "fresh_fit_over_checkpoints": ErrorCase(
            ("fit", "--config", exp, *QUIET),
            (str(trained.ckpt), "--ckpt_path last"),
            exit_code=None,
        ),
        "resume_with_other_shape": ErrorCase(
            ("fit", "--config", exp, "--ckpt_path", "last", "--model.n_layer", "2", *QUIET),
            ("model.n_layer", last(20)),
            exit_code=None,
        ),
        "truncated_checkpoint": ErrorCase(
            ("sample", "--config", exp, "--sample.ckpt", "truncated.pt"),
            ("truncated.pt",),
            exit_code=None,
        ),
        "missing_config": ErrorCase(("fit", "--config", "nope.toml"), ("nope.toml",)),
        "bad_flag_value": ErrorCase(
            ("fit", "--config", exp, "--trainer.max_steps", "abc"),
            ("command line: trainer.max_steps", "abc"),
        ),
        "bad_env_trainer_value": ErrorCase(
            ("fit", "--config", exp),
            (f"{TRAIN_ENV}: trainer.max_steps", "abc"),
            env={TRAIN_ENV: '{"trainer": {"max_steps": "abc"}}'},
        ),
        "bad_file_value_with_flags": ErrorCase(
            ("fit", "--config", "wrong_type.toml", "--trainer.max_steps", "5"),
            ("wrong_type.toml: model.n_layer",),
        ),
        "non_utf8_config": ErrorCase(("fit", "--config", "latin1.toml"), ("latin1.toml", "UTF-8")),
    }


ERROR_NAMES = (
    "unknown_key",
    "unknown_key_elsewhere",
    "wrong_type",
    "negative_keep",
    "invalid_env_json",
    "env_unknown_key",
    "env_bad_value",
    "env_not_an_object",
    "no_prepared_data",
    "no_checkpoint",
    "prompt_outside_vocabulary",
    "fresh_fit_over_checkpoints",
    "resume_with_other_shape",
    "truncated_checkpoint",
    "missing_config",
    "non_utf8_config",
    "bad_flag_value",
    "bad_env_trainer_value",
    "bad_file_value_with_flags",
)


@dataclass
class ErrorSetup:
    """The folder the error cases run in, what was written there first, the cases, and the
    outcomes of those run so far (each case runs once, in the first test that needs it)."""

    folder: Path
    written: set[str]
    cases: dict[str, ErrorCase]
    results: dict[str, Result] = field(default_factory=dict)

    def result(self, name: str, cli_in_process: Cli) -> Result:
        if name not in self.results:
            case = self.cases[name]
            self.results[name] = cli_in_process(
                *case.args, cwd=self.folder, env=case.env, check=False
            )
        return self.results[name]


@pytest.fixture(scope="module")
def errors(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> ErrorSetup:
    folder = tmp_path_factory.mktemp("errors").resolve()
    cases = error_cases(folder, trained)
    assert sorted(cases) == sorted(ERROR_NAMES)
    return ErrorSetup(folder, {str(p.relative_to(folder)) for p in folder.rglob("*")}, cases)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_user_error_is_one_clear_line(name: str, errors: ErrorSetup, cli_in_process: Cli) -> None:
    case = errors.cases[name]
    assert_one_error_line(errors.result(name, cli_in_process), case.exit_code, *case.mentions)


def test_prompt_error_names_the_setting(errors: ErrorSetup, cli_in_process: Cli) -> None:
    result = errors.result("prompt_outside_vocabulary", cli_in_process)
    assert result.returncode != 0
    assert "sample.prompt" in result.stderr


def test_user_errors_damage_and_create_nothing(
    trained: Trained, errors: ErrorSetup, cli_in_process: Cli
) -> None:
    results = [errors.result(name, cli_in_process) for name in ERROR_NAMES]
    assert len(results) == len(ERROR_NAMES)
    # The failed runs created no folders (data, checkpoints, logs) where they ran ...
    assert {str(p.relative_to(errors.folder)) for p in errors.folder.rglob("*")} == errors.written
    # ... and the fresh fit into a folder with checkpoints left the earlier run untouched.
    ckpt_now = {k: v for k, v in snapshot(trained.folder).items() if k.startswith("ckpt")}
    ckpt_then = {k: v for k, v in trained.before.items() if k.startswith("ckpt")}
    assert ckpt_now == ckpt_then
    assert sorted(p.name for p in (trained.folder / "logs" / "tiny").iterdir()) == ["version_0"]


# --------------------------------------------------------------------------- environment overrides


@job
def fit_with_train_env(ctx: Context) -> tuple[Path, Result]:
    folder = ctx.mktemp("train_env")
    env = {
        TRAIN_ENV: json.dumps({"trainer": {"max_steps": 5}, "checkpointing": {"keep": {"last": 1}}})
    }
    result = ctx.cli("fit", *ctx.trained.fit_flags(folder), cwd=folder, env=env)
    return folder, result


def test_train_env_overrides_change_fit(jobs: JobPool) -> None:
    folder, result = jobs["fit_with_train_env"]
    assert files(folder / "ckpt", "last") == [last(5)]
    assert f"last checkpoint: {folder / 'ckpt' / last(5)}" in result.stdout
    config = tomllib.loads((folder / "logs" / "tiny" / "version_0" / "config.toml").read_text())
    assert config["trainer"]["max_steps"] == 5
    assert config["checkpointing"]["keep"]["last"] == 1


@job
def precedence(ctx: Context) -> Result:
    env = {
        TRAIN_ENV: json.dumps(
            {"trainer": {"max_steps": 5}, "checkpointing": {"keep": {"last": 1}}}
        ),
        SAMPLE_ENV: json.dumps({"sample": {"num_samples": 5}}),
    }
    return ctx.cli(
        "fit",
        "--config",
        ctx.trained.config,
        "--trainer.max_steps",
        "7",
        "--print_config",
        cwd=ctx.mktemp("precedence"),
        env=env,
    )


def test_flags_beat_env_and_sample_env_leaves_fit_alone(jobs: JobPool) -> None:
    data = tomllib.loads(jobs["precedence"].stdout)
    assert data["trainer"]["max_steps"] == 7  # flag beats environment
    assert data["checkpointing"]["keep"]["last"] == 1  # environment beats file
    assert data["checkpointing"]["keep"]["best"] == 1  # file
    assert data["sample"]["num_samples"] == 2  # the sample variable is not read by fit


@job
def sample_with_sample_env(ctx: Context) -> Result:
    env = {SAMPLE_ENV: json.dumps({"sample": {"num_samples": 3, "max_new_tokens": 10}})}
    return ctx.cli("sample", "--config", ctx.trained.config, cwd=ctx.mktemp("sample_env"), env=env)


def test_sample_env_overrides_change_sample(jobs: JobPool) -> None:
    texts = samples(jobs["sample_with_sample_env"].stdout)
    assert len(texts) == 3
    assert all(text.startswith(PROMPT) and len(text) == len(PROMPT) + 10 for text in texts)


# --------------------------------------------------------------------------- resume, validate, alias


@job
def resume_and_validate(ctx: Context) -> tuple[Path, Result, Result]:
    folder = ctx.mktemp("resume")
    shutil.copytree(ctx.trained.ckpt, folder / "ckpt")
    flags = ctx.trained.fit_flags(folder)
    fit = ctx.cli("fit", *flags, "--ckpt_path", "last", "--trainer.max_steps", "30", cwd=folder)
    validate = ctx.cli(
        "validate",
        "--config",
        ctx.trained.config,
        "--data.dataset_dir",
        ctx.trained.data,
        "--checkpointing.dirpath",
        folder / "ckpt",
        "--log_dir",
        folder / "validate_logs",
        *QUIET,
        cwd=folder,
    )
    return folder, fit, validate


def test_fit_resumes_from_last_and_validate_reports_val_loss(jobs: JobPool) -> None:
    folder, fit, validate = jobs["resume_and_validate"]
    ckpt = folder / "ckpt"
    assert f"last checkpoint: {ckpt / last(30)}" in fit.stdout
    assert files(ckpt, "last") == [last(25), last(30)]
    checkpoint = torch.load(ckpt / last(30), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 30
    # The resumed run trained steps 21..30 only: it continued from ckpt_last_00000020.pt.
    steps = [step for step, _ in scalars(folder / "logs" / "tiny" / "version_0")["train/loss"]]
    assert steps == list(range(21, 31)), steps

    best = files(ckpt, "best")
    assert len(best) == 1
    match = re.search(r"^val/loss: (\d+\.\d{4})$", validate.stdout, re.M)
    assert match, validate.stdout
    # validate evaluates the best checkpoint on the same fixed windows that chose it.
    stored = float(re.search(r"=(\d+\.\d{4})\.pt$", best[0]).group(1))
    assert abs(float(match.group(1)) - stored) <= 2e-4


@job
def train_alias(ctx: Context) -> tuple[Path, Result]:
    folder = ctx.mktemp("train_alias")
    steps = ["--trainer.max_steps", "5", "--trainer.val_check_interval", "5"]
    result = ctx.cli("train", *ctx.trained.fit_flags(folder), *steps, cwd=folder)
    return folder, result


def test_train_is_fit(jobs: JobPool) -> None:
    folder, result = jobs["train_alias"]
    assert files(folder / "ckpt", "last") == [last(0), last(5)]
    assert len(files(folder / "ckpt", "best")) == 1
    assert "best val/loss" in result.stdout
    assert (folder / "logs" / "tiny" / "version_0" / "config.toml").is_file()


# --------------------------------------------------------------------------- help


def test_version(run_cli) -> None:
    out = run_cli("--version").stdout
    assert re.fullmatch(r"ml-playground \S+ \(torch \S+, lightning \S+\)\n", out), out


def test_help_lists_commands_and_settings(run_cli) -> None:
    top = run_cli("--help")
    for command in ("prepare", "fit", "train", "validate", "sample", "loop", "export"):
        assert re.search(rf"^\s+{command}\s", top.stdout, re.M), top.stdout
    fit = run_cli("fit", "--help")
    for option in (
        "--config",
        "--print_config",
        "--ckpt_path",
        "--model.n_layer",
        "--data.dataset_dir",
        "--checkpointing.keep.last",
        "--trainer.",
        TRAIN_ENV,
    ):
        assert option in fit.stdout, option
