"""The OpenAI-compatible server.

    python -m infinilora_jax.serve                                  # the bundled tiny model and its adapters
    python -m infinilora_jax.serve --model DIR --adapters sql=DIR1,chat=DIR2 --port 8000 --dtype bfloat16
    python -m infinilora_jax.serve --enable-lora-loading --adapter-root /srv/adapters --api-key-file key.txt
    python -m infinilora_jax.serve --mode disaggregated --layout 1+1      # base on device 0, LoRA server on 1
    python -m infinilora_jax.serve --replicas 2                           # two coupled replicas, one per device

Flags may be spelled with dashes or underscores (--max-model-len or --max_model_len). See
docs/architecture/05-server.md.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory, or a directory written by "
                             "LLM.save_converted (default: the bundled tiny Qwen3-MoE model)")
_ADAPTERS = flags.DEFINE_string("adapters", None, "comma-separated name=path PEFT adapters served from the start "
                                "(default: the bundled model's adapters when --model is not given)")
_NAME = flags.DEFINE_string("served_model_name", None, "the base model's name in the API (default: --model as "
                            "given, or the bundled model's name)")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "weights and activations")
_MESH = flags.DEFINE_string("mesh", None, "mesh layout: coupled e.g. pp2_ep2_tp2 (default: one device); "
                            "disaggregated 1+1, 2+2, 4+4, 8+8 (default 1+1)")
_LAYOUT = flags.DEFINE_string("layout", None, "the same as --mesh")
_MODE = flags.DEFINE_enum("mode", "coupled", ["coupled", "disaggregated"], "coupled: every device holds base weights "
                          "and adapter pages; disaggregated: base instances and a LoRA server on separate devices")
_REPLICAS = flags.DEFINE_integer("replicas", 1, "coupled mode: independent replicas (data parallelism), each with "
                                 "the --mesh layout on its own devices and its own adapter cache; requests are "
                                 "routed by adapter residency and load (docs/architecture/04-engine.md)")
_ADAPTER_LOADING = flags.DEFINE_enum("adapter_loading", "step", ["step", "background"], "step: a cold adapter is "
                                     "copied in by the step that first uses it (the batch waits); background: the "
                                     "copy runs while steps go on (docs/architecture/04-engine.md)")
_ASYNC_SCHEDULING = flags.DEFINE_bool("async_scheduling", True, "queue each engine step before reading the "
                                      "previous step's tokens, so scheduling overlaps the device (both modes; "
                                      "docs/architecture/04-engine.md)")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "on CPU, split the host into this many devices (for --mesh)")
_MAX_LORA_RANK = flags.DEFINE_integer("max_lora_rank", 16, "largest adapter rank the pool holds")
_MAX_ADAPTERS = flags.DEFINE_integer("max_adapters", None, "adapter slots on the device (default: max(4, "
                                     "adapters given))")
_MAX_HOST_ADAPTERS = flags.DEFINE_integer("max_host_adapters", 64, "converted adapters kept in host memory")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", None, "context limit, prompt + output (default: the "
                                      "model's max_position_embeddings)")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 32, "running requests at most")
_MAX_BATCHED = flags.DEFINE_integer("max_num_batched_tokens", 256, "tokens per engine step")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "tokens per KV cache page")
_NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV cache pages (default: room for max_num_seqs full "
                                  "contexts)")
_ADAPTER_ROOT = flags.DEFINE_multi_string("adapter_root", [], "directory runtime adapter loads may read from "
                                          "(repeatable); paths escaping it are refused")
_ENABLE_LOADING = flags.DEFINE_boolean("enable_lora_loading", False, "enable /v1/load_lora_adapter and "
                                       "/v1/unload_lora_adapter (needs --adapter_root)")
_API_KEY = flags.DEFINE_string("api_key", None, "require 'Authorization: Bearer KEY' on every endpoint but "
                               "/health")
_API_KEY_FILE = flags.DEFINE_string("api_key_file", None, "read the API key from this file (keeps it out of "
                                    "the process list)")
_MAX_REQUEST_BYTES = flags.DEFINE_integer("max_request_bytes", 8 << 20, "largest request body accepted")
_MAX_ADAPTER_BYTES = flags.DEFINE_integer("max_adapter_bytes", 1 << 30, "largest adapter weights file accepted")
_PRECOMPILE = flags.DEFINE_enum("precompile", "auto", ["auto", "on", "off"], "compile every engine step program "
                                "before serving, so no request waits for a compilation (auto: on GPU/TPU, off on "
                                "CPU, where it takes minutes)")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache_dir", None, "keep compiled step programs here, so a "
                                         "restart skips compiling them (default: $INFINILORA_COMPILATION_CACHE "
                                         "or ~/.cache/infinilora_jax/xla; '' turns the cache off)")
_COMPILE_WORKERS = flags.DEFINE_integer("compile_workers", 8, "parallel compilations for --precompile")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "HTTP server log level")


def parse_adapters(spec: str | None) -> dict[str, str] | None:
    if spec is None:
        return None
    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    bad = [p for p in pairs if len(p) != 2 or not p[0] or not p[1]]
    if bad:
        raise app.UsageError(f"--adapters expects name=path pairs, got {'='.join(bad[0])!r}")
    return dict(pairs)


def normalize_argv(argv: list[str]) -> list[str]:
    """--flag-name[=v] -> --flag_name[=v], so both spellings work."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def main(argv):
    del argv
    import jax  # after flag parsing, so --cpu_devices applies before any backend starts

    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    from infinilora_jax import compilation_cache
    from infinilora_jax.serving import ServerConfig, ServerState, build_llm, default_model_name, run

    api_key = _API_KEY.value
    if _API_KEY_FILE.value:
        with open(_API_KEY_FILE.value) as f:
            api_key = f.read().strip()
    if api_key is not None and not api_key:
        raise app.UsageError("the API key is empty")
    if _ENABLE_LOADING.value and not _ADAPTER_ROOT.value:
        raise app.UsageError("--enable_lora_loading needs at least one --adapter_root")
    if _MESH.value and _LAYOUT.value and _MESH.value != _LAYOUT.value:
        raise app.UsageError("--mesh and --layout name the same thing: give one")
    if _REPLICAS.value < 1 or (_REPLICAS.value > 1 and _MODE.value != "coupled"):
        raise app.UsageError("--replicas takes a positive count, and more than 1 only in --mode coupled")
    cache_dir = compilation_cache.enable(compilation_cache.default_dir() if _COMPILATION_CACHE.value is None
                                         else _COMPILATION_CACHE.value)
    logging.info("compilation cache: %s", cache_dir or "off")
    llm = build_llm(_MODEL.value, parse_adapters(_ADAPTERS.value), dtype=_DTYPE.value,
                    mesh=_MESH.value or _LAYOUT.value, mode=_MODE.value, replicas=_REPLICAS.value,
                    adapter_loading=_ADAPTER_LOADING.value, async_scheduling=_ASYNC_SCHEDULING.value,
                    max_lora_rank=_MAX_LORA_RANK.value, max_adapters=_MAX_ADAPTERS.value,
                    max_host_adapters=_MAX_HOST_ADAPTERS.value, max_model_len=_MAX_MODEL_LEN.value,
                    max_num_seqs=_MAX_NUM_SEQS.value, max_num_batched_tokens=_MAX_BATCHED.value,
                    page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
                    max_adapter_bytes=_MAX_ADAPTER_BYTES.value)
    if _PRECOMPILE.value == "on" or (_PRECOMPILE.value == "auto" and jax.default_backend() != "cpu"):
        shapes = llm.engine.warmup(scoring=True, workers=_COMPILE_WORKERS.value)
        logging.info("compiled the engine's programs for %d step shapes", shapes)
    config = ServerConfig(model_name=_NAME.value or default_model_name(_MODEL.value), api_key=api_key,
                          enable_lora_loading=_ENABLE_LOADING.value, adapter_roots=tuple(_ADAPTER_ROOT.value),
                          max_request_bytes=_MAX_REQUEST_BYTES.value)
    state = ServerState(llm, config)
    logging.info("serving %s (adapters: %s) on http://%s:%d/v1", config.model_name,
                 ", ".join(llm.adapters) or "none", _HOST.value, _PORT.value)
    run(state, host=_HOST.value, port=_PORT.value, log_level=_LOG_LEVEL.value)


def _parse_flags(argv: list[str]) -> list[str]:
    return flags.FLAGS(normalize_argv(argv))


if __name__ == "__main__":
    app.run(main, argv=sys.argv, flags_parser=_parse_flags)
