"""ml-playground against karpathy's nanoGPT on this machine: whole processes, start-up included.

    uv run python benchmarks/versus_nanogpt.py                 # the real run (about 10 min, 2 cores)
    uv run python benchmarks/versus_nanogpt.py --quick         # 60 steps: checks the script only
    uv run python benchmarks/versus_nanogpt.py --only race --config configs/shakespeare_char.toml
    uv run python benchmarks/versus_nanogpt.py --only race --rounds 3   # the order rotated each

Defaults: nanoGPT at ../nanogpt, the corpus at ../shared/data/tinyshakespeare/input.txt (both
relative to the repository), configs/shakespeare_char.toml and
configs/shakespeare_char_muon.toml (a missing config is skipped with a note).

nanoGPT is never modified: it is copied into the work folder (`--work DIR`, or a temporary
folder removed at the end) and run there with this interpreter (`sys.executable`, which has
torch, numpy and tiktoken). ml-playground runs through the same interpreter's `ml-playground`
console script, not through `uv run`. Every command runs on the CPU (CUDA_VISIBLE_DEVICES="").
Data preparation (nanoGPT's prepare.py, `ml-playground prepare`) happens before the timings.

Three parts (`--only` picks one), each printed as a markdown table for docs/benchmarks.md:

race      time to loss: nanoGPT's README CPU command (4 × 128, block 64, 2000 iterations) against
          `ml-playground fit` with each `--config`: steps and seconds from launch to the first
          val/loss ≤ `--target`, median ms/step, best val/loss, whole process seconds, and both
          against nanoGPT's whole process (goal: seconds to target ≤ 0.5× nanoGPT's whole run).
          `--rounds N` runs them all N times, each first in some round (this machine's speed
          drifts by several percent over minutes), and adds the medians over the rounds.
sampling  3 samples × 200 tokens from a 6 × 384 model (block 256, the GPU recipe's shape, char
          vocabulary), whole processes: nanoGPT's sample.py against `ml-playground sample`
          (goal: ≤ 0.5×). The checkpoints come from one-step trainings of each tool.
startup   `ml-playground fit --help` against a bare `python -c "import lightning.pytorch"`
          (goal: ≤ 1.15×).
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import functools
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from time_to_loss import Point, first_reaching, read_scalars

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ML_PLAYGROUND = Path(PYTHON).parent / "ml-playground"
OURS = [str(ML_PLAYGROUND)] if ML_PLAYGROUND.exists() else [PYTHON, "-m", "ml_playground"]

# nanoGPT's README, "I only have a macbook": the CPU recipe, verbatim.
NANOGPT_CPU_RECIPE = [
    "train.py",
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
QUICK_STEPS, QUICK_EVERY = 60, 20
NANOGPT_QUICK = [f"--max_iters={QUICK_STEPS}", f"--eval_interval={QUICK_EVERY}"]
OURS_QUICK = [
    "--trainer.max_steps",
    str(QUICK_STEPS),
    "--trainer.val_check_interval",
    str(QUICK_EVERY),
]
GPU_RECIPE = REPO / "configs" / "shakespeare_char_gpu.toml"  # 6 × 384, block 256
NUM_SAMPLES, NEW_TOKENS = 3, 200

STEP_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")


@dataclass
class Process:
    """A finished command: its launch (Unix time), whole wall time and timestamped output."""

    command: list[str]
    launch: float
    seconds: float
    lines: list[tuple[float, str]]  # (seconds since launch, line)
    log: Path


@dataclass
class RaceRow:
    """One run of the race: its evaluations (step, seconds since launch, val/loss)."""

    name: str
    process: Process
    evaluations: list[Point]  # wall_time holds seconds since launch
    ms_per_step: float
    note: str = ""


@dataclass
class Timings:
    """Repeated whole-process wall times of one command."""

    name: str
    command: list[str]
    seconds: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def child_env() -> dict[str, str]:
    """The environment of every command: output unbuffered (its lines are timestamped as they
    come), the CPU only."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def show(command: list[str], cwd: Path) -> None:
    """Print a command as it is run, with its working folder."""
    print(f"$ cd {shlex.quote(str(cwd))} && {shlex.join(command)}", flush=True)


