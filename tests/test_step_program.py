"""How a step program is built: every layer of one structure is traced and lowered once per program (start-up
time must not grow with depth in Python), and the implementations chosen at trace time still reach each program."""

import re

from infinilora_jax import LLM
from infinilora_jax.models import grouped_matmul
from infinilora_jax.models.batch import padding_batch

# the bundled tiny model: 4 layers, layer 1 a dense MLP layer, the other three MoE


def _lowered_sample_step(llm: LLM) -> str:
    engine, runner = llm.engine, llm.runner
    batch = padding_batch(engine.shapes, engine.shapes.tokens(4), engine.shapes.page_buckets()[0], False)
    return runner.steps.logits.trace(*runner.logits_args(batch, engine.rows_out)).lower().as_text()


def test_each_layer_structure_is_lowered_once_per_program():
    llm = LLM(None, dtype="float32", max_adapters=2, max_num_seqs=4, max_model_len=64, progress=False)
    text = _lowered_sample_step(llm)
    definitions = re.findall(r"func\.func private @(_layer_program\w*)\(", text)
    calls = re.findall(r"= call @(_layer_program\w*)\(", text)
    assert len(definitions) == 2, definitions  # the MoE layers' and the dense layer's
    assert len(calls) == 4 and set(calls) == set(definitions)


def test_trace_time_choices_reach_every_program(monkeypatch):
    """The layer jit is shared by every engine in the process: a choice made for a later engine (here the expert
    GEMM) must not be served from an earlier engine's trace of the same layer."""
    monkeypatch.delenv(grouped_matmul.ENV_VAR, raising=False)

    def build():
        return LLM(None, dtype="float32", max_adapters=2, max_num_seqs=4, max_model_len=64,
                   progress=False)

    default = _lowered_sample_step(build())
    with grouped_matmul.use_expert_gemm("capacity"):
        capacity = _lowered_sample_step(build())
    # "capacity" picks its rung with a lax.switch (stablehlo.case) in each MoE layer; ragged_dot has none
    assert capacity.count("stablehlo.case") > default.count("stablehlo.case")
