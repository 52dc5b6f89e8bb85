"""GPU benchmark items run one per child process, and the in-loop timing they use.

A CUDA fault (misaligned address, illegal access) poisons a whole process, so the GPU kernel scripts
(tools/gpu_lora_kernel_check.py, benchmarks/expert_gemm.py) run every item in a child. A child prints its
progress as STAGE lines and its results as TAG lines (JSON); the parent reads them back with `run_child`, and
a child that crashed or timed out is reported with the stage it was in, its CUDA error and its stderr tail.

jax is imported only inside the timing functions: a parent must not touch the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import time

TAG, STAGE = "@@ROW ", "@@STAGE "  # a child's result and progress lines


def stage(name: str) -> None:
    """Child: the stage it enters (a crash is attributed to the last one)."""
    print(f"{STAGE}{name}", flush=True)


def emit(row: dict) -> None:
    """Child: one result row."""
    print(TAG + json.dumps(row, default=float), flush=True)


def _text(stream) -> str:
    return stream.decode() if isinstance(stream, bytes) else (stream or "")


@dataclasses.dataclass
class ChildRun:
    rows: list[dict]
    stages: list[str]
    rc: int | str  # "timeout" when killed
    stderr: str
    wall_s: float

    @property
    def failure(self) -> str | None:
        """TIMEOUT, CRASH rc=N or NO ROW; None when the child exited cleanly with rows."""
        if self.rc == "timeout":
            return "TIMEOUT"
        if self.rc != 0:
            return f"CRASH rc={self.rc}"
        return None if self.rows else "NO ROW"

    def failure_fields(self) -> dict:
        """A failed item's row fields: error, detail (the stage it died in, and its CUDA error) and stderr tail."""
        why = self.failure
        lines = self.stderr.splitlines()
        cuda = next((ln.strip()[:160] for ln in lines if "CUDA_ERROR" in ln or "CUDA error" in ln), "")
        tail = [ln for ln in lines if ln.strip() and "Source Location" not in ln
                and not ln.startswith(("===", "external/", "jaxlib/"))][-12:]
        return dict(ok=False, error=why, detail=f"{why} in stage '{self.stages[-1] if self.stages else '?'}'"
                    + (f": {cuda}" if cuda else ""), tail=tail)


def run_child(cmd: list[str], env: dict, timeout: float) -> ChildRun:
    """Run one child to completion or `timeout` seconds; its rows, stages, exit and stderr."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = _text(e.stdout), _text(e.stderr), "timeout"
    lines = out.splitlines()
    return ChildRun([json.loads(ln[len(TAG):]) for ln in lines if ln.startswith(TAG)],
                    [ln[len(STAGE):] for ln in lines if ln.startswith(STAGE)], rc, err, time.perf_counter() - t0)


def feedback_loop(fn):
    """jit of loop(n, first, *rest): n calls of fn(first, *rest) in one fori_loop. n is static (a compile per
    n): with a traced trip count XLA:GPU reads the loop's condition back to the host every iteration (~20 us
    per timed call; the fifth session's expert-GEMM table paid it, the LoRA kernel tables before the shared
    harness had static counts). Each
    iteration feeds a zero made from the sum of its whole output back into `first`, so XLA can neither hoist the
    call nor shrink it to the part one element needs (a zero from one output element let XLA slice pure-XLA
    variants down to one row)."""
    import jax
    import jax.numpy as jnp

    def loop(n, first, *rest):
        def body(_, v):
            out = fn(v, *rest)
            return v.at[0, 0].add((jnp.sum(out, dtype=jnp.float32) * 0).astype(v.dtype))
        return jax.lax.fori_loop(0, n, body, first)

    return jax.jit(loop, static_argnums=0)


def loop_seconds(fn, args, iters: int, repeats: int) -> float:
    """Median seconds per call of fn(*args): `iters` calls in one `feedback_loop`, timed `repeats` times after
    one compiling run."""
    import jax

    run = feedback_loop(fn)
    jax.block_until_ready(run(iters, *args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(iters, *args))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def copy_seconds(buf, iters: int, repeats: int) -> float:
    """Median seconds of one pass that reads and writes all of `buf` (2 * buf.nbytes bytes): the buffer is the
    loop carry of `iters` elementwise updates, timed `repeats` times after one compiling run."""
    import jax
    import jax.numpy as jnp

    run = jax.jit(lambda v: jax.lax.fori_loop(0, iters, lambda _, a: a + jnp.asarray(1, a.dtype), v))
    jax.block_until_ready(run(buf))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(buf))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


__all__ = ["STAGE", "TAG", "ChildRun", "copy_seconds", "emit", "feedback_loop", "loop_seconds", "run_child", "stage"]