def run_streaming(command: list[str], cwd: Path, log: Path) -> Process:
    """Run a command to the end, timestamping each line of its output (stdout and stderr
    together, also written to `log`) against the launch; exit on failure."""
    show(command, cwd)
    lines: list[tuple[float, str]] = []
    launch = time.time()
    start = time.perf_counter()
    with (
        log.open("w") as out,
        subprocess.Popen(
            command,
            cwd=cwd,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            out.write(line)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"{tail}\nexit {code} after {seconds:.1f} s; whole output: {log}")
    print(f"  {seconds:.1f} s, output: {log}", flush=True)
    return Process(command, launch, seconds, lines, log)


def run_quietly(command: list[str], cwd: Path) -> float:
    """Run a command to the end and return its whole wall time; exit on failure."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} (in {cwd}) failed:\n{done.stdout}{done.stderr}")
    return seconds


def machine() -> str:
    """CPU model, cores, Python, torch and Lightning versions, date."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        re.findall(r"^model name\s*:\s*(.*)$", cpuinfo.read_text(), re.M)
        if cpuinfo.exists()
        else []
    )
    cpu = names[0] if names else platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("torch", "lightning", "numpy")
    )
    return (
        f"{cpu}, {cores} cores usable ({os.cpu_count()} online), {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}, {versions}, "
        f"{datetime.date.today().isoformat()}"
    )


def load() -> str:
    """The 1-minute load average: other work on the machine makes every figure noisier."""
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; every column but the first is right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def short(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# --- set-up -------------------------------------------------------------------------------


def copy_nanogpt(source: Path, corpus: Path, work: Path) -> Path:
    """Copy nanoGPT into the work folder, place the corpus as its
    data/shakespeare_char/input.txt (so prepare.py does not download) and run its prepare.py."""
    copy = work / "nanogpt"
    if not copy.exists():
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".git"))
        shutil.copyfile(corpus, copy / "data" / "shakespeare_char" / "input.txt")
        run_streaming(
            [PYTHON, "data/shakespeare_char/prepare.py"], copy, work / "nanogpt_prepare.log"
        )
    return copy


def prepare_ours(config: Path, corpus: Path, work: Path) -> Path:
    """`ml-playground prepare` for a config into the work folder; returns the dataset folder."""
    dataset = work / "datasets" / config.stem
    if not (dataset / "meta.pkl").exists():
        command = [*OURS, "prepare", "--config", str(config), "--prepare.source", str(corpus)]
        run_streaming(
            [*command, "--data.dataset_dir", str(dataset)],
            work,
            work / f"prepare_{config.stem}.log",
        )
    return dataset


# --- part 1: the race ---------------------------------------------------------------------


def race_nanogpt(copy: Path, work: Path, quick: bool, tag: str) -> RaceRow:
    """nanoGPT's README CPU command; evaluations and per-iteration times from its output."""
    command = [PYTHON, *NANOGPT_CPU_RECIPE, *(NANOGPT_QUICK if quick else [])]
    process = run_streaming(command, copy, work / f"race_nanogpt{tag}.log")
    evaluations, iterations = [], {}
    for seconds, line in process.lines:
        if match := STEP_LINE.match(line):
            evaluations.append(Point(int(match[1]), seconds, float(match[3])))
        elif match := ITER_LINE.match(line):
            iterations[int(match[1])] = float(match[3])
    if not evaluations or not iterations:
        raise SystemExit(f"no 'step'/'iter' lines in nanoGPT's output: {process.log}")
    evaluated = {point.step for point in evaluations}  # those iterations' times include it
    times = [ms for step, ms in iterations.items() if step not in evaluated]
    every = evaluations[1].step - evaluations[0].step if len(evaluations) > 1 else 0
    return RaceRow(
        "nanoGPT `train.py` (README CPU command)",
        process,
        evaluations,
        statistics.median(times),
        f"evaluates every {every} steps: mean of 20 random batches of each split",
    )


def race_ours(config: Path, corpus: Path, work: Path, quick: bool, tag: str) -> RaceRow:
    """`ml-playground fit` in a fresh run folder; val/loss and tokens/s from TensorBoard."""
    dataset = prepare_ours(config, corpus, work)
    folder = work / f"race_{config.stem}{tag}"
    folder.mkdir()
    command = [*OURS, "fit", "--config", str(config), "--prepare.source", str(corpus)]
    command += ["--data.dataset_dir", str(dataset), "--log_dir", "logs"]
    command += ["--checkpointing.dirpath", "checkpoints", *(OURS_QUICK if quick else [])]
    process = run_streaming(command, folder, work / f"race_{config.stem}{tag}.log")
    run, scalars = read_scalars(folder / "logs", ["val/loss", "perf/tokens_per_sec"])
    resolved = tomllib.loads((run / "config.toml").read_text())
    data, trainer = resolved["data"], resolved["trainer"]
    tokens = data["batch_size"] * data["block_size"] * trainer.get("accumulate_grad_batches", 1)
    rates = [point.value for point in scalars["perf/tokens_per_sec"]]
    if not scalars["val/loss"] or not rates:
        raise SystemExit(f"{run}: no val/loss or perf/tokens_per_sec scalars")
    return RaceRow(
        f"`fit` {short(config)}",
        process,
        [Point(p.step, p.wall_time - process.launch, p.value) for p in scalars["val/loss"]],
        1000 * tokens / statistics.median(rates),
        f"evaluates every {trainer['val_check_interval']} steps: {data['val_batches']} fixed "
        f"validation batches; ms/step from perf/tokens_per_sec with {tokens} tokens per step",
    )


