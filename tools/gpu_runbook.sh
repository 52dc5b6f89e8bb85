#!/usr/bin/env bash
# The pending GPU measurements, in priority order, each a stage that fits one device call (run from the repo root
# on the device machine; logs and JSON under $OUT). Done in the fifth session (docs/benchmarks.md): the decode-width
# expert GEMM choice (mgpu, now the GPU default), autotune on/off, the kernel numerics, the push's 1+1 parity.
# Engines with the Mosaic GPU expert GEMM compile in ~245 s per mode at 8 layers: one mode per call. Stages:
#
#   expand_forms  (1 GPU, ~1 min) benchmarks/lora_expand_forms.py: the reference LoRA expand as einsum (XLA
#                 transposes the gathered B on GPU) or as a sum of B-row gathers; pick lora/reference.py's form.
#   phases        (1 GPU, ~8 min) benchmarks/decode_step.py, 4 layers: the host's share of a decode step
#                 (schedule, build, run, complete), with the fifth session's changes (sampling on the base devices,
#                 gathers instead of row scatters, the kernels' grouping glue; none measured on a GPU yet).
#   slo_sweep     (2 GPUs, ~9 min) benchmarks/slo_baselines.py --sweep_adapters: coupled as two single-device
#                 replicas against disaggregated 1+1 (issue 6's curve and issue 7's GPU rows).
#   push          (2 GPUs, ~7 min) the disaggregated decode step with the device-initiated push
#                 (INFINILORA_EXCHANGE=push; compare with 12.80 ms with ppermute, docs/benchmarks.md).
#   decode        (2 GPUs, ~5 min per mode) benchmarks/disagg.py decode, MODES=coupled1 or disagg (default
#                 coupled1,disagg: too long for one call with mgpu), profiled. EXPERT_GEMM=<name> overrides.
#   expert_gemm   (1 GPU, ~4 min) benchmarks/expert_gemm.py at prefill (T=2048) and Mixtral widths, the rows the
#                 fifth session's budget did not reach.
#   kernel_check  (1 GPU, ~1 min) tools/gpu_lora_kernel_check.py numerics (all ok in the fifth session).
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
    timeout 260 python3 -u benchmarks/expert_gemm.py --budget 230 --tokens 2048 64 --models mixtral-8x7b qwen3-30b-a3b \
      --out "$OUT/expert_gemm.json" > "$OUT/expert_gemm.log" 2>&1
    echo "expert_gemm rc=$?"; show "$OUT/expert_gemm.log" 40 ;;
  expand_forms)
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -u benchmarks/lora_expand_forms.py --out "$OUT/lora_expand_forms.json" \
      > "$OUT/expand_forms.log" 2>&1
    echo "expand_forms rc=$?"; show "$OUT/expand_forms.log" 10 ;;
  phases)
    CUDA_VISIBLE_DEVICES=0 timeout 560 python3 -u benchmarks/decode_step.py --model $QWEN --num_layers 4 \
      --requests 64 --adapters 32 --rank 32 --prompt_len 128 --steps 16 --out "$OUT/decode_phases" \
      > "$OUT/phases.log" 2>&1
    echo "phases rc=$?"; show "$OUT/phases.log" 12 ;;
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
    timeout 560 python3 -u benchmarks/slo_baselines.py --model $QWEN --num_layers 2 --dtype bfloat16 --rank 32 \
      --baselines coupled,disaggregated --coupled_replicas 2 --sweep_adapters 16,128 --distinct_adapters 4 \
      --pool_slots 49 --coupled_slots 23 --disagg_slots 49 --emulated_load_ms 200 --max_num_seqs 32 \
      --max_num_batched_tokens 128 --max_model_len 512 --prompt_len burstgpt:16:256 \
      --output_len burstgpt-response:1:192 --num_requests 80 --start_rate 16 --max_probes 3 --rel_tol 0.3 \
      --compile_workers 16 --calibration '' --out "$OUT/slo_sweep" > "$OUT/sweep.log" 2>&1
    echo "slo_sweep rc=$?"; show "$OUT/sweep.log" 30 ;;
  push)
    INFINILORA_EXCHANGE=push timeout 560 python3 -u benchmarks/disagg.py --model $QWEN --num_layers 8 \
      --dtype bfloat16 --rank 32 --parts decode --modes disagg --requests 64 --adapters 32 --prompt_len 128 \
      --steps 16 --profile_steps 2 --out "$OUT/disagg_push" > "$OUT/push_decode.log" 2>&1
    echo "push decode rc=$?"; show "$OUT/push_decode.log" 30 ;;
  *)
    sed -n '2,22p' "$0"; exit 2 ;;
esac
