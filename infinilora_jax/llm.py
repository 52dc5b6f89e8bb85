"""The library entry point: `LLM(model=..., adapters=...)`, teacher-forced `logits`, batched and streamed
generation on the continuous-batching engine (engine/engine.py). Each prompt may use its own adapter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infinilora_jax.disagg.engine import InstanceGroup
from infinilora_jax.disagg.runner import DisaggRunner
from infinilora_jax.engine.engine import LLMEngine
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.replicas import ReplicaGroup, split_devices
from infinilora_jax.engine.request import RequestOutput
from infinilora_jax.engine.runner import ModelRunner
from infinilora_jax.engine.scheduler import SchedulerConfig
from infinilora_jax.errors import AdapterLoadError, ConfigError, RequestError
from infinilora_jax.loading import orbax_store
from infinilora_jax.loading.hf_checkpoint import HFCheckpoint, WeightMap, checkpoint_factory
from infinilora_jax.lora.pool import LoraPoolConfig
from infinilora_jax.lora.targets import ALL_TARGETS
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import random_factory
from infinilora_jax.sampling import SamplingParams
from meshes.layouts import MeshLayout, RoleLayout, resolve_layout, resolve_role_layout

log = logging.getLogger(__name__)

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "assets", "tiny-qwen3-moe")
BUNDLED_MODEL = os.path.join(BUNDLED_DIR, "model")
BUNDLED_ADAPTERS = os.path.join(BUNDLED_DIR, "adapters")
MODES = ("coupled", "disaggregated")
ADAPTER_LOADING = ("step", "background")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def bundled_adapters() -> dict[str, str]:
    """name -> directory of the adapters shipped with the bundled tiny model."""
    if not os.path.isdir(BUNDLED_ADAPTERS):
        return {}
    return {n: os.path.join(BUNDLED_ADAPTERS, n) for n in sorted(os.listdir(BUNDLED_ADAPTERS))
            if os.path.isfile(os.path.join(BUNDLED_ADAPTERS, n, "adapter_config.json"))}


@dataclasses.dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS, stop token or stop string) | "length"
    adapter: str | None


class LLM:
    def __init__(self, model: str | None = None, adapters: dict[str, str] | None = None, dtype: str = "bfloat16",
                 mesh: str | MeshLayout | RoleLayout | None = None, *, max_lora_rank: int = 16,
                 max_adapters: int | None = None, max_host_adapters: int = 64, max_model_len: int | None = None,
                 lora_targets: Sequence[str] = ALL_TARGETS, max_adapter_bytes: int | None = None,
                 page_size: int = 16, num_pages: int | None = None, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 256, num_layers: int | None = None, progress: bool = True,
                 mode: str = "coupled", replicas: int = 1, adapter_loading: str = "step",
                 async_scheduling: bool = True):
        """
        Args:
          model: a Hugging Face model directory (config.json + safetensors), a directory written by
            `save_converted`, None for the bundled tiny model, or a config.json file (e.g. configs/models/*.json):
            a model of that shape with random weights, for benchmarks (num_layers may cut its depth).
          adapters: adapter name -> PEFT adapter directory, registered at start.
          dtype: "bfloat16" | "float32" | "float16" for weights and activations.
          mesh: coupled mode: a layout name from meshes.LAYOUTS (e.g. "pp2_ep2_tp2"), a MeshLayout, or None for
            one device; disaggregated mode: a role layout from meshes.ROLE_LAYOUTS ("1+1", "2+2", "4+4", "8+8")
            or a RoleLayout (None: "1+1").
          max_lora_rank, max_adapters, lora_targets: the device adapter pool (slots resident at once);
            max_host_adapters: converted adapters kept in host memory; more may be registered than either.
          max_model_len: context limit (prompt + generated); defaults to the model's max_position_embeddings.
          page_size, num_pages: the paged KV cache (num_pages defaults to enough for max_num_seqs full-length
            sequences, at most 65536; in disaggregated mode, grown until the LoRA server's role buffers hold
            max_adapters); max_num_seqs, max_num_batched_tokens: the scheduler's per-step limits.
          mode: "coupled" (every device holds base weights and adapter pages) or "disaggregated" (base instances
            and a LoRA server on separate devices of one role mesh; docs/architecture/07-disaggregated.md).
          replicas: coupled mode: independent replicas (data parallelism, S-LoRA style), each with the `mesh`
            layout on its own contiguous group of devices (replica r: devices [r * n, (r + 1) * n) for a layout of
            n devices) and its own weights, KV cache, scheduler and adapter pool of max_adapters slots; requests
            are routed by adapter residency and load (engine/replicas.py). 1: one engine, no ReplicaGroup.
          adapter_loading: "step": a cold adapter is copied in by the step that first uses it (layer by layer),
            which that whole batch waits for; "background": the copy runs while steps go on, and the requests
            that need it are admitted once it has landed (lora/adapter_cache.py).
          async_scheduling: queue each step before reading the previous step's tokens, so the host's
            scheduling overlaps the device (engine/engine.py); False: one step at a time. Both modes.
        """
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose one of {MODES}")
        self.mode = mode
        if not isinstance(replicas, int) or replicas < 1:
            raise ConfigError(f"replicas={replicas!r}: must be a positive integer")
        if replicas > 1 and mode != "coupled":
            raise ConfigError(f"replicas={replicas} is for coupled mode; disaggregated mode sets its base instances "
                              "by the role layout's dp")
        self.replicas = replicas
        if adapter_loading not in ADAPTER_LOADING:
            raise ConfigError(f"adapter_loading={adapter_loading!r}: choose one of {ADAPTER_LOADING}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
        self.model_dir = os.fspath(model) if model is not None else BUNDLED_MODEL
        self.layout = resolve_role_layout(mesh) if mode == "disaggregated" else resolve_layout(mesh)
        self.dtype = dtype
        adapters = dict(adapters or {})
        pool_cfg = LoraPoolConfig(max_adapters=max_adapters or max(4, len(adapters)), max_rank=max_lora_rank,
                                  targets=tuple(lora_targets))
        if os.path.isfile(self.model_dir) and self.model_dir.endswith(".json"):
            with open(self.model_dir) as f:
                raw = json.load(f)
            if num_layers is not None:
                raw = {**raw, "num_hidden_layers": num_layers}
            self.config = ModelConfig.from_hf_dict(raw, source=self.model_dir)
            make_factory = lambda mesh, on_param: _counting(random_factory(mesh, seed=0, std=0.02), on_param)
        elif orbax_store.is_converted(self.model_dir):
            if mode == "disaggregated":
                raise ConfigError("disaggregated mode loads Hugging Face checkpoints or random configs, not "
                                  "Orbax-converted directories (yet)")
            self.config = orbax_store.read_config(self.model_dir)
            make_factory = orbax_store.restore_factory(self.model_dir, self.layout, DTYPES[dtype])
        else:
            self.config = ModelConfig.from_hf_dir(self.model_dir)
            weights = WeightMap(self.config, HFCheckpoint(self.model_dir))
            make_factory = lambda mesh, on_param: checkpoint_factory(weights, mesh, on_param)
        runner_cls = DisaggRunner if mode == "disaggregated" else ModelRunner
        runner_args = (self.config, self.layout, DTYPES[dtype], make_factory, pool_cfg)
        runner_kwargs = dict(max_host_adapters=max_host_adapters, max_adapter_bytes=max_adapter_bytes,
                             progress=progress, background_loads=adapter_loading == "background")
        if replicas > 1:
            groups = split_devices(jax.devices(), replicas, self.layout.num_devices)
            runners = [ModelRunner(*runner_args, devices=group, **runner_kwargs) for group in groups]
        else:
            self.runner = runner_cls(*runner_args, **runner_kwargs)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        if num_pages is None:
            num_pages = min(65536, max_num_seqs * -(-self.max_model_len // page_size) + 1)
            if mode == "disaggregated":  # the LoRA devices' KV blocks are their adapter arenas
                num_pages = self.runner.kv_pages_for_adapters(num_pages, page_size)
        if mode == "disaggregated":  # so LoRA devices can use their KV blocks as adapter-page arenas
            num_pages = self.runner.round_kv_pages(num_pages, page_size)
        self.tokenizer = _load_tokenizer(self.model_dir)
        engine_args = (CacheConfig(page_size, num_pages),
                       SchedulerConfig(max_num_seqs, max_num_batched_tokens, self.max_model_len),
                       self.tokenizer, self.config.eos_token_ids)
        if replicas > 1:
            self.engine = ReplicaGroup(runners, *engine_args, async_scheduling=async_scheduling)
            self.runner = self.engine.runner  # the replicas' runners seen as one (a shared adapter registry)
        elif mode == "disaggregated" and self.layout.dp > 1:
            self.engine = InstanceGroup(self.runner, *engine_args, async_scheduling=async_scheduling)
        else:
            self.engine = LLMEngine(self.runner, *engine_args, async_scheduling=async_scheduling)
        for name, path in adapters.items():
            self.load_adapter(name, path)

    # ---- adapters ----

    def load_adapter(self, name: str, path: str) -> None:
        self.runner.adapters.register(name, path)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; refused (AdapterBusyError) while requests are queued or running with it."""
        self.engine.unload_adapter(name)

    @property
    def adapters(self) -> list[str]:
        return self.runner.adapters.names()

    def save_converted(self, path: str) -> None:
        """Write the converted, sharded parameters with Orbax, for fast reload with LLM(model=path)."""
        if self.mode != "coupled":
            raise ConfigError("save_converted works in coupled mode")
        orbax_store.save(path, self.config, self.runner.model_state, self.runner.layout, source_dir=self.model_dir)

    # ---- inference ----

    def logits(self, token_ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Teacher-forced logits: float32 [len(token_ids), vocab], row t predicting token t + 1."""
        return self.engine.score(token_ids, adapter)

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str] | str,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | None | Sequence[str | None] = None) -> list[GenerationResult]:
        """Generate for every prompt with continuous batching; `adapter` is one name for all or one per prompt."""
        final: dict[str, RequestOutput] = {}
        ids = self._submit(prompts, sampling_params, adapter)
        for out in self._run(ids):
            if out.finished:
                final[out.request_id] = out
        return [GenerationResult(final[i].prompt_token_ids, final[i].token_ids, final[i].text,
                                 final[i].finish_reason, final[i].adapter) for i in ids]

    def generate_stream(self, prompts, sampling_params=None, adapter=None) -> Iterator[RequestOutput]:
        """Like generate, but yields each request's RequestOutput as tokens arrive (new_token_ids per step)."""
        yield from self._run(self._submit(prompts, sampling_params, adapter))

    def _submit(self, prompts, sampling_params, adapter) -> list[str]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params or
                                                                                   SamplingParams()] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise RequestError(f"{n} prompts but {len(params)} sampling params and {len(adapters)} adapters")
        token_rows = [self.engine.check_prompt(self._encode(p)) for p in prompts]  # validate all before queueing
        for a in adapters:
            if a is not None:
                self.runner.adapters.require(a)
        if any(p.stop for p in params) and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        return [self.engine.add_request(t, p, a) for t, p, a in zip(token_rows, params, adapters)]

    def _run(self, ids: list[str]) -> Iterator[RequestOutput]:
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.error is not None:
                            raise AdapterLoadError(out.error)
                        yield out
                        if out.finished:
                            pending.discard(out.request_id)
        finally:  # a consumer that stops early (or an error) must not leave requests holding pages
            for request_id in pending:
                self.engine.abort(request_id)
            self.engine.pop_finished()

    # ---- tokens ----

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.model_dir} has no tokenizer.json: pass token ids, not text")
            return self.tokenizer.encode(prompt).ids
        return [int(t) for t in prompt]


def _counting(factory, on_param):
    def make(decl):
        on_param(decl)
        return factory(decl)
    return make


def _load_tokenizer(model_dir: str):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isdir(model_dir) or not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)
