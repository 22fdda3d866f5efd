"""Wall-clock time at which a run's val/loss first reached a target, read from TensorBoard.

    python benchmarks/time_to_loss.py lightning_logs/shakespeare_char_gpu --start EPOCH \\
        --target 1.47 [--end EPOCH]

`--start` is the Unix time taken just before the command was launched (`date +%s.%N`), so the
times include start-up: imports, data preparation, compilation. Every evaluation is listed.
`benchmarks/versus_nanogpt.py` reads its runs with `read_scalars` and `first_reaching`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


class Point(NamedTuple):
    """One logged scalar: the step it belongs to, its Unix wall time and its value."""

    step: int
    wall_time: float
    value: float


def read_scalars(log_dir: Path, tags: list[str]) -> tuple[Path, dict[str, list[Point]]]:
    """The scalars `tags` of the newest run under `log_dir` (an experiment's folder or one
    version_N), in logging order, with that run's folder. A tag the run never logged maps to
    an empty list."""
    runs = sorted(
        {path.parent for path in log_dir.rglob("events.out.tfevents.*")},
        key=lambda p: p.stat().st_mtime,
    )
    if not runs:
        raise SystemExit(f"{log_dir}: no TensorBoard event files")
    events = EventAccumulator(str(runs[-1]), size_guidance={"scalars": 0})
    events.Reload()
    logged = set(events.Tags()["scalars"])
    return runs[-1], {
        tag: [Point(e.step, e.wall_time, e.value) for e in events.Scalars(tag)]
        if tag in logged
        else []
        for tag in tags
    }


def first_reaching(points: list[Point], target: float) -> Point | None:
    """The first point whose value is at or below `target`, or None."""
    return next((point for point in points if point.value <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path, help="the experiment's folder or one version_N")
    parser.add_argument("--start", type=float, required=True, help="Unix time of the launch")
    parser.add_argument("--target", type=float, default=1.47)
    parser.add_argument("--end", type=float, help="Unix time the command ended (default: now)")
    parser.add_argument("--metric", default="val/loss")
    args = parser.parse_args()

    run, scalars = read_scalars(args.log_dir, [args.metric])
    points = scalars[args.metric]
    if not points:
        raise SystemExit(f"{run}: no {args.metric} scalars")
    print(f"run: {run}")
    print(f"{'step':>7} {'seconds':>8} {args.metric:>9}")
    for point in points:
        print(f"{point.step:7d} {point.wall_time - args.start:8.1f} {point.value:9.4f}")
    best = min(points, key=lambda p: p.value)
    print(f"best {args.metric} {best.value:.4f} at step {best.step}")
    end = (args.end or time.time()) - args.start
    print(f"whole command: {end:.1f} s")
    reached = first_reaching(points, args.target)
    if reached:
        print(
            f"reached {args.metric} <= {args.target} at step {reached.step}: "
            f"{reached.wall_time - args.start:.1f} s ({reached.value:.4f})"
        )
    else:
        print(f"never reached {args.metric} <= {args.target}")


if __name__ == "__main__":
    main()
