"""Where a step's device time goes: capture a `jax.profiler` trace of a few calls and summarise it per device.

The summary is what a table needs, not a trace viewer: per device (a GPU, or the host on CPU) the span of the
traced calls, the time it was busy (union of its kernel/op intervals), the idle share split into idle time inside
a call and the gaps between calls (the host's work between steps), and the total time per
kernel category (collectives, GEMMs, attention, copies, other) with the top kernels by name. On GPU the idle
time between kernels is what role branches (the host reads each predicate) and collective waits cost.

Each idle stretch is also attributed by the XLA programs (`hlo_module` of the ops on either side, where the
trace has it): between two programs (the host's work between jitted calls of one engine step, or between
steps) or within one program (predicate reads of conditionals, collective waits, launch-bound runs of small
kernels), and the largest stretches are listed with the ops around them, so a profile says where to look.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
import tempfile

import jax

CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("collective", re.compile(r"nccl|sendrecv|all_to_all|allgather|all_gather|ppermute|collective")),
    ("memcpy", re.compile(r"memcpy|memset|copy")),
    ("attention", re.compile(r"attention|flash|paged")),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|sm90|matmul|dot|cublas|ragged")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if pattern.search(low):
            return label
    return "other"


def _gaps(intervals: list[tuple[float, float]]) -> list[float]:
    """Idle stretches between the pieces of the union of [start, end) intervals, largest first."""
    ops = [{"ts": s, "dur": e - s, "name": ""} for s, e in sorted(intervals)]
    return [d["us"] for d in _gap_details(ops)]


def _gap_details(ordered: list[dict]) -> list[dict]:
    """Idle stretches of the union of the ops' intervals (ops by start time), largest first, each with the op
    that ended last before it and the op that starts it (names and `hlo_module`s; None where the trace has no
    module)."""
    details, last = [], None
    for e in ordered:
        if last is not None and e["ts"] > last["ts"] + last["dur"]:
            details.append({"us": e["ts"] - last["ts"] - last["dur"], "before": last["name"][:80],
                            "after": e["name"][:80], "before_module": program_of(last), "after_module": program_of(e)})
        if last is None or e["ts"] + e["dur"] > last["ts"] + last["dur"]:
            last = e
    return sorted(details, key=lambda d: -d["us"])


def program_of(event: dict) -> str | None:
    """The XLA program (`hlo_module`) a trace event belongs to, where the trace says."""
    return (event.get("args") or {}).get("hlo_module")


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: their span less the gaps (0 for none)."""
    if not intervals:
        return 0.0
    return max(e for _, e in intervals) - min(s for s, _ in intervals) - sum(_gaps(intervals))


def load_events(path: str) -> list[dict]:
    """The events of a perfetto trace: `path` is a perfetto_trace.json.gz, or a directory whose newest one
    (searched recursively) is read."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True),
                       key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}")
        path = found[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def process_names(events: list[dict]) -> dict:
    """pid -> process name ("/device:GPU:0", "/host:CPU", ...)."""
    return {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}


def summarize(trace_dir: str, calls: int = 1, top: int = 12) -> dict:
    """Summary of the newest perfetto trace under trace_dir (jax.profiler.trace(create_perfetto_trace=True)).
    Times in microseconds, per call (divided by `calls`)."""
    events = load_events(trace_dir)
    names = process_names(events)
    devices = [pid for pid, n in names.items() if n.startswith("/device:")] or list(names)
    out = {}
    for pid in devices:
        ops = [e for e in events if e.get("ph") == "X" and e.get("pid") == pid and e.get("dur", 0) > 0]
        if not ops:
            continue
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in ops]
        span = max(e for _, e in spans) - min(s for s, _ in spans)
        ordered = sorted(ops, key=lambda e: e["ts"])
        details = _gap_details(ordered)
        gaps = [d["us"] for d in details]
        busy = span - sum(gaps)
        # with several calls traced, the calls-1 largest gaps are (mostly) the host's time between calls;
        # the rest of the idle time is inside the calls (branch predicates, collective waits, launches)
        between = sum(gaps[: calls - 1])
        inside = details[calls - 1:]
        known = [d for d in inside if d["before_module"] and d["after_module"]]
        across = sum(d["us"] for d in known if d["before_module"] != d["after_module"])
        within = sum(d["us"] for d in known if d["before_module"] == d["after_module"])
        modules = [m for m in map(program_of, ordered) if m]
        runs = 1 + sum(a != b for a, b in zip(modules, modules[1:]))
        by_cat, by_name = collections.Counter(), collections.Counter()
        for e in ops:
            by_cat[category(e["name"])] += e["dur"]
            by_name[e["name"][:80]] += e["dur"]
        out[names[pid]] = {
            "span_us": span / calls, "busy_us": busy / calls, "idle_share": 1 - busy / span if span else 0.0,
            "between_calls_us": between / max(calls - 1, 1), "in_call_idle_us": (span - busy - between) / calls,
            "largest_gaps_us": gaps[:5], "ops_per_call": len(ops) / calls,
            # idle inside the calls, attributed by the programs around it (a gap next to an op that names no
            # program is in neither); program runs: stretches of consecutive ops of one program
            "idle_between_programs_us": across / calls, "idle_within_programs_us": within / calls,
            "program_runs_per_call": runs / calls if any(modules) else None,
            "largest_gaps": details[:8],
            "by_category_us": {k: v / calls for k, v in by_cat.most_common()},
            "top_us": [(n, v / calls) for n, v in by_name.most_common(top)]}
    return out


@contextlib.contextmanager
def traced(trace_dir: str | None = None):
    """with traced() as where: ...  (where() gives the directory after the block)."""
    directory = trace_dir or tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        yield lambda: directory


def format_summary(summary: dict) -> str:
    lines = []
    for device, s in summary.items():
        cats = ", ".join(f"{k} {v:.0f}" for k, v in s["by_category_us"].items())
        lines.append(f"{device}: span {s['span_us']:.0f} us, busy {s['busy_us']:.0f} us "
                     f"(idle {s['idle_share']:.0%}: {s['in_call_idle_us']:.0f} us inside a call, "
                     f"{s['between_calls_us']:.0f} us between calls), {s['ops_per_call']:.0f} ops; {cats}")
        lines.extend(f"    {v:9.1f} us  {n}" for n, v in s["top_us"][:6])
        if s.get("program_runs_per_call") is not None:
            lines.append(f"    idle inside a call: {s['idle_between_programs_us']:.0f} us between programs, "
                         f"{s['idle_within_programs_us']:.0f} us within one; "
                         f"{s['program_runs_per_call']:.1f} program runs per call")
        for d in s.get("largest_gaps", [])[:4]:
            lines.append(f"    gap {d['us']:8.1f} us  after {d['before']} [{d['before_module']}]  "
                         f"before {d['after']} [{d['after_module']}]")
    return "\n".join(lines)


__all__ = ["category", "format_summary", "load_events", "process_names", "program_of", "summarize", "traced"]
