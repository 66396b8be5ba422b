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
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        return f"lies under {blocking}, which is a file"
    if not create_folders and not path.parent.is_dir():
        return f"folder {path.parent} does not exist"
    return None


def file_in_the_way(folder):
    """The file that stands at `folder` or at one of its parents (a Path), or None:
    then `folder` exists or can be created."""
    from pathlib import Path

    existing = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())
    return None if existing.is_dir() else existing


def folder_problem(folder) -> str | None:
    """Why `folder` cannot be a folder (None if it can): "is a file", or "lies under
    <file>, a file"."""
    from pathlib import Path

    blocking = file_in_the_way(folder)
    if blocking is None:
        return None
    return "is a file" if blocking == Path(folder) else f"lies under {blocking}, a file"


class CheckpointError(ValueError):
    """A checkpoint folder orbax cannot read (damaged files, or other settings)."""
