"""JSON-lines logs (metrics.jsonl, eval.jsonl, the reward pretraining's log.jsonl).

Lines are strict JSON: a non-finite number (the learner metrics of warm-up iterations
are NaN) is written as null, so jq and other strict readers accept every line. A
process killed while appending leaves a torn last line; readers skip such lines, so a
crash never blocks resuming or plotting a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def to_line(row: dict) -> str:
    """One log line (with its newline): `row` as strict JSON, NaN / inf as null."""
    return json.dumps(_finite_or_none(row)) + "\n"


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if it does not exist), skipping torn lines."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def keep_rows_up_to(path: str | Path, field: str, last: int) -> None:
    """Rewrite the file with only its rows whose `field` is <= last: those logged after
    the checkpoint a run resumes from are redone, so they must not appear twice."""
    path = Path(path)
    if path.exists():
        kept = [row for row in read_rows(path) if row[field] <= last]
        path.write_text("".join(to_line(row) for row in kept))
