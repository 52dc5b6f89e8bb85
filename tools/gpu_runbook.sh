#!/usr/bin/env bash
# The pending GPU measurements, in priority order, each a stage that fits one device call (run from the repo root
# on the device machine; logs and JSON under $OUT). Stages:
#
#   expert_gemm   (1 GPU, ~3 min) benchmarks/expert_gemm.py: lax.ragged_dot (dense over all experts) against
#                 jax's Mosaic GPU ragged dot and the capacity-bucketed einsum; picks models/grouped_matmul.py's
#                 GPU default. Also times one decode step with and without --xla_gpu_autotune_level=0 (the
#                 suspect of the 55-105 ms steps of the failed SLO run, docs/benchmarks.md).
#   kernel_check  (1 GPU, ~2.5 min) tools/gpu_lora_kernel_check.py numerics: float32 deltas should now be ~1e-5
#                 (the hi/lo split fix), y + delta within bf16 rounding, no fault.
#   decode        (2 GPUs, ~6 min) benchmarks/disagg.py decode, coupled1 and disagg in one run, both profiled:
#                 the same-run ratio (issue 6: <= 1.15x) and where each mode's device time goes.
#                 EXPERT_GEMM=<name> sets INFINILORA_EXPERT_GEMM for it.
#   slo_sweep     (2 GPUs, ~9 min) benchmarks/slo_baselines.py --sweep_adapters: coupled as two single-device
#                 replicas against disaggregated 1+1 (issue 6's curve and issue 7's GPU rows).
#   push          (2 GPUs, ~7 min) the device-initiated push (disagg/push.py, INFINILORA_EXCHANGE=push): 1+1 parity
#                 against HF on real GPUs, then the disaggregated decode step with it (compare with `decode`).
#
#   ./tools/gpu_runbook.sh expert_gemm        # device tool: run(command=..., kind=...), one stage per call
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
    timeout 200 python3 -u benchmarks/expert_gemm.py --budget 170 --out "$OUT/expert_gemm.json" > "$OUT/expert_gemm.log" 2>&1
    echo "expert_gemm rc=$?"; show "$OUT/expert_gemm.log" 40
    for flags in "" "--xla_gpu_autotune_level=0"; do
      XLA_FLAGS="$flags" CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -u benchmarks/decode_step.py --model $QWEN \
        --num_layers 2 --requests 32 --adapters 8 --rank 32 --prompt_len 32 --steps 8 \
        --out "$OUT/decode_autotune${flags:+_off}" > "$OUT/decode_autotune.log" 2>&1
      echo "decode step, XLA_FLAGS='$flags' rc=$?"; show "$OUT/decode_autotune.log" 4
    done ;;
  kernel_check)
    timeout 170 python3 -u tools/gpu_lora_kernel_check.py --skip-timing --budget 150 \
      --out "$OUT/gpu_lora_check.json" > "$OUT/kcheck.log" 2>&1
    echo "kernel_check rc=$?"; show "$OUT/kcheck.log" 40 ;;
  decode)
    INFINILORA_EXPERT_GEMM=${EXPERT_GEMM:-auto} timeout 560 python3 -u benchmarks/disagg.py --model $QWEN \
      --num_layers 8 --dtype bfloat16 --rank 32 --parts decode --modes coupled1,disagg --requests 64 \
      --adapters 32 --prompt_len 128 --steps 16 --profile_steps 2 --out "$OUT/disagg_decode" > "$OUT/decode.log" 2>&1
    echo "decode rc=$?"; show "$OUT/decode.log" 60 ;;
  slo_sweep)
    timeout 560 python3 -u benchmarks/slo_baselines.py --model $QWEN --num_layers 2 --dtype bfloat16 --rank 32 \
      --baselines coupled,disaggregated --coupled_replicas 2 --sweep_adapters 16,128 --distinct_adapters 4 \
      --pool_slots 49 --coupled_slots 23 --disagg_slots 49 --emulated_load_ms 200 --max_num_seqs 32 \
      --max_num_batched_tokens 128 --max_model_len 512 --prompt_len burstgpt:16:256 \
      --output_len burstgpt-response:1:192 --num_requests 80 --start_rate 16 --max_probes 3 --rel_tol 0.3 \
      --compile_workers 16 --calibration '' --out "$OUT/slo_sweep" > "$OUT/sweep.log" 2>&1
    echo "slo_sweep rc=$?"; show "$OUT/sweep.log" 30 ;;
  push)
    INFINILORA_EXCHANGE=push timeout 200 python3 -u tools/gpu_disagg_parity.py --parts float32 \
      --json "$OUT/push_parity.json" > "$OUT/push_parity.log" 2>&1
    echo "push parity rc=$?"; show "$OUT/push_parity.log" 20
    INFINILORA_EXCHANGE=push timeout 340 python3 -u benchmarks/disagg.py --model $QWEN --num_layers 8 \
      --dtype bfloat16 --rank 32 --parts decode --modes disagg --requests 64 --adapters 32 --prompt_len 128 \
      --steps 16 --profile_steps 2 --out "$OUT/disagg_push" > "$OUT/push_decode.log" 2>&1
    echo "push decode rc=$?"; show "$OUT/push_decode.log" 30 ;;
  *)
    sed -n '2,19p' "$0"; exit 2 ;;
esac
