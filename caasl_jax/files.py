"""Writing files so that a process killed at any moment leaves the old or the new
contents, never a torn file (resumable runs read back what they wrote)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through `<path>.partial`, flushed to disk, then a rename."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path
