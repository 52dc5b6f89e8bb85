"""Print a provisioning plan: adapter cache size and LoRA-server layout for a workload and an SLO.

    python -m infinilora_jax.bench.provision --model configs/models/qwen3-30b-a3b.json --rank 32 \\
        --num_adapters 512 --zipf 1.2 --rate 4 --calibration configs/calibration/h200.json

What the plan holds and how it is made: bench/plan.py and bench/provisioning.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from infinilora_jax.bench import model_shapes, plan
from infinilora_jax.lora.targets import ALL_TARGETS

F = flags.FLAGS
flags.DEFINE_string("model", None, "the model's config.json (or its directory), e.g. configs/models/*.json",
                    required=True)
flags.DEFINE_integer("rank", 32, "adapter rank")
flags.DEFINE_list("targets", list(model_shapes.DEFAULT_TARGETS), f"adapter targets, or 'all' ({ALL_TARGETS})")
flags.DEFINE_integer("dtype_bytes", 2, "bytes per adapter weight")
flags.DEFINE_integer("gate_up_rank_factor", 1, "2 for per-expert PEFT adapters with separate gate/up A matrices")
flags.DEFINE_integer("num_adapters", 512, "")
flags.DEFINE_float("zipf", 1.2, "adapter popularity exponent")
flags.DEFINE_float("rate", 4.0, "requests/s per base replica, for the hit-path TTFT")
flags.DEFINE_float("slo_ttft", 0.25, "P95 TTFT target, s")
flags.DEFINE_float("quantile", 0.95, "TTFT quantile the SLO constrains")
flags.DEFINE_float("slo_margin", 1.0, "sizing under load: the simulated TTFT quantile must stay under this share "
                   "of the target (below 1 to absorb the simulator's error)")
flags.DEFINE_float("cold_load_s", None, "measured cold-load time of one adapter (default: bytes / h2d_gbps)")
flags.DEFINE_float("load_overlap", 0.0, "share of a cold load hidden behind compute")
flags.DEFINE_float("hit_ttft_s", None, "hit-path TTFT (default: simulated from the calibration)")
flags.DEFINE_string("calibration", None, "step calibration JSON (configs/calibration/*.json)")
flags.DEFINE_string("calibration_model", None, "model in it (default: the --model's name, else derived)")
flags.DEFINE_string("prompt_len", "burstgpt:16:1024", "workload prompt lengths (bench/workload.py)")
flags.DEFINE_string("output_len", "burstgpt-response:1:512", "")
flags.DEFINE_integer("num_requests", 2000, "simulated requests for the hit-path TTFT")
flags.DEFINE_integer("max_num_seqs", 64, "")
flags.DEFINE_integer("max_num_batched_tokens", 512, "")
flags.DEFINE_integer("replica_devices", 1, "devices per base replica (divides the step time, extrapolated)")
flags.DEFINE_float("device_memory_gb", 141.0, "")
flags.DEFINE_float("hbm_tbps", 3.2, "HBM bandwidth (measured copy rate on the H200: 3.2 TB/s)")
flags.DEFINE_float("h2d_gbps", 50.0, "host-to-device bandwidth per device (assumed)")
flags.DEFINE_float("reserve", 0.1, "share of device memory kept for activations and the runtime")
flags.DEFINE_integer("max_devices", 8, "LoRA-server devices considered")
flags.DEFINE_integer("step_adapters", 64, "adapters in one LoRA-server step (all base replicas' batches)")
flags.DEFINE_integer("step_tokens", 256, "tokens in one LoRA-server step")
flags.DEFINE_float("coupled_lora_share", 0.8, "coupled replica: share of spare memory for adapters")
flags.DEFINE_bool("async_scheduling", True, "simulate the engine queueing each step ahead (its default)")
flags.DEFINE_integer("seed", 0, "")
flags.DEFINE_string("out", None, "also write the plan as JSON here")


def plan_request() -> plan.PlanRequest:
    values = {f.name: getattr(F, f.name) for f in dataclasses.fields(plan.PlanRequest)}
    return plan.PlanRequest(**{**values, "targets": tuple(values["targets"])})


def main(argv):
    del argv
    result = plan.make_plan(plan_request())
    print(plan.format_plan(result))
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out, "w") as f:
            json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
    app.run(main)