RACE_HEADER = [
    "run",
    "steps to val/loss ≤ {target}",
    "s to target",
    "ms/step",
    "best val/loss (step)",
    "whole process s",
    "s to target / nanoGPT whole",
    "whole / nanoGPT whole",
]


def race_table(rows: list[RaceRow], target: float) -> str:
    """One round: the first row is nanoGPT's, the reference of the ratios."""
    reference = rows[0].process.seconds
    table = []
    for row in rows:
        reached = first_reaching(row.evaluations, target)
        best = min(row.evaluations, key=lambda p: p.value)
        table.append(
            [
                row.name,
                str(reached.step) if reached else "not reached",
                f"{reached.wall_time:.1f}" if reached else "—",
                f"{row.ms_per_step:.1f}",
                f"{best.value:.4f} ({best.step})",
                f"{row.process.seconds:.1f}",
                f"{reached.wall_time / reference:.2f}×" if reached else "—",
                f"{row.process.seconds / reference:.2f}×",
            ]
        )
    return markdown([h.format(target=target) for h in RACE_HEADER], table)


def race_medians(rounds: list[list[RaceRow]], target: float) -> str:
    """Each row's median over the rounds; a ratio is the median of the rounds' ratios (each
    against that round's nanoGPT run), a column that is missing in some round is left blank."""
    table = []
    for index, name in enumerate(row.name for row in rounds[0]):
        runs = [(rows[index], rows[0].process.seconds) for rows in rounds]
        reached = [(first_reaching(row.evaluations, target), ref) for row, ref in runs]
        hits = [(point, ref) for point, ref in reached if point is not None]
        every = len(hits) == len(runs)
        best = [min(p.value for p in row.evaluations) for row, _ in runs]

        def median(values: list[float], form: str) -> str:
            return form.format(statistics.median(values)) if values else "—"

        table.append(
            [
                name,
                median([float(p.step) for p, _ in hits], "{:.0f}")
                if every
                else ("not always" if hits else "not reached"),
                median([p.wall_time for p, _ in hits], "{:.1f}") if every else "—",
                median([row.ms_per_step for row, _ in runs], "{:.1f}"),
                median(best, "{:.4f}"),
                median([row.process.seconds for row, _ in runs], "{:.1f}"),
                median([p.wall_time / ref for p, ref in hits], "{:.2f}×") if every else "—",
                median([row.process.seconds / ref for row, ref in runs], "{:.2f}×"),
            ]
        )
    header = [h.format(target=target) for h in RACE_HEADER]
    header[4] = "best val/loss"
    return markdown(header, table)


