#!/usr/bin/env bash
# The pending GPU measurements, in priority order, each a stage that fits one device call (run from the repo root
# on the device machine; logs and JSON under $OUT). Done (docs/benchmarks.md, fifth to eighth sessions): the expert
# GEMM choice at decode and prefill widths, autotune on/off, the kernel numerics, the push's 1+1 parity, the
# reference expand's form, the host's share of a 4-layer decode step, the start-up fix (compile_time), decode
# with both modes in one call (eighth session: 0.99x). When an nvidia-h200-x4 is lent, x4_decode and x4_sweep
# (issue 8's 2+2) come first; then mixtral_sweep (rerun with settled caches), then slo_sweep with
# ADAPTER_LOADING=background. An 8-GPU machine: x8_decode and x8_sweep (issue 8). When only one GPU is lent:
# lora_kernels_expert; expert_gemm; flag_parity before any XLA setting becomes a default. With two GPUs: decode
# (both modes now queue steps ahead; ASYNC=false for one at a time), then the sweeps. Done on one GPU in the
# sixteenth session: lora_kernels on GPU.md's peer shapes, per-expert rows in place, lora_step LAYERS=4 with
# the expert calls on the kernels (a tie in device time; 8 layers needs TIMEOUT >= 400 for `auto`). Done on one
# GPU in the seventeenth: PHASES=expand tune_gpu_blocks (one tile per CTA kept), lora_step with kernel names
# counter/content (INFINILORA_MOSAIC_KERNEL_NAMES), lora_kernels_expert, prefill_lora, startup, compile_time
# --lower_all with the kernel lowering cache off and on (42.3 -> 21.2 s). Done in the eighteenth: lora_window
# (the window-major expand, every unit on windows), lora_step with it. Done in the nineteenth: PHASES=window
# tune_gpu_blocks (the mixed launch lost everywhere: window_unit_rows 0 kept), lora_window with run units
# (TAG=_runs, _runs_sorted), lora_step RUN_ROWS=2048 at LAYERS=4 and 8 (device time -7%, wall step mixed),
# PHASES=runs tune_gpu_blocks. Done in the twentieth: lora_ab at 4 and 8 layers (kernels -6% / +5%: decode
# stays on the reference; LAYERS=16 did not finish compiling in 420 s), lora_segments (tokens in place: the
# shrink beats GPU.md's SGLang figure on all four shapes) with the fixed timing harness, prefill_lora (2.08x),
# PHASES=window tune_gpu_blocks (the mixed launch lost again: removed). Next on one GPU: expert_gemm,
# flag_parity; a fused add of the delta into y for the expand (30 us of a 97 us prefill delta). Fifteenth
# session: cond_host_wait (conditionals do not block the caller), async_scheduling CMDBUF=off and
# UPDATE_MODE=SKIP_TEMP STAGING=via_device at 8 layers (no gain: the step is device-bound), layer_loop,
# host_memory_kinds, step_program_ops, lora_step with command buffers kept on under the profiler (the forward
# busy 5.7 ms per step), lora_forms (no shrink form beats the einsum in the step). Done on one GPU in the
# twelfth to fourteenth sessions: lora_qkv (1-D grid too), kernel_compile, lora_step (reference against kernels at decode, at 2 and 8 layers: the reference wins),
# prefill_lora, every tune_gpu_blocks phase (per-rank dispatch included), lora_per_row, host_inputs,
# async_scheduling (LAYERS="2 8"). Don't pipe a stage through `tail`: a call killed at its limit then returns no
# output (the logs under $OUT still come back).
# Stages:
#
#   compile_time  (1 GPU, ~2 min) benchmarks/compile_time.py at 2 and 8 layers: checks that the Mosaic GPU expert
#                 GEMM is built once per program (done in the seventh session: 8 layers 7.3 s, was 42.5 s).
#   slo_sweep     (2 GPUs, ~9 min) benchmarks/slo_baselines.py --sweep_adapters: coupled as two single-device
#                 replicas against disaggregated 1+1 (issue 6's curve and issue 7's GPU rows). Both modes run
#                 ragged_dot + the reference LoRA math: with the Mosaic kernels the ~240 programs' lowering alone
#                 would not fit one call (sixth session: the coupled replicas took 9 minutes to compile).
#                 BASELINES, COUNTS (adapter counts, in the order run), REQUESTS (per probe), START (first
#                 rate), TIMEOUT (s), TAG (output name suffix) and ADAPTER_LOADING (step | background) override.
#                 Seventh session: coupled at 128 and 16 adapters and disaggregated at 128 (4-6 req/s) ran; next:
#                 disaggregated at 16, then ADAPTER_LOADING=background for both modes (2.4x on CPU), e.g.
#                 ADAPTER_LOADING=background BASELINES=coupled,disaggregated COUNTS=128 TAG=_bg.
#   mixtral_sweep (2 GPUs, ~8 min) as slo_sweep, at Mixtral-8x7B widths (rank 64) where a coupled GPU has 14
#                 slots and the LoRA server 70 (arithmetic at the stage): issue 6's target regime. Default
#                 coupled+sjf (the best coupled row at Qwen3 widths) and disaggregated at 64 adapters.
#                 Eighth session: coupled+sjf 2, disaggregated 3 req/s, but the LoRA server's cold loads cost
#                 0.4-1.4 s (first-time staging, since fixed) and its first probe met unstaged adapters; the
#                 sweep now settles the caches first (replay.settle_caches). Rerun: START=8 (one call).
#   push          (2 GPUs, ~7 min) the disaggregated decode step with the device-initiated push
#                 (INFINILORA_EXCHANGE=push; compare with 12.80 ms with ppermute, docs/benchmarks.md).
#   decode        (2 GPUs, ~5 min per mode) benchmarks/disagg.py decode, MODES=coupled1 or disagg (default
#                 coupled1,disagg: too long for one call with mgpu), profiled: device_trace splits the idle time
#                 into gaps between calls and idle inside a call. EXPERT_GEMM=<name> overrides. Coupled modes
#                 queue steps ahead (async scheduling) unless ASYNC=false: the disaggregated engine steps one at a
#                 time, so ASYNC=false is issue 6's like-for-like step comparison (eighth session: 0.99x), the
#                 default the comparison with the coupled engine as users get it.
#   x4_decode     (4 GPUs, ~5 min per mode) benchmarks/disagg.py decode, as `decode` but 2+2 (base ep2 on GPUs
#                 0-1, LoRA server ep2 on 2-3) against coupled on the same four GPUs. One mode per call with mgpu
#                 (MODES, default disagg; then coupled = one ep4 replica, coupled_dp = four single-device replicas,
#                 coupled1 = one of those alone); each mode's log and JSON are named after MODES, so calls do not
#                 overwrite. coupled_dp compiles four replicas at once: if it runs past the limit, EXPERT_GEMM=
#                 ragged_dot (then several modes fit one call). EXPERT_GEMM=<name> overrides.
#   x4_sweep      (4 GPUs, ~9 min per baseline) benchmarks/slo_baselines.py --sweep_adapters as `slo_sweep`, but
#                 disaggregated 2+2 against coupled replicas on the same four GPUs: REPLICAS=4 (default) four
#                 single-device replicas, REPLICAS=2 two ep2 replicas. Run BASELINES=coupled and
#                 BASELINES=disaggregated as separate calls (TAG=_coupled, TAG=_disagg): on 2 GPUs (seventh
#                 session) compiling took ~2 min and each baseline's probes at one count ~1.5-2 min.
#                 Same overrides as `slo_sweep` (BASELINES, COUNTS, REQUESTS, START, TIMEOUT, TAG) and REPLICAS.
#   x8_decode     (8 GPUs, ~5 min per mode) issue 8: benchmarks/disagg.py decode on LAYOUT=role_dp1_ep4 (LoRA
#                 server EP4, the default) or LAYOUT=4+4 (EP2 x PP2, two base instances) against coupled on the
#                 same eight GPUs (MODES=coupled: one ep8 replica; coupled_dp: eight single-device replicas).
#                 MODEL=$MIXTRAL for Mixtral widths. The layouts run on 8 CPU devices in the tests.
#   x8_sweep      (8 GPUs, ~9 min per baseline) issue 8's sweep at 512 adapters (COUNTS), coupled as eight
#                 single-device replicas against the LoRA server layouts (slot arithmetic at the stage); one
#                 baseline and layout per call. Same overrides as slo_sweep, plus LAYOUT and MODEL.
#   cmdbuf        (2 GPUs, ~5 min; MODES=coupled1 on one GPU) the decode step (8 layers) with XLA's CUDA-graph
#                 command buffers extended to conditionals. benchmarks/cond_overhead.py found no gain per role
#                 branch on a synthetic chain (23 vs 24 us); coupled1 at 2 layers went 4.74 -> 4.05 ms with
#                 adapters in one run (sixth session). Since the thirteenth session's timeline the question is
#                 sharper: does `Execute` stop waiting for the sampler's predicates (the host could then run
#                 ahead)? Keeps $OUT/cmdbuf_trace_<mode>_32.json.gz for tools/step_timeline.py. Compare with
#                 `decode` in the same MODES.
#   expert_gemm   (1 GPU, ~8 min) benchmarks/expert_gemm.py: the rows the sixth session's budget did not reach
#                 (Qwen3 down at T=64 with mgpu, Mixtral at T=64, skewed routing).
#   kernel_check  (1 GPU, ~1 min) tools/gpu_lora_kernel_check.py numerics (all ok in the fifth session).
#   lora_kernels_expert (1 GPU, ~5 min) benchmarks/lora_kernels.py, the rows the ninth session's limit cut: per-
#                 expert prefill (Mixtral gate_up and down, Qwen3 down at 1,024 tokens) and ranks 8 / 128 at decode.
#   lora_window   (1 GPU, ~5 min) benchmarks/lora_kernels.py at decode shapes (dense, per expert, fused q/k/v),
#                 profiled: the window-major expand (window_expand.py) against the unit-major one and the
#                 reference. CASES / EXPERT_CASES / QKV_CASES / VARIANTS override, TAG names the output.
#   lora_segments (1 GPU, ~3 min) benchmarks/lora_kernels.py on GPU.md's peer shapes (shrink and delta), tokens
#                 in random order and in segments (`:seg`, SGMV's setting and a step's sequences): the kernels
#                 sorting the tokens against taking them in place (gpu-segments-rm, row_runs). CASES, TAG.
#   prefill_lora  (1 GPU, ~3 min) benchmarks/prefill_lora.py: whole-model prefill (Qwen3 widths, 2 layers,
#                 2,048-row chunks) with the platform's LoRA dispatch (the Mosaic GPU kernels on the rank-major
#                 pool) against the reference (twelfth session: 11.3 against 19.1 ms per prompt, 1.69x).
#   startup       (1 GPU, ~5 min) benchmarks/startup.py at Qwen3 widths, 2 layers: warmup seconds and each
#                 prompt length's first request against a warm one, without and with warmup's padding-batch
#                 runs (seventeenth session: first requests 15-25 ms against 8-10 warm; 7.5-10 with the runs;
#                 no request waited for a Mosaic compile either way).
#   tune_gpu_blocks (1 GPU, ~7 min) tools/tune_gpu_lora_blocks.py: rewrites phases' fields of the H200 entry of
#                 pallas_kernels/gpu/tuned_blocks.json (copy $OUT/tuned_blocks.json back and commit it).
#                 Eleventh session: the prefill phase ran (stages 6, expand cols 128) once group_rows' compile
#                 cost was cut (~40 s -> ~5 s per candidate and problem); twelfth: decode (ksplit 4), buckets
#                 (on), crossover (decode_rows 2048) and the old single-rank dispatch phase; thirteenth: the
#                 per-rank dispatch phase (DISPATCH_RANKS=64,128: ~8 min, then DISPATCH_RANKS=32: ~3 min;
#                 each call's ranks replace those ranks' in the entry; crossovers 256 rows at ranks 32-128).
#                 PHASES=dispatch is the default.
#   layer_loop    (1 GPU, ~3 min) benchmarks/layer_loop.py: host ms to queue a many-layer step, layers unrolled
#                 (as the model) or scanned, per XLA command-buffer setting and update mode (SKIP_TEMP,
#                 SKIP_PROFILED). async_scheduling takes UPDATE_MODE=SKIP_TEMP|SKIP_PROFILED for the real engine,
#                 and STAGING=via_device|device (lora/staging.py: those modes' VMM allocator crashed putting numpy
#                 into pinned host memory).
#   lora_forms    (1 GPU, ~1 min, ~5 with the engine runs) benchmarks/lora_expand_forms.py --ops shrink,expand:
#                 the reference LoRA shrink's forms (INFINILORA_LORA_SHRINK) at decode shapes; when another form
#                 beats the einsum per expert, the 8-layer async step with it and with the einsum, one after the
#                 other (async_scheduling takes SHRINK=form).
#   step_program_ops (1 GPU, ~3 min) tools/step_program_ops.py: the compiled decode `logits` program's kernels by
#                 kind, at 2 and 8 layers, with and without LoRA (kernels per layer: what bounds the async step).
#   flag_parity   (1 GPU, ~4 min) tools/flag_parity.py: greedy tokens (Qwen3 widths, 4 layers, float32, adapters
#                 loaded through fewer slots) with default flags against UPDATE_MODE (default SKIP_TEMP) and
#                 STAGING (default via_device): must be equal.
#   host_memory_kinds (1 GPU, ~1 min) tools/probe_host_memory_kinds.py under UPDATE_MODE (default SKIP_TEMP):
#                 which host-memory transfers the VMM allocator survives, one process per transfer.
#   cond_host_wait (1 GPU, ~1 min) benchmarks/cond_overhead.py --host_wait: does a call whose lax.conds depend
#                 on its own results return before the device is done (default flags; CONDITIONAL in CUDA graphs)?
#                 Decides whether the disaggregated step can be queued ahead with its role branches.
#   lora_ab       (1 GPU, ~4 min per depth) benchmarks/decode_variants.py --compare lora_backend: two engines in
#                 one process (Qwen3 widths, 64 requests, 32 rank-32 adapters, async), the LoRA math on the
#                 reference against `auto` with MIN_ROWS (default 16:2048,32:256,64:256,128:256: the 512-row
#                 expert calls on the kernels, which take run units from the H200 entry's run_rows 512; RUN_ROWS
#                 overrides), alternating blocks of 16 steps: what lowering the dispatcher's 1,024-row floor
#                 waits for (nineteenth session: device time -7%, wall steps +-0.5 ms across processes).
#                 LAYERS (default "4 8"), TIMEOUT (s per depth), TAG.
#   async_scheduling (1 GPU, ~2 min per depth) benchmarks/decode_variants.py --compare async_scheduling: decode
#                 steps (Qwen3 widths, 64 requests, 32 rank-32 adapters) with step N+1 queued before step N's
#                 tokens are read, against one step at a time, alternating blocks in one engine; LAYERS (default
#                 "2 8") picks the depths, one process each. Fourteenth session: 0.82x at 2 layers, 0.67x at 8
#                 (5.65 ms). Next: CMDBUF=off LAYERS=8 (XLA's CUDA-graph command buffers off: the 8-layer trace
#                 shows `command_buffer::update` 1.4-1.7 ms and `cuGraphLaunch` 1.1-1.3 ms of host time per step
#                 inside `Execute` before the device starts, while the device is busy ~2.9 ms per step; launching
#                 kernels one by one lets the device start with the first; compare with 5.65 ms).
#   host_inputs   (1 GPU, ~2 min) benchmarks/decode_variants.py --compare host_inputs: decode steps (Qwen3 widths,
#                 2 layers, 64 requests, 32 adapters) with the step's numpy inputs packed into one copy against
#                 one copy per array, alternating blocks in one engine (fourteenth session: 3.77 against 4.37 ms).
#   lora_per_row  (1 GPU, ~9 min) benchmarks/lora_kernels.py at decode sizes: the kernels on per-row units
#                 (units.per_row_units: no sort, no gathers of x or of the delta; GpuBlocks.per_row_rows, 0 in
#                 the H200 entry) against the grouped kernels and the reference, dense (ranks 16-64), per expert
#                 (Qwen3 gate_up / down, 512 rows) and fused q/k/v. Fourteenth session: per-row loses every
#                 dense and q/k/v case (up to 2.5x slower) and ties per expert (Qwen3 -2 to -4%, Mixtral +7%).
#   lora_qkv      (1 GPU, ~2 min) benchmarks/lora_kernels.py's fused q/k/v cases alone: one add_lora_fused call
#                 (one shrink + one expand launch for three targets) against three add_lora calls and the
#                 reference, at Qwen3 attention widths (twelfth session: fused 8% faster at 2,048 rows, 26%
#                 slower at 256; thirteenth, 1-D expand grid: fused wins at 16, 256 and 2,048 rows, -3% at
#                 256). QKV_CASES (rows:adapters:rank,...) overrides the cases.
#   kernel_compile (1 GPU, ~1 min) benchmarks/lora_kernel_compile.py: compile time of the LoRA kernels' programs
#                 and of their glue's pieces, scatters of each kind included (twelfth session: one scatter of
#                 any kind compiles in 0.05-0.33 s; the prefill delta 1.5 s). Next: what rank buckets (on in
#                 the H200 entry since the twelfth session's tuning, one kernel path per bucket) add to it.
#   lora_step     (1 GPU, ~9 min) the decode step (coupled1, Qwen3 widths, 2 layers, profiled) with the LoRA math
#                 on the reference and on the Mosaic GPU kernels (INFINILORA_LORA_BACKEND=gpu), one process each:
#                 the step-level gain and compile cost that would justify kernels at decode (twelfth session:
#                 kernels 102 s to compile against 38, LoRA 550 us of device time per step against 381).
#                 BACKENDS (default "reference gpu") picks; each keeps its profile's trace as
#                 $OUT/lora_step_<backend>_trace.json.gz for tools/step_timeline.py. The kernels only where
#                 the per-rank dispatch phase found them winning: BACKENDS="reference auto"
#                 MIN_ROWS=16:2048,32:256,64:256,128:256 (INFINILORA_GPU_KERNEL_MIN_ROWS for `auto`; with
#                 64 requests the expert calls have 512 rows, the dense ones 64: experts on the kernels).
#                 WINDOW_UNIT_ROWS=64 puts every unit on the window-major expand
#                 (INFINILORA_GPU_WINDOW_UNIT_ROWS); RUN_ROWS=<rows> calls of up to that many rows on run
#                 units (INFINILORA_GPU_RUN_ROWS, pallas_kernels/gpu/runs.py; they come first: the H200 entry's
#                 512, so WINDOW_UNIT_ROWS reaches only larger calls unless RUN_ROWS=0); TAG names the outputs.
#                 LAYERS (default 2) and TIMEOUT (s per backend, default 270: `auto` at 8 layers needs more
#                 than 290 s to compile, sixteenth session) override.
#                 LAYERS (default 2) sets the depth: with async scheduling (fourteenth session) 2 layers are still
#                 host-bound (2.09 ms per step, 1.58 ms of device time), and 8 too (5.61 ms, ~2.85 ms of device
#                 time: the CUDA graph's update and launch, see async_scheduling).
#
#   ./tools/gpu_runbook.sh compile_time       # device tool: run(command=..., kind=...), one stage per call
set -uo pipefail
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
QWEN=configs/models/qwen3-30b-a3b.json
MIXTRAL=configs/models/mixtral-8x7b.json
# the lines worth reading: no absl/XLA info or warning lines, progress bars split into lines
show() { tr '\r' '\n' < "$1" | grep -v -E '^[IW][0-9]{4} |Warning|^\s*$' | tail -"$2"; }
# the SLO sweep both layouts run (ragged_dot + reference LoRA math: ~0.3 s lowering per program); $1 names the
# output, the rest are layout and slot flags; BASELINES, COUNTS, REQUESTS, START, PROBES, TIMEOUT, TAG,
# ADAPTER_LOADING (and MODEL, RANK: set by the stages)
sweep() {
  local name=$1; shift
  INFINILORA_EXPERT_GEMM=ragged_dot INFINILORA_LORA_BACKEND=reference timeout ${TIMEOUT:-560} python3 -u \
    benchmarks/slo_baselines.py --model ${MODEL:-$QWEN} --num_layers 2 --dtype bfloat16 --rank ${RANK:-32} "$@" \
    --sweep_adapters ${COUNTS:-128,16} --distinct_adapters 4 --emulated_load_ms 200 --max_num_seqs 32 \
    --max_num_batched_tokens 128 --max_model_len 512 --prompt_len burstgpt:16:256 \
    --output_len burstgpt-response:1:192 --num_requests ${REQUESTS:-200} --start_rate ${START:-16} \
    --max_probes ${PROBES:-3} --rel_tol 0.3 --compile_workers 32 --adapter_loading ${ADAPTER_LOADING:-step} --calibration '' \
    --out "$OUT/$name${TAG:-}" > "$OUT/$name${TAG:-}.log" 2>&1
  echo "$name rc=$?"; show "$OUT/$name${TAG:-}.log" 30
}

