"""Print one profiled stretch of engine steps as a timeline: what the host's Python thread did and what each device
ran, side by side in time, so the idle stretches bench/device_trace.py counts can be read against the host
work that caused them.

    python tools/step_timeline.py TRACE_DIR_OR_FILE [--min_us 30] [--host_depth 6]
    python tools/step_timeline.py TRACE_DIR_OR_FILE --launches body_mosaic_gpu_kernel [--steps 2]

TRACE_DIR_OR_FILE: a perfetto_trace.json.gz, or a directory holding one (`jax.profiler.trace(...,
create_perfetto_trace=True)`, e.g. benchmarks/disagg.py --profile_steps 2 --trace_dir DIR). Host lines: events of
the thread with the most Python frames (the engine's) lasting at least --min_us, nested at most --host_depth
deep (Python frames, PjRt and XLA runtime spans). Device lines: consecutive ops of one XLA program merged into one
line (ops, busy time); copies and ops of no program on lines of their own; an idle stretch of at least --min_us
gets a line of its own.

--launches NAME: instead, every launch of the kernel NAME grouped by its launch shape (the profiler's
`kernel_details`: grid, block, registers, shared memory), with launches and device us per step (--steps: how many
steps the trace holds) and per launch. Tells apart kernels that share a name, such as the Mosaic GPU kernels
(all `body_mosaic_gpu_kernel`): the LoRA shrink and expand and the expert GEMM differ in grid and SMEM.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from infinilora_jax.bench import device_trace  # noqa: E402


def host_lines(events: list[dict], min_us: float, max_depth: int) -> list[tuple[float, str]]:
    """(start, line) for the python thread's spans, indented by nesting."""
    python = collections.Counter((e["pid"], e["tid"]) for e in events
                                 if e.get("ph") == "X" and e.get("name", "").startswith("$"))
    if not python:
        return []
    thread = python.most_common(1)[0][0]  # the thread with the most Python frames: the engine's
    spans = sorted((e for e in events if e.get("ph") == "X" and (e["pid"], e["tid"]) == thread),
                   key=lambda e: (e["ts"], -e.get("dur", 0)))
    lines, open_ends = [], []
    for e in spans:
        while open_ends and open_ends[-1] <= e["ts"]:
            open_ends.pop()
        depth = len(open_ends)
        open_ends.append(e["ts"] + e.get("dur", 0))
        if depth < max_depth and e.get("dur", 0) >= min_us:
            lines.append((e["ts"], f"host   {'  ' * depth}{e['name'][:90]}  {e['dur']:.0f} us"))
    return lines


def device_lines(events: list[dict], min_us: float) -> list[tuple[float, str]]:
    """(start, line) per device: runs of one program's ops, copies, and idle stretches."""
    names = device_trace.process_names(events)
    lines = []
    for pid, device in names.items():
        if not device.startswith("/device:"):
            continue
        ops = sorted((e for e in events if e.get("ph") == "X" and e["pid"] == pid and e.get("dur", 0) > 0),
                     key=lambda e: e["ts"])
        run, end = None, None
        for e in ops + [None]:
            module = e and device_trace.program_of(e)
            if run and (e is None or module is None or module != run["module"]
                        or e["ts"] - end >= min_us):
                label = run["module"] or run["name"][:60]
                lines.append((run["ts"], f"{device[8:]:6} {label}: {run['ops']} op(s), busy {run['busy']:.0f} us, "
                                         f"ends +{end - run['ts']:.0f} us"))
                run = None
            if e is None:
                break
            if end is not None and e["ts"] - end >= min_us:
                lines.append((end, f"{device[8:]:6} -- idle {e['ts'] - end:.0f} us"))
            if run is None:
                run = {"ts": e["ts"], "module": module, "name": e["name"], "ops": 0, "busy": 0.0}
            run["ops"] += 1
            run["busy"] += e["dur"]
            end = max(end or 0, e["ts"] + e["dur"])
    return lines


def launches(events: list[dict], name: str, steps: int) -> list[str]:
    """One line per launch shape of kernel `name`, the costliest first."""
    groups = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name") == name:
            groups[e.get("args", {}).get("kernel_details", "(no details)")].append(e["dur"])
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    return [f"{sum(d) / steps:9.1f} us/step  {len(d) / steps:5.1f} launches/step  {sum(d) / len(d):8.1f} us each  "
            f"{details}" for details, d in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--min_us", type=float, default=30.0)
    parser.add_argument("--host_depth", type=int, default=6)
    parser.add_argument("--launches", help="kernel name: its launches by launch shape instead of the timeline")
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (per-step figures)")
    args = parser.parse_args()
    events = device_trace.load_events(args.trace)
    if args.launches:
        lines = launches(events, args.launches, args.steps)
        print("\n".join(lines) if lines else f"no launches of {args.launches}")
        return
    lines = sorted(host_lines(events, args.min_us, args.host_depth) + device_lines(events, args.min_us))
    if not lines:
        raise SystemExit("no events")
    t0 = lines[0][0]
    for ts, text in lines:
        print(f"{(ts - t0) / 1e3:9.3f} ms  {text}")


if __name__ == "__main__":
    main()