def race(args: argparse.Namespace, work: Path) -> None:
    """Part 1: nanoGPT's CPU recipe against each config's `fit`, `--rounds` times with the
    order rotated each round; the table of each round, the medians over rounds, and the
    val/loss of every evaluation of the last round."""
    copy = copy_nanogpt(args.nanogpt, args.corpus, work)
    configs = [config for config in args.config if config.exists()]
    skipped = [config for config in args.config if not config.exists()]
    for config in skipped:
        print(f"note: {config} does not exist: skipped")
    # Outside the race, as nanoGPT's prepare.py.
    datasets = [prepare_ours(config, args.corpus, work) for config in configs]
    runners: list[Callable[[str], RaceRow]] = [
        lambda tag: race_nanogpt(copy, work, args.quick, tag)
    ]
    runners += [
        functools.partial(race_ours, config, args.corpus, work, args.quick) for config in configs
    ]
    rounds: list[list[RaceRow]] = []
    for number in range(args.rounds):
        # The machine's speed drifts over minutes: each runner goes first in some round.
        order = [(number + i) % len(runners) for i in range(len(runners))]
        print(f"\n## race, round {number + 1} of {args.rounds} ({load()})", flush=True)
        done = {i: runners[i](f"_{number + 1}" if args.rounds > 1 else "") for i in order}
        rounds.append([done[i] for i in range(len(runners))])
        print(load())
        if args.quick:
            print(
                f"\n**--quick: {QUICK_STEPS} steps, evaluation every {QUICK_EVERY}: not a result.**"
            )
        print(f"\nround {number + 1} (run in the order {', '.join(str(i + 1) for i in order)}):\n")
        print(race_table(rounds[-1], args.target))
    if args.rounds > 1:
        print(f"\nmedians over the {args.rounds} rounds (ratios: the median of each round's):\n")
        print(race_medians(rounds, args.target))
    rows = rounds[-1]
    print()
    print(
        "Seconds from the launch of the process (before the interpreter starts) to the moment "
        "an evaluation's loss was printed (nanoGPT) or logged to TensorBoard (ml-playground); "
        "ms/step is a median: nanoGPT's from its `iter` lines (iterations that ran an "
        "evaluation excluded), ml-playground's from `perf/tokens_per_sec` (averaged over each "
        "10 logged steps, validation excluded). Both tools run with the same interpreter "
        "(no `uv run`), data prepared beforehand. Goal: s to target ≤ 0.5× nanoGPT's whole run."
    )
    for row in rows:
        print(f"- {row.name}: {row.note}")
    for config in skipped:
        print(f"- {short(config)}: not run (the file does not exist)")
    for config, dataset in zip(configs, datasets, strict=True):
        same = all(
            filecmp.cmp(dataset / name, copy / "data" / "shakespeare_char" / name, shallow=False)
            for name in ("train.bin", "val.bin")
        )
        print(
            f"- {short(config)}'s train.bin and val.bin are "
            f"{'byte for byte those of' if same else 'not those of'} nanoGPT's prepare.py"
        )

    steps = sorted({point.step for row in rows for point in row.evaluations})
    cells = {
        (row.name, p.step): f"{p.value:.4f} ({p.wall_time:.1f} s)"
        for row in rows
        for p in row.evaluations
    }
    print("\nval/loss at each evaluation (seconds since launch):\n")
    print(
        markdown(
            ["step", *(row.name for row in rows)],
            [[str(step), *(cells.get((row.name, step), "") for row in rows)] for step in steps],
        )
    )


# --- part 2: sampling ---------------------------------------------------------------------


