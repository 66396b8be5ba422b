"""Shared checks of config fields, raised when a config is built (before any work), and
the error type of unreadable checkpoints."""

from __future__ import annotations


def check_positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    """ValueError "<owner>: <name> must be an integer >= <minimum>, got <value>" unless
    value is an int (not a bool) of at least `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


class CheckpointError(ValueError):
    """A checkpoint folder orbax cannot read (damaged files, or other settings)."""
