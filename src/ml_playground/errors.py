"""The project's exception family: problems a user can fix, raised where they are found.

The CLI turns any of these into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


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
