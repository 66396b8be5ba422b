"""JSON-lines logs: strict JSON out, torn lines skipped in, trimming on resume."""

import json
import math

from caasl_jax.jsonl import keep_rows_up_to, read_rows, to_line


def strict(line: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def test_lines_are_strict_json_with_nan_as_null():
    row = {"call": 0, "critic_loss": math.nan, "q": -math.inf, "nested": {"x": [1.0, math.nan]}}
    line = to_line(row)
    assert line.endswith("\n") and line.count("\n") == 1
    assert strict(line) == {"call": 0, "critic_loss": None, "q": None, "nested": {"x": [1.0, None]}}


def test_read_skips_a_torn_line_and_trimming_keeps_earlier_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    torn = '{"call": 2, "lo'  # a kill mid-write
    path.write_text(to_line({"call": 0, "loss": math.nan}) + to_line({"call": 1}) + torn)
    assert read_rows(path) == [{"call": 0, "loss": None}, {"call": 1}]
    keep_rows_up_to(path, "call", 0)
    assert [strict(line) for line in path.read_text().splitlines()] == [{"call": 0, "loss": None}]
    assert read_rows(tmp_path / "missing.jsonl") == []
