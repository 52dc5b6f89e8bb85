"""The JSON files of per-device kernel settings (tpu/tuned_blocks.json, gpu/tuned_blocks.json): reading an entry
into its settings dataclass, and the tuning scripts' rewrite of entries (one entry per line, as committed)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

log = logging.getLogger(__name__)


@functools.cache
def load_table(path: str) -> dict[str, dict]:
    with open(path) as f:
        return json.load(f)


def settings(path: str, key: str, cls, default, what: str, tune_script: str):
    """The entry `key` of the table at `path` as a `cls` (keys that are not its fields, such as provenance, are
    left out); `default` with a logged warning naming `what` and the script that fills it when there is none."""
    entry = load_table(path).get(key)
    if entry is None:
        log.warning("no %s for %s; using defaults %s (run %s)", what, key, default, tune_script)
        return default
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in entry.items() if k in fields})


def write_entries(entries: dict[str, dict], path: str) -> None:
    """Merge `entries` into the table at `path`: each entry's fields over the old entry's, other entries kept."""
    table = {}
    if os.path.exists(path) and os.path.getsize(path):
        with open(path) as f:
            table = json.load(f)
    for key, entry in entries.items():
        table[key] = {**table.get(key, {}), **entry}
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(f'  "{k}": {json.dumps(v)}' for k, v in table.items()) + "\n}\n")
    load_table.cache_clear()
