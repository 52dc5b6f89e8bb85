#!/usr/bin/env bash
# The pending GPU measurements, in priority order, each a stage that fits one device call (run from the repo root
# on the device machine; logs and JSON under $OUT). Done (docs/benchmarks.md, fifth and sixth sessions): the expert
# GEMM choice at decode and prefill widths, autotune on/off, the kernel numerics, the push's 1+1 parity, the
# reference expand's form, the host's share of a 4-layer decode step. Stages:
#
#   compile_time  (1 GPU, ~2 min) benchmarks/compile_time.py at 2 and 8 layers: checks that the Mosaic GPU expert
#                 GEMM is built once per program now (sixth session: +0.8 s lowering, +1.5 s compile per layer).
#   slo_sweep     (2 GPUs, ~9 min) benchmarks/slo_baselines.py --sweep_adapters: coupled as two single-device
#                 replicas against disaggregated 1+1 (issue 6's curve and issue 7's GPU rows). Both modes run
#                 ragged_dot + the reference LoRA math: with the Mosaic kernels the ~240 programs' lowering alone
#                 would not fit one call (sixth session: the coupled replicas took 9 minutes to compile).
#                 BASELINES, COUNTS (adapter counts, in the order run), REQUESTS (per probe), START (first
#                 rate), TIMEOUT (s) and TAG (output name suffix) override.
#   push          (2 GPUs, ~7 min) the disaggregated decode step with the device-initiated push
#                 (INFINILORA_EXCHANGE=push; compare with 12.80 ms with ppermute, docs/benchmarks.md).
#   decode        (2 GPUs, ~5 min per mode) benchmarks/disagg.py decode, MODES=coupled1 or disagg (default
#                 coupled1,disagg: too long for one call with mgpu), profiled: device_trace splits the idle time
#                 into gaps between calls and idle inside a call. EXPERT_GEMM=<name> overrides.
#   cmdbuf        (2 GPUs, ~5 min, low priority) the disaggregated decode step with XLA's CUDA-graph command
#                 buffers extended to conditionals. benchmarks/cond_overhead.py found no gain per role branch on
#                 a synthetic chain (23 vs 24 us); coupled1 at 2 layers went 4.74 -> 4.05 ms with adapters in one
#                 run (sixth session). Compare with `decode` MODES=disagg.
#   expert_gemm   (1 GPU, ~8 min) benchmarks/expert_gemm.py: the rows the sixth session's budget did not reach
#                 (Qwen3 down at T=64 with mgpu, Mixtral at T=64, skewed routing).
#   kernel_check  (1 GPU, ~1 min) tools/gpu_lora_kernel_check.py numerics (all ok in the fifth session).
#
#   ./tools/gpu_runbook.sh compile_time       # device tool: run(command=..., kind=...), one stage per call
set -uo pipefail
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
QWEN=configs/models/qwen3-30b-a3b.json
# the lines worth reading: no absl/XLA info or warning lines, progress bars split into lines
show() { tr '\r' '\n' < "$1" | grep -v -E '^[IW][0-9]{4} |Warning|^\s*$' | tail -"$2"; }

case "${1:-}" in
  expert_gemm)
    timeout 540 python3 -u benchmarks/expert_gemm.py --budget 500 --tokens 64 --models qwen3-30b-a3b mixtral-8x7b \
      --routings uniform skewed --out "$OUT/expert_gemm.json" > "$OUT/expert_gemm.log" 2>&1
    echo "expert_gemm rc=$?"; show "$OUT/expert_gemm.log" 40 ;;
  compile_time)
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -u benchmarks/compile_time.py --model $QWEN --layers 2,8 \
      --impls auto/auto,ragged_dot/reference --out "$OUT/compile_time.json" > "$OUT/compile_time.log" 2>&1
    echo "compile_time rc=$?"; show "$OUT/compile_time.log" 12 ;;
  kernel_check)
    timeout 170 python3 -u tools/gpu_lora_kernel_check.py --skip-timing --budget 150 \
      --out "$OUT/gpu_lora_check.json" > "$OUT/kcheck.log" 2>&1
    echo "kernel_check rc=$?"; show "$OUT/kcheck.log" 40 ;;
  decode)
    INFINILORA_EXPERT_GEMM=${EXPERT_GEMM:-auto} timeout 560 python3 -u benchmarks/disagg.py --model $QWEN \
      --num_layers 8 --dtype bfloat16 --rank 32 --parts decode --modes ${MODES:-coupled1,disagg} --requests 64 \
      --adapters 32 --prompt_len 128 --steps 16 --profile_steps 3 --out "$OUT/disagg_decode" > "$OUT/decode.log" 2>&1
    echo "decode rc=$?"; show "$OUT/decode.log" 60 ;;
  slo_sweep)
    INFINILORA_EXPERT_GEMM=ragged_dot INFINILORA_LORA_BACKEND=reference timeout ${TIMEOUT:-560} python3 -u \
      benchmarks/slo_baselines.py --model $QWEN --num_layers 2 --dtype bfloat16 --rank 32 \
      --baselines ${BASELINES:-coupled,coupled+sjf,coupled-reduced,disaggregated} --coupled_replicas 2 \
      --sweep_adapters ${COUNTS:-128,16} --distinct_adapters 4 \
      --pool_slots 49 --coupled_slots 23 --disagg_slots 49 --emulated_load_ms 200 --max_num_seqs 32 \
      --max_num_batched_tokens 128 --max_model_len 512 --prompt_len burstgpt:16:256 \
      --output_len burstgpt-response:1:192 --num_requests ${REQUESTS:-200} --start_rate ${START:-16} --max_probes 3 \
      --rel_tol 0.3 --compile_workers 32 --calibration '' --out "$OUT/slo_sweep${TAG:-}" > "$OUT/sweep${TAG:-}.log" 2>&1
    echo "slo_sweep rc=$?"; show "$OUT/sweep${TAG:-}.log" 30 ;;
  cmdbuf)
    XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
    timeout 560 python3 -u benchmarks/disagg.py --model $QWEN --num_layers 8 --dtype bfloat16 --rank 32 \
      --parts decode --modes ${MODES:-disagg} --requests 64 --adapters 32 --prompt_len 128 --steps 16 \
      --profile_steps 2 --out "$OUT/disagg_cmdbuf" > "$OUT/cmdbuf.log" 2>&1
    echo "cmdbuf rc=$?"; show "$OUT/cmdbuf.log" 30 ;;
  push)
    INFINILORA_EXCHANGE=push timeout 560 python3 -u benchmarks/disagg.py --model $QWEN --num_layers 8 \
      --dtype bfloat16 --rank 32 --parts decode --modes disagg --requests 64 --adapters 32 --prompt_len 128 \
      --steps 16 --profile_steps 2 --out "$OUT/disagg_push" > "$OUT/push_decode.log" 2>&1
    echo "push decode rc=$?"; show "$OUT/push_decode.log" 30 ;;
  *)
    sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2 ;;
esac
