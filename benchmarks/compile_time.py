"""Start-up cost: how long one engine step program takes to trace + lower and to compile, by implementation.

A server compiles every step shape before traffic (LLMEngine.warmup: tens of programs). On an H200 a 2-layer
Qwen3-30B-A3B-width engine's warm-up took ~9 minutes (docs/benchmarks.md), so the parts matter: tracing and
lowering run in Python one program at a time (Mosaic GPU kernels are built as MLIR there), XLA's compilation
(with autotuning on the GPU) runs in threads. For each (expert GEMM, LoRA backend) pair and depth this times
`sample` for a decode and a prefill shape: trace + lower, then compile, each program built once (no
persistent cache).

    PYTHONPATH=. python benchmarks/compile_time.py --model configs/models/qwen3-30b-a3b.json --layers 2,4 \\
        --impls auto/auto,ragged_dot/reference --out $OUT/compile_time.json
    # every warmup shape's forward, lowered only: the kernel lowering cache off, then on
    for c in off on; do INFINILORA_MOSAIC_LOWERING_CACHE=$c PYTHONPATH=. python benchmarks/compile_time.py \\
        --model configs/models/qwen3-30b-a3b.json --layers 2 --impls auto/auto --lower_all --max_num_seqs 16 \\
        --prefill_tokens 256 --max_model_len 256; done
    # the disaggregated step (1+1), which still traces every layer (docs/architecture/04-engine.md)
    PYTHONPATH=. python benchmarks/compile_time.py --mode disaggregated --layers 2,8 --dtype float32
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

from infinilora_jax import LLM  # noqa: E402
from meshes.layouts import ROLE_LAYOUTS  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", None, "configs/models/*.json (random weights); default: bundled tiny")
flags.DEFINE_list("layers", ["2"], "depths to time")
flags.DEFINE_list("impls", ["auto/auto", "ragged_dot/reference"], "expert GEMM / LoRA backend pairs ('auto': the "
                  "platform default)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "")
flags.DEFINE_integer("rank", 32, "")
flags.DEFINE_integer("max_num_seqs", 32, "decode shape: this many rows")
flags.DEFINE_integer("prefill_tokens", 128, "prefill shape: this many tokens (the step budget)")
flags.DEFINE_integer("max_model_len", 512, "")
flags.DEFINE_enum("mode", "coupled", ["coupled", "disaggregated"], "the disaggregated engine runs on --layout")
flags.DEFINE_string("layout", "1+1", "role layout of the disaggregated engine (meshes/layouts.py ROLE_LAYOUTS)")
flags.DEFINE_bool("lower_all", False, "instead: trace + lower (no compile) the generation forward of every step "
                  "shape LLMEngine.warmup builds, in its order, and report each and the total (what a start-up "
                  "spends lowering, serially, before any compile; a restart with a warm persistent cache still "
                  "pays it). INFINILORA_MOSAIC_LOWERING_CACHE=off|on compares the kernel lowering cache")
flags.DEFINE_string("out", None, "write this JSON")


def step_program(runner, batch, rows_out: int) -> tuple:
    """(the generation step's forward program, its arguments for one batch) in the engine's mode (weights as
    shapes only), as the runner's precompile builds them: coupled `logits` (its sampler is a separate small
    program), disaggregated `sample`."""
    if F.mode == "coupled":
        return runner.steps.logits, runner.logits_args(batch, rows_out)
    return runner.steps.sample, runner.sample_args(batch, rows_out)


def build_engine(layers: int):
    """(the LLM at this depth in --mode, the engine of its first base instance: the one whose shapes are timed)."""
    llm = LLM(F.model, dtype=F.dtype, num_layers=layers, max_lora_rank=F.rank, max_adapters=4,
              max_num_seqs=F.max_num_seqs, max_num_batched_tokens=F.prefill_tokens, max_model_len=F.max_model_len,
              progress=False, **({} if F.mode == "coupled" else {"mode": F.mode, "mesh": F.layout}))
    return llm, getattr(llm.engine, "instances", [llm.engine])[0]


def lower_step(engine, tokens: int, pages: int, prefill: bool, gemm: str, lora: str):
    """(the generation step program of this shape traced and lowered, seconds it took) with this expert GEMM and
    LoRA backend ("auto": the platform's default)."""
    from infinilora_jax.models import grouped_matmul
    from infinilora_jax.models.batch import padding_batch
    from pallas_kernels import dispatch

    program, args = step_program(engine.runner, padding_batch(engine.shapes, tokens, pages, prefill), engine.rows_out)
    with grouped_matmul.use_expert_gemm(gemm), dispatch.CHOICE.use(lora):
        t0 = time.perf_counter()
        lowered = program.trace(*args).lower()
        return lowered, time.perf_counter() - t0


def time_programs(layers: int, gemm: str, lora: str) -> list[dict]:
    llm, engine = build_engine(layers)
    pages = engine.shapes.page_buckets()[-1]
    rows = []
    for n, prefill in ((engine.shapes.tokens(F.max_num_seqs), False), (engine.shapes.tokens(F.prefill_tokens), True)):
        lowered, lower_s = lower_step(engine, n, pages, prefill, gemm, lora)
        t1 = time.perf_counter()
        lowered.compile()
        row = {"mode": F.mode, "layers": layers, "expert_gemm": gemm, "lora_backend": lora, "tokens": n, "pages": pages,
               "prefill": prefill, "trace_lower_s": lower_s, "compile_s": time.perf_counter() - t1,
               "hlo_chars": len(lowered.as_text())}
        print(f"  L={layers} {gemm:>10}/{lora:<9} {'prefill' if prefill else 'decode':>7} T={n:<4} "
              f"trace+lower {row['trace_lower_s']:6.1f} s   compile {row['compile_s']:6.1f} s", flush=True)
        rows.append(row)
    del llm, engine
    return rows


def lower_all_programs(layers: int, gemm: str, lora: str) -> list[dict]:
    """Trace + lower the generation program of every warmup shape (LLMEngine.program_shapes), one after another."""
    from infinilora_jax.trace_choice import env_choice
    from pallas_kernels.gpu import kernel_lowering_cache

    cache = env_choice(kernel_lowering_cache.ENV_VAR, kernel_lowering_cache.MODES, "on")
    llm, engine = build_engine(layers)
    rows = []
    for n, pages, prefill in engine.program_shapes():
        _, lower_s = lower_step(engine, n, pages, prefill, gemm, lora)
        rows.append({"mode": F.mode, "layers": layers, "expert_gemm": gemm, "lora_backend": lora, "tokens": n,
                     "pages": pages, "prefill": prefill, "trace_lower_s": lower_s, "lowering_cache": cache})
        print(f"  L={layers} {gemm:>10}/{lora:<9} T={n:<4} P={pages:<4} {'prefill' if prefill else 'decode':>7} "
              f"trace+lower {lower_s:6.2f} s", flush=True)
    total = sum(r["trace_lower_s"] for r in rows)
    print(f"  L={layers} {gemm}/{lora}: {len(rows)} programs, trace+lower {total:.1f} s in all", flush=True)
    del llm, engine
    return rows


def main(argv):
    del argv
    import jax

    if F.mode == "disaggregated":
        jax.config.update("jax_num_cpu_devices", ROLE_LAYOUTS[F.layout].num_devices)  # the CPU backend only
    print(f"== step-program build times on {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for layers in (int(x) for x in F.layers):
        for pair in F.impls:
            gemm, lora = pair.split("/")
            rows += (lower_all_programs if F.lower_all else time_programs)(layers, gemm, lora)
            if F.out:  # so far
                with open(F.out, "w") as f:
                    json.dump({"device": jax.devices()[0].device_kind, "model": F.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
