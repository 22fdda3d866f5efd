"""The project's exception family: problems a user can fix, raised where they are found.

The CLI turns any of these into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import re
import sys


class MLPlaygroundError(Exception):
    """Base class: a problem the user can fix. The message names the file/key and the fix."""

    exit_code = 1


class ConfigError(MLPlaygroundError):
    """Bad configuration or command-line usage."""

    exit_code = 2


class DataError(MLPlaygroundError):
    """Missing, malformed or unreachable data (corpus, token files, meta.pkl, downloads)."""


class CheckpointError(MLPlaygroundError):
    """Missing, truncated or incompatible checkpoint."""


class SamplingError(MLPlaygroundError):
    """A prompt or sampling setting that cannot be honoured."""


class TrainingError(MLPlaygroundError):
    """Training cannot continue (for example the loss became NaN)."""


class Interrupted(MLPlaygroundError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) stopped a run; the message says what holds it."""

    def __init__(self, message: str, sigterm: bool) -> None:
        super().__init__(message)
        self.exit_code = 143 if sigterm else 130


def describe_os_error(exc: OSError) -> str:
    """`<strerror>: <filename>` (both files for a failed rename or link)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    return f"{text}: {' -> '.join(names)}" if names else text


def shorten(text: str, limit: int) -> str:
    """`text` in at most `limit` characters, cut at a word boundary and ended with "…" when
    cut: a word cut in half reads as another word, and the ellipsis says something is left out."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    head = cut.rsplit(" ", 1)[0]
    if len(head) < limit // 2:  # one long word (a path, a value): cut inside it
        head = cut
    return head.rstrip(" ,;:") + "…"


# What gloo raises when a peer process of a distributed run is gone (NCCL raises DistError).
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer")


def lost_peer(exc: BaseException) -> str | None:
    """If a distributed run's collective failed because another of its processes stopped: the
    line to print instead of a traceback (a consequence; the process that failed says why)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return None
    if dist.is_initialized():
        rank = str(dist.get_rank())
    elif os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        rank = os.environ.get("RANK", "?")
    else:
        return None  # not a distributed run
    if not (isinstance(exc, dist.DistError) or any(sign in str(exc) for sign in LOST_PEER_SIGNS)):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())  # gloo's "[source.cc:561] " prefix
    first = shorten((text.split(". ")[0].splitlines() or [type(exc).__name__])[0], 200)
    return (
        f"rank {rank} lost contact with another process of this distributed run ({first}); "
        "that process's own error says why"
    )


def report(exc: BaseException) -> int | None:
    """Print the one line a user sees for `exc` and return the exit code; None for an
    exception that is a bug (its traceback is the report)."""
    if isinstance(exc, Interrupted):
        line, code = str(exc), exc.exit_code
    elif isinstance(exc, MLPlaygroundError):
        line, code = f"error: {exc}", exc.exit_code
    elif isinstance(exc, OSError):  # not foreseen where it happened (permissions, full disk)
        line, code = f"error: {describe_os_error(exc)}", 1
    elif (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    ):
        first = shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0], 160)
        line = (
            f"error: out of memory ({first}); lower data.batch_size or data.block_size (fit), "
            "data.val_batches (validation), sample.num_samples (sample), or the model's "
            "model.n_embd / model.n_layer"
        )
        code = 1
    elif isinstance(exc, KeyboardInterrupt):  # before or after training: nothing to save
        line, code = "interrupted (Ctrl-C)", 130
    elif isinstance(exc, RuntimeError) and (lost := lost_peer(exc)) is not None:
        line, code = f"error: {lost}", 1
    elif type(exc).__name__ == "SIGTERMException":  # Lightning's, raised after saving
        line, code = "stopped by SIGTERM; resume with --ckpt_path last", 143
    else:
        return None
    print(f"ml-playground: {line}", file=sys.stderr)
    return code
