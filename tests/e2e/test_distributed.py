"""DDP with 2 CPU processes (gloo): one machine, resume, and two "nodes" on one machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ml_playground.checkpointing import LAST_PATTERN

DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


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


def test_ddp_two_processes_different_batches_rank0_writes(tmp_path, make_experiment, cli) -> None:
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    trace = tmp_path / "trace"
    trace.mkdir()
    result = cli("fit", "--config", config, *DDP, cwd=tmp_path,
                 env={"ML_PLAYGROUND_TRACE_BATCHES": str(trace)})  # fmt: skip
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


def test_ddp_resume(tmp_path, make_experiment, cli) -> None:
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    cli("fit", "--config", config, *DDP, "--trainer.max_steps", "10", cwd=tmp_path)
    result = cli("fit", "--config", config, *DDP, "--ckpt_path", "last",
                 "--trainer.max_steps", "20", cwd=tmp_path)  # fmt: skip
    assert "ckpt_last_00000020.pt" in result.stdout
    steps = sorted(
        int(m.group(1)) for p in (tmp_path / "ckpt").iterdir() if (m := LAST_PATTERN.match(p.name))
    )
    assert steps == [15, 20]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_nodes_on_one_machine(tmp_path, make_experiment, cli) -> None:
    """What the README's multi-node section says, with both "nodes" on localhost."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if not k.startswith("ML_PLAYGROUND_")}
    procs = []
    for node in (0, 1):
        env = dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node),
                   LOCAL_RANK="0", WORLD_SIZE="2")  # fmt: skip
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ml_playground",
                    "fit",
                    "--config",
                    str(config),
                    "--trainer.accelerator",
                    "cpu",
                    "--trainer.strategy",
                    "ddp",
                    "--trainer.num_nodes",
                    "2",
                    "--trainer.devices",
                    "1",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{out}\n{err}"
    assert "best val/loss" in outputs[0][0] and "best val/loss" not in outputs[1][0]
    assert "ckpt_last_00000020.pt" in names(tmp_path / "ckpt")
