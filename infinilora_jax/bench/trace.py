"""A user's own request trace (CSV or JSONL), read with grain, turned into a workload.

Each record has four fields:
  timestamp      arrival time in seconds (any origin; records may come in any order, they are sorted)
  adapter        the adapter's name; empty, null or "-" for the base model
  prompt_tokens  prompt length in tokens (>= 1)
  output_tokens  tokens to generate (>= 1)
CSV files have a header row naming the columns (other columns are ignored); JSONL files hold one JSON object per
line (blank lines are skipped). BurstGPT's own column names ("Timestamp", "Model", "Request tokens",
"Response tokens") are accepted as aliases, so its CSV loads as is, its model column playing the adapter.

Lines are read into a grain MapDataset and parsed by a map over it; a bad record raises TraceError naming the
file, the line and the field.

    records = read_trace("trace.jsonl")
    requests, names = to_requests(records, rate=8.0, vocab_size=512)   # replayed at a mean of 8 requests/s
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os

import grain
import numpy as np

from infinilora_jax.bench.workload import WorkloadRequest

FIELDS = ("timestamp", "adapter", "prompt_tokens", "output_tokens")
ALIASES = {"timestamp": ("timestamp", "Timestamp", "time", "arrival"),
           "adapter": ("adapter", "Adapter", "model", "Model", "lora"),
           "prompt_tokens": ("prompt_tokens", "Request tokens", "input_tokens"),
           "output_tokens": ("output_tokens", "Response tokens", "max_tokens")}
BASE_NAMES = ("", "-", "none", "null", "base")


class TraceError(ValueError):
    """A trace file or record that cannot be used; the message names the file, line and field."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


@dataclasses.dataclass(frozen=True)
class TraceRecord:
    timestamp: float
    adapter: str | None
    prompt_tokens: int
    output_tokens: int
    line: int  # where it came from, for messages


def read_trace(path: str, fmt: str | None = None) -> list[TraceRecord]:
    """The records of a CSV or JSONL trace (format from the extension unless given), sorted by timestamp."""
    fmt = fmt or ("csv" if path.lower().endswith(".csv") else "jsonl")
    if fmt not in ("csv", "jsonl"):
        raise TraceError(path, None, f"unknown trace format {fmt!r}: use csv or jsonl")
    if not os.path.isfile(path):
        raise TraceError(path, None, "no such file")
    rows = _csv_rows(path) if fmt == "csv" else _jsonl_rows(path)
    if not rows:
        raise TraceError(path, None, "the trace has no records")
    dataset = grain.MapDataset.source(rows).map(lambda row: _parse(path, *row))
    return sorted(dataset, key=lambda r: r.timestamp)


def _csv_rows(path: str) -> list[tuple[int, dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise TraceError(path, 1, "empty CSV file: expected a header row")
        columns = {}
        for field, names in ALIASES.items():
            found = next((n for n in names if n in reader.fieldnames), None)
            if found is None:
                raise TraceError(path, 1, f"the header has no {field!r} column (columns: {reader.fieldnames})")
            columns[field] = found
        rows = []
        for row in reader:
            if None in row:  # more cells than header columns
                raise TraceError(path, reader.line_num, f"{len(reader.fieldnames) + len(row[None])} cells for "
                                                        f"{len(reader.fieldnames)} header columns")
            rows.append((reader.line_num, {field: row[col] for field, col in columns.items()}))
        return rows


def _jsonl_rows(path: str) -> list[tuple[int, dict]]:
    rows = []
    with open(path) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(path, number, f"not valid JSON: {e.msg}") from e
            if not isinstance(obj, dict):
                raise TraceError(path, number, f"expected a JSON object, got {type(obj).__name__}")
            row = {}
            for field, names in ALIASES.items():
                key = next((n for n in names if n in obj), None)
                if key is None and field != "adapter":
                    raise TraceError(path, number, f"missing field {field!r}")
                row[field] = obj.get(key) if key is not None else None
            rows.append((number, row))
    return rows


def _parse(path: str, line: int, row: dict) -> TraceRecord:
    def number(field: str, kind):
        value = row.get(field)
        try:
            if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError
            x = float(value)
            if kind is int:
                if not x.is_integer():
                    raise ValueError
                x = int(x)
        except (TypeError, ValueError):
            raise TraceError(path, line, f"{field}={value!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        return x

    timestamp = number("timestamp", float)
    if not math.isfinite(timestamp):
        raise TraceError(path, line, f"timestamp={row['timestamp']!r} is not finite")
    prompt, output = number("prompt_tokens", int), number("output_tokens", int)
    for field, value in (("prompt_tokens", prompt), ("output_tokens", output)):
        if value < 1:
            raise TraceError(path, line, f"{field}={value} must be at least 1")
    adapter = row.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise TraceError(path, line, f"adapter={adapter!r} is not a string")
    adapter = None if adapter is None or adapter.strip().lower() in BASE_NAMES else adapter.strip()
    return TraceRecord(timestamp, adapter, prompt, output, line)


def to_requests(records: list[TraceRecord], rate: float | None = None, vocab_size: int | None = None,
                seed: int = 0) -> tuple[list[WorkloadRequest], list[str]]:
    """Workload requests replaying the trace from t=0, and the adapter names they index (most requested
    first, like a Zipf workload's adapter 0). With `rate`, arrival times are scaled so that the mean rate
    (requests per second over the trace's span) is `rate`; prompts are random token ids when vocab_size is given."""
    if not records:
        return [], []
    counts = collections.Counter(r.adapter for r in records if r.adapter is not None)
    names = [name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    index = {name: i for i, name in enumerate(names)}
    t0, span = records[0].timestamp, records[-1].timestamp - records[0].timestamp
    scale = 1.0
    if rate is not None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        scale = (span / max(len(records) - 1, 1)) * rate if span > 0 else 0.0  # observed mean gap / wanted gap
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        arrival = (r.timestamp - t0) / scale if scale > 0 else 0.0
        prompt = None if vocab_size is None else rng.integers(3, vocab_size, r.prompt_tokens).tolist()
        out.append(WorkloadRequest(arrival, None if r.adapter is None else index[r.adapter], prompt, r.output_tokens,
                                   r.prompt_tokens))
    return out, names