def sampling_checkpoints(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """A 6 × 384 checkpoint (block 256, char vocabulary) from each tool, by training one step
    on a tiny batch (the shape matters, not the weights): nanoGPT's ckpt.pt, our checkpoint
    folder and our dataset folder."""
    copy = copy_nanogpt(args.nanogpt, args.corpus, work)
    run_streaming(
        [
            PYTHON,
            "train.py",
            "config/train_shakespeare_char.py",  # 6 × 384, block 256
            "--device=cpu",
            "--compile=False",
            "--out_dir=out-sample",
            "--max_iters=1",
            "--eval_interval=1",
            "--eval_iters=1",
            "--always_save_checkpoint=True",
            "--batch_size=2",
        ],
        copy,
        work / "sample_nanogpt_train.log",
    )
    dataset = prepare_ours(GPU_RECIPE, args.corpus, work)
    folder = work / "sample_ours"
    folder.mkdir()
    command = [*OURS, "fit", "--config", str(GPU_RECIPE), "--data.dataset_dir", str(dataset)]
    command += ["--log_dir", "logs", "--checkpointing.dirpath", "checkpoints"]
    command += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    command += ["--model.compile", "false", "--data.pin_memory", "false"]
    command += ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1"]
    command += ["--data.batch_size", "2", "--data.val_batches", "1"]
    run_streaming(command, folder, work / "sample_ours_fit.log")
    return copy / "out-sample" / "ckpt.pt", folder, dataset


def sampling(args: argparse.Namespace, work: Path) -> None:
    """Part 2: whole sampling processes, `--repeats` times each, interleaved."""
    nanogpt_ckpt, folder, dataset = sampling_checkpoints(args, work)
    copy = nanogpt_ckpt.parents[1]
    size = ["--sample.num_samples", str(NUM_SAMPLES), "--sample.max_new_tokens", str(NEW_TOKENS)]
    ours = [*OURS, "sample", "--config", str(GPU_RECIPE), *size]
    nanogpt = [PYTHON, "sample.py", "--out_dir=out-sample", "--device=cpu"]
    nanogpt += [f"--num_samples={NUM_SAMPLES}", f"--max_new_tokens={NEW_TOKENS}"]
    own = [*ours, "--data.dataset_dir", str(dataset), "--checkpointing.dirpath", "checkpoints"]
    nanogpt_data = copy / "data" / "shakespeare_char"  # its meta.pkl holds the tokenizer
    foreign = [*ours, "--data.dataset_dir", str(nanogpt_data), "--sample.ckpt", str(nanogpt_ckpt)]
    runs = [
        (Timings("nanoGPT `sample.py`", nanogpt), copy),
        (Timings("`ml-playground sample`", own), folder),
        (Timings("`ml-playground sample` of nanoGPT's ckpt.pt", foreign), folder),
    ]
    print(f"\n## sampling ({load()})", flush=True)
    for timings, cwd in runs:
        show(timings.command, cwd)
    for _ in range(args.repeats):
        for timings, cwd in runs:
            timings.seconds.append(run_quietly(timings.command, cwd))
    print(load())
    print(
        f"\nSampling {NUM_SAMPLES} × {NEW_TOKENS} tokens from the 6 × 384 model, whole processes, "
        f"{runs_of_each(args.repeats)}:\n"
    )
    print(timing_table([timings for timings, _ in runs]))
    print("\nGoal: `ml-playground sample` ≤ 0.5× nanoGPT's sample.py.")


def runs_of_each(repeats: int) -> str:
    """The caption's count of runs."""
    return f"{repeats} run{'s' * (repeats != 1)} of each (interleaved)"


def timing_table(runs: list[Timings]) -> str:
    """Min and median of each command, and both against the first command's."""
    first = runs[0]
    return markdown(
        ["command", "min s", "median s", "min ratio", "median ratio"],
        [
            [
                t.name,
                f"{t.min:.2f}",
                f"{t.median:.2f}",
                f"{t.min / first.min:.2f}×",
                f"{t.median / first.median:.2f}×",
            ]
            for t in runs
        ],
    )


# --- part 3: start-up ---------------------------------------------------------------------


def startup(args: argparse.Namespace, work: Path) -> None:
    """Part 3: `ml-playground fit --help` against importing Lightning, `--repeats` times each."""
    runs = [
        Timings(
            '`python -c "import lightning.pytorch"`', [PYTHON, "-c", "import lightning.pytorch"]
        ),
        Timings("`ml-playground fit --help`", [*OURS, "fit", "--help"]),
    ]
    print(f"\n## start-up ({load()})", flush=True)
    for timings in runs:
        show(timings.command, work)
    for _ in range(args.repeats):
        for timings in runs:
            timings.seconds.append(run_quietly(timings.command, work))
    print(load())
    print(f"\nWhole processes, {runs_of_each(args.repeats)}:\n")
    print(timing_table(runs))
    print("\nGoal: `fit --help` ≤ 1.15× the bare import.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--nanogpt", type=Path, default=REPO.parent / "nanogpt", help="nanoGPT's folder (read only)"
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=REPO.parent / "shared/data/tinyshakespeare/input.txt",
        help="tinyshakespeare's input.txt",
    )
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        help="an ml-playground config to race (repeat the flag for more; default: "
        "configs/shakespeare_char.toml and configs/shakespeare_char_muon.toml)",
    )
    parser.add_argument("--target", type=float, default=1.8857, help="val/loss to reach")
    parser.add_argument("--only", choices=["race", "sampling", "startup"])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps: a check")
    parser.add_argument("--repeats", type=int, help="runs per timed command (default 3, --quick 2)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="race rounds, the order rotated each (default 1)"
    )
    parser.add_argument("--work", type=Path, help="work folder (new or empty; kept at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args()
    args.config = [
        path.resolve()
        for path in args.config
        or [REPO / "configs/shakespeare_char.toml", REPO / "configs/shakespeare_char_muon.toml"]
    ]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.nanogpt, args.corpus = args.nanogpt.resolve(), args.corpus.resolve()
    for path, what in ((args.nanogpt / "train.py", "nanoGPT"), (args.corpus, "corpus")):
        if not path.exists():
            raise SystemExit(f"{path}: no such file ({what})")
    if args.work:
        if args.work.exists() and any(args.work.iterdir()):
            raise SystemExit(f"{args.work}: not empty; give a new or empty folder")
        args.work.mkdir(parents=True, exist_ok=True)
        work = args.work.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="versus_nanogpt_"))

    print(f"machine: {machine()}")
    print(f"nanoGPT: {args.nanogpt} (copied to {work / 'nanogpt'}), corpus: {args.corpus}")
    print(f"interpreter: {PYTHON}; work folder: {work}")
    print('every command runs with PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=""')
    parts = {"race": race, "sampling": sampling, "startup": startup}
    for name, part in parts.items():
        if args.only in (None, name):
            part(args, work)
    if args.work or args.keep:
        print(f"\nwork folder kept: {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
