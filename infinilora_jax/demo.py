"""Generation demo: one mixed batch in which every prompt row uses a different adapter (or none).

    python -m infinilora_jax.demo                      # the bundled tiny Qwen3-MoE model and its adapters
    python -m infinilora_jax.demo --model DIR --adapters name=DIR,name2=DIR2 --mesh pp2_ep2_tp2 --dtype float32
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from infinilora_jax.llm import LLM, bundled_adapters
from infinilora_jax.sampling import SamplingParams

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory (default: the bundled tiny model)")
_ADAPTERS = flags.DEFINE_string("adapters", None, "comma-separated name=path PEFT adapters "
                                "(default: the bundled model's adapters)")
_PROMPT = flags.DEFINE_string("prompt", "Once upon a time", "prompt text (token ids if the model has no tokenizer: "
                              "comma-separated integers)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 24, "tokens to generate per row")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 for greedy")
_MESH = flags.DEFINE_string("mesh", None, "mesh layout, e.g. pp2_ep2_tp2 (default: one device)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "weights and activations")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "on CPU, split the host into this many devices (for --mesh)")


def _parse_adapters(spec: str | None) -> dict[str, str]:
    if spec is None:
        return bundled_adapters() if _MODEL.value is None else {}
    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    bad = [p for p in pairs if len(p) != 2]
    if bad:
        raise app.UsageError(f"--adapters expects name=path pairs, got {bad[0][0]!r}")
    return dict(pairs)


def main(argv):
    del argv
    if _CPU_DEVICES.value:
        import jax

        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    adapters = _parse_adapters(_ADAPTERS.value)
    start = time.perf_counter()
    llm = LLM(_MODEL.value, adapters=adapters, dtype=_DTYPE.value, mesh=_MESH.value)
    logging.info("loaded %s with %d adapters on layout %s in %.1f s", llm.model_dir, len(adapters), llm.layout.name,
                 time.perf_counter() - start)
    prompt = _PROMPT.value
    if llm.tokenizer is None:
        prompt = [int(t) for t in prompt.split(",")] if prompt[:1].isdigit() else list(range(3, 11))
    rows: list[str | None] = [None, *llm.adapters]
    params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value, seed=0)
    start = time.perf_counter()
    outputs = llm.generate([prompt] * len(rows), params, adapter=rows)
    elapsed = time.perf_counter() - start
    print(f"\nprompt: {_PROMPT.value!r}   (one batch of {len(rows)} rows, {elapsed:.2f} s incl. compilation)\n")
    width = max(len(r or "base model") for r in rows)
    for row, out in zip(rows, outputs):
        shown = out.text if out.text is not None else " ".join(map(str, out.token_ids))
        print(f"  {row or 'base model':<{width}} | {shown!r} [{out.finish_reason}]")
    print()


if __name__ == "__main__":
    app.run(main)
