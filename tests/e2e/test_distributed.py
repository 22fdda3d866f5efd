"""DDP with 2 CPU processes (gloo): one machine, resume, and two "nodes" on one machine.

The ranks start in one of the two ways a user starts them. `--trainer.devices 2` in one
command: Lightning's launcher in rank 0 starts rank 1 as a fresh `python -m ml_playground`
(a few seconds of imports). Or one command per rank with the rendezvous variables set, as
torchrun, SLURM or a user by hand starts them (`two_ranks`): each of those forks warm from
tests/cli_server.py, so most tests here start their ranks that way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from e2e.harness import Result, Trained, free_port
from ml_playground.checkpoint_reading import LAST_PATTERN

pytestmark = pytest.mark.cold  # .ci/run runs these with fresh processes too

DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


def start_ranks(
    cli, args: Sequence[str | Path], cwd: Path, nodes: int, devices: int,
    env: dict[str, str] | None = None, rank0_file_size_limit: int | None = None,
) -> list[Any]:  # fmt: skip
    """`ARGS --trainer.num_nodes N --trainer.devices D` (DDP on CPUs) once per rank, rank 0
    first, each started on its own with the variables Lightning's launcher gives the ranks it
    starts (and the README's multi-node section sets by hand); LOCAL_RANK tells Lightning that
    the processes were started for it. Returns the running processes."""
    port = str(free_port())
    flags = ("--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
             "--trainer.num_nodes", str(nodes), "--trainer.devices", str(devices))  # fmt: skip
    procs = []
    for rank in range(nodes * devices):
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                      "NODE_RANK": str(rank // devices), "LOCAL_RANK": str(rank % devices),
                      "WORLD_SIZE": str(nodes * devices)}  # fmt: skip
        limit = rank0_file_size_limit if rank == 0 else None
        procs.append(cli.start(*args, *flags, cwd=cwd, env=(env or {}) | rendezvous,
                               file_size_limit=limit, stdout=True))  # fmt: skip
    return procs


def outputs_of(procs: list[Any]) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr) once it ended; kills those still running after 240 s."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def two_ranks(cli, *args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Result:
    """ARGS on two ranks of this machine, started one by one (`start_ranks`), as one outcome:
    every rank must succeed; stdout and stderr are rank 0's then rank 1's, as the one command
    `ARGS --trainer.devices 2` would show them (its ranks share its output)."""
    procs = start_ranks(cli, args, cwd, nodes=1, devices=2, env=env)
    outputs = outputs_of(procs)
    stdout, stderr = ("".join(streams) for streams in zip(*outputs, strict=True))
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return Result([*map(str, args), *DDP], 0, stdout, stderr)


def traces(folder: Path) -> dict[int, list[tuple[int, int, int]]]:
    """Per rank: (step, batch sum, sum of first tokens) for every training batch."""
    out = {}
    for path in sorted(folder.glob("batches-rank*.txt")):
        rank = int(path.stem.removeprefix("batches-rank"))
        rows = [tuple(map(int, line.split())) for line in path.read_text().splitlines()]
        out[rank] = rows  # type: ignore[assignment]
    return out


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_ddp_two_processes_different_batches_rank0_writes(
    tmp_path, make_experiment, cli, batch_trace
) -> None:
    """The README's one-machine command: Lightning's launcher starts rank 1 (a fresh process)."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    trace = tmp_path / "trace"
    flags, env = batch_trace(trace)  # a callback added by flag, as a user adds one
    result = cli("fit", "--config", config, *DDP, *flags, cwd=tmp_path, env=env)
    ckpt = tmp_path / "ckpt"
    # keep.last 2 (every 5 steps), keep.best 1, validation at 10 and 20; nothing else.
    assert [n for n in names(ckpt) if n.startswith("ckpt_last")] == [
        "ckpt_last_00000015.pt",
        "ckpt_last_00000020.pt",
    ]
    best = [n for n in names(ckpt) if n.startswith("ckpt_best")]
    assert len(best) == 1 and best[0].startswith(("ckpt_best_00000020_", "ckpt_best_00000010_"))
    assert not [n for n in names(ckpt) if ".tmp" in n]
    # Only rank 0 reports, logs and writes the resolved config.
    assert result.stdout.count("best val/loss") == 1
    assert names(tmp_path / "logs" / "tiny") == ["version_0"]
    per_rank = traces(trace)
    assert sorted(per_rank) == [0, 1]
    assert [row[0] for row in per_rank[0]] == list(range(20))
    assert [row[0] for row in per_rank[1]] == list(range(20))
    assert per_rank[0] != per_rank[1]  # the two ranks trained on different windows
    assert sum(a[1:] != b[1:] for a, b in zip(per_rank[0], per_rank[1], strict=True)) >= 18


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_resume(tmp_path, make_experiment, cli, optimizer: str) -> None:
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    flags = ("--model.optimizer", optimizer)
    two_ranks(cli, "fit", "--config", config, *flags, "--trainer.max_steps", "10", cwd=tmp_path)
    result = two_ranks(cli, "fit", "--config", config, *flags, "--ckpt_path", "last",
                   "--trainer.max_steps", "20", cwd=tmp_path)  # fmt: skip
    assert "ckpt_last_00000020.pt" in result.stdout
    steps = sorted(
        int(m.group(1)) for p in (tmp_path / "ckpt").iterdir() if (m := LAST_PATTERN.match(p.name))
    )
    assert steps == [15, 20]
    state = torch.load(tmp_path / "ckpt" / "ckpt_last_00000020.pt", map_location="cpu",
                       weights_only=True)["optimizer_states"][0]  # fmt: skip
    kinds = [g["optimizer"] for g in state["param_groups"]]
    assert kinds == (["muon", "adamw", "adamw"] if optimizer == "muon" else ["adamw"] * 2)


def run_two_nodes(
    cli, config: Path, folder: Path, node0_file_size_limit: int | None = None
) -> tuple[list[Any], list[tuple[str, str]]]:
    """`fit` as two one-process "nodes" on localhost, started separately (as torchrun or
    SLURM would). Returns the processes and their (stdout, stderr)."""
    procs = start_ranks(cli, ["fit", "--config", config], folder, nodes=2, devices=1,
                        rank0_file_size_limit=node0_file_size_limit)  # fmt: skip
    return procs, outputs_of(procs)


def test_two_nodes_on_one_machine(tmp_path, make_experiment, cli) -> None:
    """What the README's multi-node section says, with both "nodes" on localhost."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    procs, outputs = run_two_nodes(cli, config, tmp_path)
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{out}\n{err}"
    assert "best val/loss" in outputs[0][0] and "best val/loss" not in outputs[1][0]
    assert "ckpt_last_00000020.pt" in names(tmp_path / "ckpt")


FILE_SIZE_LIMIT = 60_000  # writes past it fail (EFBIG): the step-0 checkpoint fits, step 5's not


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains marker (zombies count as gone)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def test_failure_on_rank0_alone_stops_the_ranks_it_started(tmp_path, make_experiment, cli) -> None:
    """Only rank 0 writes checkpoints; when that fails, rank 1 must not be left waiting in a
    collective (under NCCL until the process-group timeout), nor print a traceback. Rank 1 is
    started by Lightning's launcher in rank 0, as `--trainer.devices 2` does."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    ckpt = tmp_path / "ckpt-rank0-fails"
    started = time.monotonic()
    result = cli("fit", "--config", config, *DDP, "--checkpointing.dirpath", ckpt, cwd=tmp_path,
                 check=False, file_size_limit=FILE_SIZE_LIMIT)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("ml-playground:")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    time.sleep(1)
    assert processes_mentioning(str(ckpt)) == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt_last_00000000.pt"]


def test_a_rank_that_loses_its_peer_says_so_in_one_line(tmp_path, make_experiment, cli) -> None:
    """Processes started separately (torchrun, SLURM): node 0 fails writing a checkpoint; node 1
    finds its peer gone and says so in one line instead of a traceback."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    procs, outputs = run_two_nodes(cli, config, tmp_path, node0_file_size_limit=FILE_SIZE_LIMIT)
    (_, err0), (_, err1) = outputs
    assert procs[0].returncode == 1 and "could not write checkpoint" in err0, err0
    assert procs[1].returncode == 1, err1
    assert "Traceback" not in err1
    lines = [line for line in err1.splitlines() if line.startswith("ml-playground:")]
    assert len(lines) == 1 and "rank 1 lost contact with another process" in lines[0], err1


def test_ddp_with_an_unsynced_metric_decides_best_on_rank0(tmp_path, make_experiment, cli) -> None:
    """train/loss differs per rank; if ranks decided "improved" on their own values, only some
    would enter the collective checkpoint write and the run would hang."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    two_ranks(cli, "fit", "--config", config, "--checkpointing.metric", "train/loss",
          "--checkpointing.keep.best", "20", "--trainer.max_steps", "12",
          "--trainer.val_check_interval", "1", cwd=tmp_path)  # fmt: skip
    best = [n for n in names(tmp_path / "ckpt") if n.startswith("ckpt_best")]
    assert best and all("train_loss=" in n for n in best)


@pytest.mark.parametrize("batch_size", ["4", "3"])  # 12 windows: 6 per rank; 9: padded to 10
def test_val_loss_does_not_depend_on_the_number_of_processes(
    tmp_path: Path, trained: Trained, cli, batch_size: str
) -> None:
    """Every fixed window counts once: partial last batches and DistributedSampler's padding
    must not change val/loss."""
    ckpt = trained.ckpt / "ckpt_last_00000020.pt"  # read only: logs go to tmp_path
    shape = ("--data.batch_size", batch_size, "--data.val_batches", "3")
    values = []
    validate = ("validate", *trained.fit_flags(tmp_path), *shape, "--ckpt_path", ckpt)
    for out in (
        cli(*validate, cwd=tmp_path).stdout,  # one process
        two_ranks(cli, *validate, cwd=tmp_path).stdout,
    ):
        found = re.search(r"^val/loss: (\d+\.\d+)$", out, re.M)
        assert found, out
        values.append(float(found.group(1)))
    assert abs(values[0] - values[1]) <= 1e-4  # printed to 4 decimals
