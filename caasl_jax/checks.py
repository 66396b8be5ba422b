"""Shared checks of config fields, raised when a config is built (before any work), and
the error type of unreadable checkpoints."""

from __future__ import annotations


def check_positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    """ValueError "<owner>: <name> must be an integer >= <minimum>, got <value>" unless
    value is an int (not a bool) of at least `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


def file_path_problem(path, create_folders: bool = False) -> str | None:
    """Why a file cannot be written at `path` (None if it can): the path is a folder, a
    file stands where one of its folders should be, or (unless the caller creates
    them) its folder does not exist. Existing files are the caller's to judge."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        return "is a folder; give a file path"
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        return f"lies under {existing}, which is a file"
    if not create_folders and existing != path.parent:
        return f"folder {path.parent} does not exist"
    return None


class CheckpointError(ValueError):
    """A checkpoint folder orbax cannot read (damaged files, or other settings)."""