case "${1:-}" in
  expert_gemm)
    timeout 540 python3 -u benchmarks/expert_gemm.py --budget 500 --tokens 64 --models qwen3-30b-a3b mixtral-8x7b \
      --routings uniform skewed --out "$OUT/expert_gemm.json" > "$OUT/expert_gemm.log" 2>&1
    echo "expert_gemm rc=$?"; show "$OUT/expert_gemm.log" 40 ;;
  compile_time)
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -u benchmarks/compile_time.py --model $QWEN --layers 2,8 \
      --impls auto/auto,ragged_dot/reference --out "$OUT/compile_time.json" > "$OUT/compile_time.log" 2>&1
    echo "compile_time rc=$?"; show "$OUT/compile_time.log" 12 ;;
  lora_window)
    timeout 570 python3 -u benchmarks/lora_kernels.py --cases ${CASES:-16:16:16,64:32:16,64:32:32,256:64:16,256:64:64,64:32:128} \
      --expert_cases ${EXPERT_CASES:-qwen3-gate_up:64:32:32:128:8:2048:1536,qwen3-down:64:32:32:128:8:768:2048,mixtral-gate_up:64:32:64:8:2:4096:28672,mixtral-down:64:32:64:8:2:14336:4096,qwen3-gate_up:16:16:32:128:8:2048:1536,qwen3-gate_up:256:32:32:128:8:2048:1536} \
      --qkv_cases ${QKV_CASES:-64:32:32,256:64:32} --iters 10 --repeats 3 --profile \
      --variants ${VARIANTS:-reference-rm,gpu-kernel-rm,gpu-window-rm,gpu-grouped-rm,gpu-window-grouped-rm,gpu-fused,gpu-fused-window} \
      --out "$OUT/lora_window${TAG:-}" > "$OUT/lora_window${TAG:-}.log" 2>&1
    echo "lora_window rc=$?"; grep -E "ceilings| us  floor" "$OUT/lora_window${TAG:-}.log" ;;
  lora_segments)
    timeout ${TIMEOUT:-300} python3 -u benchmarks/lora_kernels.py \
      --cases ${CASES:-64:32:16,256:64:16,256:64:64,4096:64:64,4096:64:16,64:32:16:seg,256:64:16:seg,256:64:64:seg,4096:64:64:seg,4096:64:16:seg} \
      --expert_cases= --qkv_cases= --iters 10 --repeats 3 --profile \
      --variants gather+einsum,gpu-kernel-rm,gpu-segments-rm,reference-rm \
      --out "$OUT/lora_segments${TAG:-}" > "$OUT/lora_segments${TAG:-}.log" 2>&1
    echo "lora_segments rc=$?"; grep -E "ceilings| us  floor|WRONG" "$OUT/lora_segments${TAG:-}.log" ;;
  lora_kernels_expert)
    timeout 560 python3 -u benchmarks/lora_kernels.py --cases 64:32:8,256:64:128 --expert_cases \
      mixtral-gate_up:1024:32:64:8:2:4096:28672,mixtral-down:1024:32:64:8:2:14336:4096,qwen3-down:1024:32:32:128:8:768:2048 \
      --iters 4 --repeats 2 --out "$OUT/lora_kernels_expert" > "$OUT/lora_kernels_expert.log" 2>&1
    echo "lora_kernels_expert rc=$?"; show "$OUT/lora_kernels_expert.log" 40 ;;
  startup)
    args="--model $QWEN --num_layers 2 --max_num_seqs 16 --max_num_batched_tokens 256 --max_model_len 256"
    for run in false true; do
      timeout 230 python3 -u benchmarks/startup.py $args --prompts 1,20,100,250 --run_programs=$run \
        --out "$OUT/startup_run_$run" > "$OUT/startup_run_$run.log" 2>&1
      echo "startup run_programs=$run rc=$?"; show "$OUT/startup_run_$run.log" 12
    done ;;
  tune_gpu_blocks)
    phases=${PHASES:-dispatch}
    timeout 570 python3 -u tools/tune_gpu_lora_blocks.py --phases "$phases" ${DISPATCH_RANKS:+--dispatch_ranks=$DISPATCH_RANKS} \
      --log "$OUT/tune_gpu_${phases//,/_}.json" \
      > "$OUT/tune_gpu_${phases//,/_}.log" 2>&1
    echo "tune_gpu_blocks rc=$?"; cp pallas_kernels/gpu/tuned_blocks.json "$OUT/tuned_blocks.json"
    grep -E "best|candidate .* failed|h200/" "$OUT/tune_gpu_${phases//,/_}.log" | tail -20 ;;
  prefill_lora)
    timeout 560 python3 -u benchmarks/prefill_lora.py --model $QWEN --num_layers 2 --rank 32 --adapters 4 \
      --prompt_len 2048 --chunk 2048 --out "$OUT/prefill_lora" > "$OUT/prefill_lora.log" 2>&1
    echo "prefill_lora rc=$?"; show "$OUT/prefill_lora.log" 20 ;;
  lora_step)
    for backend in ${BACKENDS:-reference gpu}; do
      name=lora_step_$backend${TAG:-}
      env INFINILORA_LORA_BACKEND=$backend ${MIN_ROWS:+INFINILORA_GPU_KERNEL_MIN_ROWS=$MIN_ROWS} \
        ${WINDOW_UNIT_ROWS:+INFINILORA_GPU_WINDOW_UNIT_ROWS=$WINDOW_UNIT_ROWS} \
        ${RUN_ROWS:+INFINILORA_GPU_RUN_ROWS=$RUN_ROWS} \
        timeout ${TIMEOUT:-270} python3 -u benchmarks/disagg.py --model $QWEN --num_layers ${LAYERS:-2} \
        --dtype bfloat16 --rank 32 --parts decode --modes coupled1 --requests 64 --adapters 32 --prompt_len 128 \
        --steps 16 --profile_steps 2 --without_lora=false --trace_dir "/tmp/$name" \
        --out "$OUT/$name" > "$OUT/$name.log" 2>&1
      echo "lora_step $backend${TAG:-} rc=$?"; show "$OUT/$name.log" 20
      cp "$(ls -t /tmp/$name/coupled1_32/plugins/profile/*/perfetto_trace.json.gz | head -1)" \
        "$OUT/${name}_trace.json.gz"
    done ;;
  lora_ab)
    for layers in ${LAYERS:-4 8}; do
      env INFINILORA_GPU_KERNEL_MIN_ROWS=${MIN_ROWS:-16:2048,32:256,64:256,128:256} \
        ${RUN_ROWS:+INFINILORA_GPU_RUN_ROWS=$RUN_ROWS} timeout ${TIMEOUT:-280} \
        python3 -u benchmarks/decode_variants.py --compare lora_backend --model $QWEN --num_layers $layers \
        --requests 64 --adapters 32 --rank 32 --steps 16 --blocks 4 --out "$OUT/lora_ab_L$layers${TAG:-}" \
        > "$OUT/lora_ab_L$layers${TAG:-}.log" 2>&1
      echo "lora_ab L=$layers${TAG:-} rc=$?"; show "$OUT/lora_ab_L$layers${TAG:-}.log" 10
    done ;;
  async_scheduling)
    tag=""; xla=""
    [ "${CMDBUF:-on}" = off ] && tag=_nocmdbuf && xla="--xla_gpu_enable_command_buffer="
    [ -n "${UPDATE_MODE:-}" ] && tag="${tag}_$UPDATE_MODE" && xla="$xla --xla_gpu_command_buffer_update_mode=$UPDATE_MODE"
    [ -n "${STAGING:-}" ] && tag="${tag}_$STAGING"
    [ -n "${SHRINK:-}" ] && tag="${tag}_shrink_$SHRINK"
    for layers in ${LAYERS:-2 8}; do
      env ${xla:+XLA_FLAGS="$xla"} ${STAGING:+INFINILORA_ADAPTER_STAGING=$STAGING} \
        ${SHRINK:+INFINILORA_LORA_SHRINK=$SHRINK} \
        INFINILORA_LORA_BACKEND=reference timeout 280 \
        python3 -u benchmarks/decode_variants.py --compare async_scheduling --model $QWEN --num_layers $layers \
        --requests 64 --adapters 32 --rank 32 --steps 16 --blocks 4 --out "$OUT/async_scheduling_L$layers$tag" \
        > "$OUT/async_scheduling_L$layers$tag.log" 2>&1
      echo "async_scheduling L=$layers$tag rc=$?"; show "$OUT/async_scheduling_L$layers$tag.log" 8
    done ;;
  lora_forms)
    timeout 200 python3 -u benchmarks/lora_expand_forms.py --ops shrink,expand --out "$OUT/lora_forms.json" \
      > "$OUT/lora_forms.log" 2>&1
    echo "lora_forms rc=$?"; show "$OUT/lora_forms.log" 14
    best=$(python3 -c "import json, collections; t = collections.Counter(); rows = json.load(open('$OUT/lora_forms.json'))['rows']; \
[t.update({r['form']: r['us']}) for r in rows if 'expert' in r['case'] and 'shrink' in r['case']]; print(min(t, key=t.get))")
    echo "fastest per-expert shrink form: $best"
    if [ "$best" != einsum ]; then SHRINK=$best LAYERS=8 "$0" async_scheduling; LAYERS=8 "$0" async_scheduling; fi ;;
  step_program_ops)
    INFINILORA_LORA_BACKEND=reference timeout 400 python3 -u tools/step_program_ops.py --layers ${LAYERS_LIST:-2,8} \
      --out "$OUT/step_program_ops.json" > "$OUT/step_program_ops.log" 2>&1
    echo "step_program_ops rc=$?"; show "$OUT/step_program_ops.log" 40 ;;
  flag_parity)
    INFINILORA_LORA_BACKEND=reference timeout 250 python3 -u tools/flag_parity.py --out "$OUT/tokens_default.json" \
      > "$OUT/flag_parity_default.log" 2>&1
    echo "flag_parity default rc=$?"; show "$OUT/flag_parity_default.log" 3
    XLA_FLAGS="--xla_gpu_command_buffer_update_mode=${UPDATE_MODE:-SKIP_TEMP}" \
      INFINILORA_ADAPTER_STAGING=${STAGING:-via_device} INFINILORA_LORA_BACKEND=reference timeout 250 \
      python3 -u tools/flag_parity.py --out "$OUT/tokens_${UPDATE_MODE:-SKIP_TEMP}.json" \
      > "$OUT/flag_parity_${UPDATE_MODE:-SKIP_TEMP}.log" 2>&1
    echo "flag_parity ${UPDATE_MODE:-SKIP_TEMP} rc=$?"; show "$OUT/flag_parity_${UPDATE_MODE:-SKIP_TEMP}.log" 3
    python3 tools/flag_parity.py --compare "$OUT/tokens_default.json" "$OUT/tokens_${UPDATE_MODE:-SKIP_TEMP}.json" ;;
  host_memory_kinds)
    XLA_FLAGS="--xla_gpu_command_buffer_update_mode=${UPDATE_MODE:-SKIP_TEMP}" timeout 200 \
      python3 -u tools/probe_host_memory_kinds.py > "$OUT/host_memory_kinds_${UPDATE_MODE:-SKIP_TEMP}.log" 2>&1
    echo "host_memory_kinds rc=$?"; show "$OUT/host_memory_kinds_${UPDATE_MODE:-SKIP_TEMP}.log" 8 ;;
  layer_loop)
    timeout 400 python3 -u benchmarks/layer_loop.py --layers ${LAYERS_LIST:-8,32} --out "$OUT/layer_loop" \
      > "$OUT/layer_loop.log" 2>&1
    echo "layer_loop rc=$?"; show "$OUT/layer_loop.log" 20 ;;
  cond_host_wait)
    timeout 200 python3 -u benchmarks/cond_overhead.py --host_wait --variants plain,cond,cond+cb,cond+cb1 \
      --layers 32 --hidden 8192 --tokens 64 --iters 20 --out "$OUT/cond_host_wait" > "$OUT/cond_host_wait.log" 2>&1
    echo "cond_host_wait rc=$?"; show "$OUT/cond_host_wait.log" 10 ;;
  host_inputs)
    INFINILORA_LORA_BACKEND=reference timeout 300 python3 -u benchmarks/decode_variants.py --compare host_inputs \
      --model $QWEN --num_layers 2 --requests 64 --adapters 32 --rank 32 --steps 16 --blocks 4 \
      --out "$OUT/host_inputs" > "$OUT/host_inputs.log" 2>&1
    echo "host_inputs rc=$?"; show "$OUT/host_inputs.log" 10 ;;
  lora_per_row)
    timeout 560 python3 -u benchmarks/lora_kernels.py --cases 16:16:16,64:32:16,64:32:32,256:64:16,256:64:64 \
      --qkv_cases 16:16:32,64:32:32,256:64:32 --iters 10 --repeats 2 \
      --variants reference-rm,gpu-kernel-rm,gpu-per-row-rm,gpu-fused,gpu-fused-per-row \
      --out "$OUT/lora_per_row" > "$OUT/lora_per_row.log" 2>&1
    echo "lora_per_row rc=$?"; show "$OUT/lora_per_row.log" 40 ;;
  lora_qkv)
    timeout 560 python3 -u benchmarks/lora_kernels.py --cases= --expert_cases= --iters 10 --repeats 2 \
      --qkv_cases ${QKV_CASES:-16:16:32,64:32:32,256:64:32,2048:16:32} --out "$OUT/lora_qkv" > "$OUT/lora_qkv.log" 2>&1
    echo "lora_qkv rc=$?"; show "$OUT/lora_qkv.log" 30 ;;
  kernel_compile)
    timeout 560 python3 -u benchmarks/lora_kernel_compile.py --budget_s 480 --out "$OUT/lora_kernel_compile.json" \
      --cases "delta 4096x4096 buckets,delta 4096x4096 no buckets,group_rows m4096,build_units m4096,delta 4096x4096 decode,ref 4096x4096" \
      > "$OUT/lora_kernel_compile.log" 2>&1
    echo "kernel_compile rc=$?"; show "$OUT/lora_kernel_compile.log" 20 ;;
  kernel_check)
    timeout 170 python3 -u tools/gpu_lora_kernel_check.py --skip-timing --budget 150 \
      --out "$OUT/gpu_lora_check.json" > "$OUT/kcheck.log" 2>&1
    echo "kernel_check rc=$?"; show "$OUT/kcheck.log" 40 ;;
  decode)
    INFINILORA_EXPERT_GEMM=${EXPERT_GEMM:-auto} timeout 560 python3 -u benchmarks/disagg.py --model $QWEN \
      --num_layers 8 --dtype bfloat16 --rank 32 --parts decode --modes ${MODES:-coupled1,disagg} --requests 64 \
      --adapters 32 --prompt_len 128 --steps 16 --profile_steps 3 --async_scheduling=${ASYNC:-true} \
      --out "$OUT/disagg_decode${ASYNC:+_async_$ASYNC}" > "$OUT/decode${ASYNC:+_async_$ASYNC}.log" 2>&1
    echo "decode rc=$?"; show "$OUT/decode${ASYNC:+_async_$ASYNC}.log" 60 ;;
  slo_sweep)
    sweep slo_sweep --baselines ${BASELINES:-coupled,coupled+sjf,coupled-reduced,disaggregated} --coupled_replicas 2 \
      --pool_slots 49 --coupled_slots 23 --disagg_slots 49 ;;
  mixtral_sweep)
    # Issue 6's regime: Mixtral-8x7B leaves a coupled GPU little spare HBM. At full depth (32 layers; 93.4 GB
    # bf16 weights; a rank-64 adapter on attention and every expert 1.79 GB; ~132 GB usable, ~12 GB KV as in
    # slo_sweep): a coupled single-GPU replica (132 - 93.4 - 12) / 1.79 = 14 slots, the 1+1 LoRA server
    # (132 - 6) / 1.79 = 70 (the 6 GB: arena and workspace, as slo_sweep's 49 Qwen3 slots). At 64 adapters the
    # LoRA server holds them all, the coupled pair 2 x 14.
    MODEL=$MIXTRAL RANK=64 COUNTS=${COUNTS:-64} sweep mixtral_sweep \
      --baselines ${BASELINES:-coupled+sjf,disaggregated} --coupled_replicas 2 --pool_slots 70 --coupled_slots 14 \
      --disagg_slots 70 ;;
  x4_decode)
    M=${MODES:-disagg}
    INFINILORA_EXPERT_GEMM=${EXPERT_GEMM:-auto} timeout 560 python3 -u benchmarks/disagg.py --model $QWEN \
      --num_layers 8 --dtype bfloat16 --rank 32 --parts decode --modes $M --disagg_mesh 2+2 --coupled_mesh ep4 \
      --requests 64 --adapters 32 --prompt_len 128 --steps 16 --profile_steps 3 --out "$OUT/x4_decode_${M//,/_}" \
      > "$OUT/x4_decode_${M//,/_}.log" 2>&1
    echo "x4_decode $M rc=$?"; show "$OUT/x4_decode_${M//,/_}.log" 60 ;;
  x4_sweep)
    # Slots at full depth (48 layers; 61.1 GB bf16 weights, 3.1 GB of them replicated over ep; a rank-32
    # all-target adapter 2.58 GB, 98% expert pages that ep splits: 1.32 GB per device at ep2; ~132 GB usable):
    # a single-device replica 23 (as slo_sweep); an ep2 replica 32.1 GB of weights per device and the same
    # ~12 GB of KV beside them: (132 - 32.1 - 12) / 1.32 = 66; a 2+2 LoRA-server device holds no base weights,
    # 49 x 2.58 GB of pages as in 1+1, at 1.32 GB per adapter: 95. The pool compiles the largest (95) in every
    # row; at 2 layers all of it fits, the slot limits stand for full depth.
    case ${REPLICAS:-4} in
      4) CMESH=single CSLOTS=23 ;;
      2) CMESH=ep2 CSLOTS=66 ;;
      *) echo "REPLICAS=${REPLICAS}: 4 or 2"; exit 2 ;;
    esac
    sweep x4_sweep --baselines ${BASELINES:-coupled,disaggregated} --disagg_layout 2+2 \
      --coupled_replicas ${REPLICAS:-4} --coupled_mesh $CMESH --pool_slots 95 --coupled_slots $CSLOTS \
      --disagg_slots 95 ;;
  x8_decode)
    # issue 8 on 8 GPUs: LAYOUT=role_dp1_ep4 (one base instance over ep4 | LoRA server ep4, the default) or
    # LAYOUT=4+4 (two base instances of ep2 | LoRA server pp2 x ep2); coupled = one ep8 replica, coupled_dp =
    # eight single-device replicas. One mode per call, as x4_decode.
    M=${MODES:-disagg}; L=${LAYOUT:-role_dp1_ep4}
    INFINILORA_EXPERT_GEMM=${EXPERT_GEMM:-auto} timeout 560 python3 -u benchmarks/disagg.py --model ${MODEL:-$QWEN} \
      --num_layers 8 --dtype bfloat16 --rank 32 --parts decode --modes $M --disagg_mesh $L --coupled_mesh ep8 \
      --requests 64 --adapters 32 --prompt_len 128 --steps 16 --profile_steps 3 --out "$OUT/x8_decode_${M//,/_}_$L" \
      > "$OUT/x8_decode_${M//,/_}_$L.log" 2>&1
    echo "x8_decode $M $L rc=$?"; show "$OUT/x8_decode_${M//,/_}_$L.log" 60 ;;
  x8_sweep)
    # issue 8's sweep: 512 adapters, Zipf 1.2, coupled as eight single-device replicas against the LoRA server
    # layouts. Slots at full depth, as x4_sweep (Qwen3: a rank-32 all-target adapter 2.58 GB, 98% expert pages;
    # ~126 GB of a LoRA device for pages): a single-device replica 23; LoRA ep4 2.58 x (0.98 / 4 + 0.02) =
    # 0.68 GB per adapter per device -> 184; pp2 x ep2 (4+4) 2.58 x (0.98 / 2 + 0.02) / 2 = 0.66 -> 191.
    # Mixtral (MODEL=$MIXTRAL RANK=64, 1.79 GB per adapter, ~95% expert pages): a replica 14; ep4
    # 1.79 x (0.95 / 4 + 0.05) = 0.51 -> 245; pp2 x ep2 1.79 x (0.95 / 2 + 0.05) / 2 = 0.47 -> 268.
    # Run BASELINES=coupled and BASELINES=disaggregated (LAYOUT=role_dp1_ep4, then LAYOUT=4+4) as separate
    # calls (TAG=_coupled, TAG=_ep4, TAG=_4p4).
    L=${LAYOUT:-role_dp1_ep4}
    case "${MODEL:-$QWEN}:$L" in
      "$QWEN:role_dp1_ep4") CSLOTS=23 DSLOTS=184 ;;
      "$QWEN:4+4") CSLOTS=23 DSLOTS=191 ;;
      "$MIXTRAL:role_dp1_ep4") CSLOTS=14 DSLOTS=245 ;;
      "$MIXTRAL:4+4") CSLOTS=14 DSLOTS=268 ;;
      *) echo "x8_sweep: MODEL=\$QWEN or \$MIXTRAL, LAYOUT=role_dp1_ep4 or 4+4"; exit 2 ;;
    esac
    COUNTS=${COUNTS:-512} sweep x8_sweep --baselines ${BASELINES:-coupled,disaggregated} --disagg_layout $L \
      --coupled_replicas 8 --coupled_mesh single --pool_slots $DSLOTS --coupled_slots $CSLOTS --disagg_slots $DSLOTS ;;
  cmdbuf)
    XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
    timeout 560 python3 -u benchmarks/disagg.py --model $QWEN --num_layers 8 --dtype bfloat16 --rank 32 \
      --parts decode --modes ${MODES:-disagg} --requests 64 --adapters 32 --prompt_len 128 --steps 16 \
      --profile_steps 2 --trace_dir /tmp/cmdbuf_trace --out "$OUT/disagg_cmdbuf" > "$OUT/cmdbuf.log" 2>&1
    echo "cmdbuf rc=$?"; show "$OUT/cmdbuf.log" 30
    for d in /tmp/cmdbuf_trace/*_32; do
      cp "$(ls -t $d/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/cmdbuf_trace_$(basename $d).json.gz"
    done ;;
  push)
    INFINILORA_EXCHANGE=push timeout 560 python3 -u benchmarks/disagg.py --model $QWEN --num_layers 8 \
      --dtype bfloat16 --rank 32 --parts decode --modes disagg --requests 64 --adapters 32 --prompt_len 128 \
      --steps 16 --profile_steps 2 --out "$OUT/disagg_push" > "$OUT/push_decode.log" 2>&1
    echo "push decode rc=$?"; show "$OUT/push_decode.log" 30 ;;
  *)
    sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2 ;;
esac
