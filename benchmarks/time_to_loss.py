"""Wall-clock time at which a run's val/loss first reached a target, read from TensorBoard.

    python benchmarks/time_to_loss.py lightning_logs/shakespeare_char_gpu --start EPOCH \\
        --target 1.47 [--end EPOCH]

`--start` is the Unix time taken just before the command was launched (`date +%s.%N`), so the
times include start-up: imports, data preparation, compilation. Every evaluation is listed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path, help="the experiment's folder or one version_N")
    parser.add_argument("--start", type=float, required=True, help="Unix time of the launch")
    parser.add_argument("--target", type=float, default=1.47)
    parser.add_argument("--end", type=float, help="Unix time the command ended (default: now)")
    parser.add_argument("--metric", default="val/loss")
    args = parser.parse_args()

    runs = sorted(
        {path.parent for path in args.log_dir.rglob("events.out.tfevents.*")},
        key=lambda p: p.stat().st_mtime,
    )
    if not runs:
        raise SystemExit(f"{args.log_dir}: no TensorBoard event files")
    events = EventAccumulator(str(runs[-1]), size_guidance={"scalars": 0})
    events.Reload()
    points = events.Scalars(args.metric)
    print(f"run: {runs[-1]}")
    print(f"{'step':>7} {'seconds':>8} {args.metric:>9}")
    reached = None
    for point in points:
        seconds = point.wall_time - args.start
        print(f"{point.step:7d} {seconds:8.1f} {point.value:9.4f}")
        if reached is None and point.value <= args.target:
            reached = (point.step, seconds, point.value)
    best = min(points, key=lambda p: p.value)
    print(f"best {args.metric} {best.value:.4f} at step {best.step}")
    end = (args.end or time.time()) - args.start
    print(f"whole command: {end:.1f} s")
    if reached:
        step, seconds, value = reached
        print(
            f"reached {args.metric} <= {args.target} at step {step}: {seconds:.1f} s ({value:.4f})"
        )
    else:
        print(f"never reached {args.metric} <= {args.target}")


if __name__ == "__main__":
    main()
