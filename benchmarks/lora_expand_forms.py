"""The reference LoRA expand (and shrink) at decode sizes in several forms: which should lora/reference.py use?

    einsum    einsum("nr,nro->no", shrink, B rows gathered as [n, R, O] float32): lora/reference.py's form.
              On an H200, XLA computed it as a transpose of the gathered [n, O, R] plus a reduction (~43-56 us
              per call at the shapes below, 0.8 ms per 8-layer decode step on the LoRA server).
    rows      sum over r of shrink[:, r] * (B row r of each row's adapter): one loop fusion that reads each B row
              once; on XLA:CPU it doubled the tests' compile times.

The shrink (`--ops shrink`; x [n, D_in] against each row's gathered rank-major A rows [n, R, D_in], float32
out), which the fifteenth session's profile put among the 8-layer decode step's largest LoRA items (the
reference takes ~2.2x the bytes floor per expert call, the expand alone runs near it):
    einsum    einsum("ni,nri->nr", x, A rows gathered, preferred float32): lora/reference.py's form
    mulsum    sum over i of float32(A rows) * float32(x): an elementwise product and a reduction
    batched   dot_general with n as the batch dimension (a batched matrix-vector product)

Shapes: per-expert decode of Qwen3-30B-A3B widths (512 expert rows, 33 slots x 128 experts, rank 32) for the
gate_up (O = 1536) and down (O = 2048) expand (shrink: D_in 2048 and 768), and a dense projection (64 rows,
O = 4096; shrink D_in 2048). Prints run time (median, inside a jitted loop of static trip count) and compile
time per form, and writes JSON.

    PYTHONPATH=. python3 benchmarks/lora_expand_forms.py --ops expand,shrink --out $OUT/lora_expand_forms.json
    PYTHONPATH=. python3 benchmarks/lora_expand_forms.py --smoke    # CPU, small shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from infinilora_jax.bench.child_items import loop_seconds  # noqa: E402

F32 = jnp.float32


def expand_einsum(shrink, b_rows, idx):
    return jnp.einsum("nr,nro->no", shrink, b_rows[idx].astype(F32))


def expand_rows(shrink, b_rows, idx):
    out = shrink[:, 0:1] * b_rows[idx[:, 0]].astype(F32)
    for r in range(1, shrink.shape[1]):
        out = out + shrink[:, r:r + 1] * b_rows[idx[:, r]].astype(F32)
    return out


FORMS = {"einsum": expand_einsum, "rows": expand_rows}


def shrink_einsum(x, a_rows, idx):
    return jnp.einsum("ni,nri->nr", x, a_rows[idx], preferred_element_type=F32)


def shrink_mulsum(x, a_rows, idx):
    return jnp.sum(a_rows[idx].astype(F32) * x[:, None, :].astype(F32), axis=-1)


def shrink_batched(x, a_rows, idx):
    return jax.lax.dot_general(a_rows[idx], x[:, :, None], (((2,), (1,)), ((0,), (0,))),
                               preferred_element_type=F32)[..., 0]


SHRINK_FORMS = {"einsum": shrink_einsum, "mulsum": shrink_mulsum, "batched": shrink_batched}


def shrink_cases(smoke: bool):
    if smoke:
        return [("expert gate_up shrink (small)", 32, 5 * 4, 8, 192)]
    return [("expert gate_up shrink", 512, 33 * 128, 32, 2048), ("expert down shrink", 512, 33 * 128, 32, 768),
            ("dense shrink 2048", 64, 33, 32, 2048)]


def run_shrink_case(name, n, pages, rank, width, iters, repeats):
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (n, width), jnp.bfloat16)
    a_rows = jax.random.normal(k[1], (pages * rank, width), jnp.bfloat16)
    idx = jax.random.randint(k[2], (n, 1), 0, pages) * rank + jnp.arange(rank)[None, :]
    return _time_forms(name, SHRINK_FORMS, (x, a_rows, idx), dict(rows=n, rank=rank, width=width), iters,
                       repeats)


def cases(smoke: bool):
    if smoke:
        return [("expert gate_up (small)", 32, 5 * 4, 8, 192), ("dense (small)", 8, 5, 8, 256)]
    return [("expert gate_up", 512, 33 * 128, 32, 1536), ("expert down", 512, 33 * 128, 32, 2048),
            ("dense 4096", 64, 33, 32, 4096)]


def run_case(name, n, pages, rank, width, iters, repeats):
    k = jax.random.split(jax.random.key(0), 3)
    shrink = jax.random.normal(k[0], (n, rank), F32)
    b_rows = jax.random.normal(k[1], (pages * rank, width), jnp.bfloat16)
    idx = jax.random.randint(k[2], (n, 1), 0, pages) * rank + jnp.arange(rank)[None, :]
    return _time_forms(name, FORMS, (shrink, b_rows, idx), dict(rows=n, rank=rank, width=width), iters, repeats)


def _time_forms(name, forms, args, info, iters, repeats):
    """Each form on args: compile time, run time in a jitted loop, max error against the first form."""
    rows = []
    want = None
    for form, fn in forms.items():
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        got = compiled(*args)
        want = got if want is None else want
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        seconds = loop_seconds(fn, args, iters, repeats)
        rows.append(dict(case=name, form=form, **info, us=1e6 * seconds, compile_s=compile_s, err=err))
        print(f"  {name:24} {form:7} {rows[-1]['us']:10.1f} us   compile {compile_s:6.2f} s   err {err:.1e}",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ops", default="expand", help="expand, shrink or both (comma-separated)")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    iters, repeats = (2, 2) if a.smoke else (a.iters, a.repeats)
    ops = a.ops.split(",")
    print(f"== LoRA reference forms ({a.ops}) on {jax.devices()[0].device_kind}")
    rows = []
    if "expand" in ops:
        rows += [r for c in cases(a.smoke) for r in run_case(*c, iters=iters, repeats=repeats)]
    if "shrink" in ops:
        rows += [r for c in shrink_cases(a.smoke) for r in run_shrink_case(*c, iters=iters, repeats=repeats)]
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
