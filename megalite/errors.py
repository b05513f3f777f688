"""The one error type users see: every problem caused by input (a config value, a data file, a
checkpoint, a launch option, a backend this machine cannot run) raises a `MegaliteError`
subclass whose message names the key or file, the value and the fix. Every CLI catches
`MegaliteError` alone and prints it as one line (`cli_error`); anything else is a bug and keeps
its traceback.

The subclasses also derive from the built-in type they replace (ValueError, RuntimeError), so
callers that caught those keep working.
"""

from __future__ import annotations

import sys


class MegaliteError(Exception):
    """A user-facing problem; the message says what, where and how to fix it."""


class ConfigError(MegaliteError, ValueError):
    """A configuration value or combination that cannot work (config.py, preflight)."""


class DataError(MegaliteError, ValueError):
    """Input data or a prepared dataset that cannot be used (megalite.data)."""


class CheckpointError(MegaliteError, ValueError):
    """A checkpoint that cannot be used (checkpoint.py)."""


class LaunchError(MegaliteError, ValueError):
    """A launch that cannot be made as asked (launch.py)."""


class InteropError(MegaliteError, ValueError):
    """Weights or a model config from another framework that cannot be converted."""


class BackendUnavailableError(MegaliteError, RuntimeError):
    """A kernel backend the config asks for that this machine cannot run."""


class TrainingError(MegaliteError, RuntimeError):
    """The run cannot continue; the message says why and what to change."""


def cli_error(prog: str, error: MegaliteError, status: int = 2) -> int:
    """Prints `<prog>: error: <message>` to stderr and returns the exit status to use."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return status
