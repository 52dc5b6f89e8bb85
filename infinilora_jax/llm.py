"""The library entry point: `LLM(model=..., adapters=...)`, teacher-forced `logits`, batched `generate`.

Generation here is a simple loop (one prefill, then one decode step per token for the whole batch); the
serving engine replaces it with continuous batching. Each prompt may use its own adapter in the same batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from infinilora_jax.engine.runner import ModelRunner
from infinilora_jax.errors import ConfigError, RequestError
from infinilora_jax.loading import orbax_store
from infinilora_jax.loading.hf_checkpoint import HFCheckpoint, WeightMap, checkpoint_factory
from infinilora_jax.lora.pool import LoraPoolConfig
from infinilora_jax.lora.targets import ALL_TARGETS
from infinilora_jax.models.batch import ForwardBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.sampling import Sampler, SamplingParams
from meshes.layouts import MeshLayout, resolve_layout

log = logging.getLogger(__name__)

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "assets", "tiny-qwen3-moe")
BUNDLED_MODEL = os.path.join(BUNDLED_DIR, "model")
BUNDLED_ADAPTERS = os.path.join(BUNDLED_DIR, "adapters")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def bundled_adapters() -> dict[str, str]:
    """name -> directory of the adapters shipped with the bundled tiny model."""
    if not os.path.isdir(BUNDLED_ADAPTERS):
        return {}
    return {n: os.path.join(BUNDLED_ADAPTERS, n) for n in sorted(os.listdir(BUNDLED_ADAPTERS))
            if os.path.isfile(os.path.join(BUNDLED_ADAPTERS, n, "adapter_config.json"))}


def _bucket(n: int, minimum: int) -> int:
    """Next power of two >= n (at least `minimum`), so shapes repeat and compilations are reused."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS, stop token or stop string) | "length"
    adapter: str | None


class LLM:
    def __init__(self, model: str | None = None, adapters: dict[str, str] | None = None, dtype: str = "bfloat16",
                 mesh: str | MeshLayout | None = None, *, max_lora_rank: int = 16, max_adapters: int | None = None,
                 max_model_len: int | None = None, lora_targets: Sequence[str] = ALL_TARGETS,
                 max_adapter_bytes: int | None = None, progress: bool = True):
        """
        Args:
          model: a Hugging Face model directory (config.json + safetensors), a directory written by
            `save_converted`, or None for the bundled tiny model.
          adapters: adapter name -> PEFT adapter directory, loaded at start.
          dtype: "bfloat16" | "float32" | "float16" for weights and activations.
          mesh: a layout name from meshes.LAYOUTS (e.g. "pp2_ep2_tp2"), a MeshLayout, or None for one device.
          max_lora_rank, max_adapters, lora_targets: the adapter pool's shape.
          max_model_len: context limit (prompt + generated); defaults to the model's max_position_embeddings.
        """
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
        self.model_dir = os.fspath(model) if model is not None else BUNDLED_MODEL
        self.layout = resolve_layout(mesh)
        self.dtype = dtype
        adapters = dict(adapters or {})
        pool_cfg = LoraPoolConfig(max_adapters=max_adapters or max(4, len(adapters)), max_rank=max_lora_rank,
                                  targets=tuple(lora_targets))
        if orbax_store.is_converted(self.model_dir):
            self.config = orbax_store.read_config(self.model_dir)
            make_factory = orbax_store.restore_factory(self.model_dir, self.layout, DTYPES[dtype])
        else:
            self.config = ModelConfig.from_hf_dir(self.model_dir)
            weights = WeightMap(self.config, HFCheckpoint(self.model_dir))
            make_factory = lambda mesh, on_param: checkpoint_factory(weights, mesh, on_param)
        self.runner = ModelRunner(self.config, self.layout, DTYPES[dtype], make_factory, pool_cfg,
                                  max_adapter_bytes=max_adapter_bytes, progress=progress)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.tokenizer = _load_tokenizer(self.model_dir)
        for name, path in adapters.items():
            self.load_adapter(name, path)

    # ---- adapters ----

    def load_adapter(self, name: str, path: str) -> None:
        self.runner.registry.load(name, path)

    def unload_adapter(self, name: str) -> None:
        self.runner.registry.unload(name)

    @property
    def adapters(self) -> list[str]:
        return self.runner.registry.names()

    def save_converted(self, path: str) -> None:
        """Write the converted, sharded parameters with Orbax, for fast reload with LLM(model=path)."""
        orbax_store.save(path, self.config, self.runner.model_state, self.runner.layout, source_dir=self.model_dir)

    # ---- inference ----

    def logits(self, token_ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Teacher-forced logits: float32 [len(token_ids), vocab], row t predicting token t + 1."""
        tokens = self._check_prompt(token_ids, room_to_generate=False)
        slot = self.runner.registry.slot(adapter)
        t = _bucket(len(tokens), 32)
        kv = self.runner.new_kv_cache(1, t)
        batch = ForwardBatch.from_rows([tokens], [0], [slot], t, 1, all_logits=True)
        logits, _ = self.runner.forward(batch, kv)
        return logits[: len(tokens)]

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str] | str,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | None | Sequence[str | None] = None) -> list[GenerationResult]:
        """Generate for every prompt in one batch; `adapter` may be one name for all or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params or
                                                                                   SamplingParams()] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise RequestError(f"{n} prompts but {len(params)} sampling params and {len(adapters)} adapters")
        token_rows = [self._check_prompt(self._encode(p)) for p in prompts]
        slots = [self.runner.registry.slot(a) for a in adapters]  # raises for an unknown adapter
        budgets = [min(p.max_tokens, self.max_model_len - len(row)) for p, row in zip(params, token_rows)]
        b = _bucket(n, 1)
        max_len = _bucket(max(len(r) + m for r, m in zip(token_rows, budgets)), 16)
        kv = self.runner.new_kv_cache(b, max_len)
        sampler = Sampler(params)
        eos = set(self.config.eos_token_ids)
        outputs: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n

        batch = ForwardBatch.from_rows(token_rows, [0] * n, slots, _bucket(max(map(len, token_rows)), 8), b, False)
        logits, kv = self.runner.forward(batch, kv)
        while True:
            next_tokens = sampler(logits[:n])
            for i, tok in enumerate(next_tokens):
                if finish[i] is None:
                    outputs[i].append(int(tok))
                    finish[i] = self._finished(outputs[i], params[i], budgets[i], eos)
            live = [i for i in range(n) if finish[i] is None]
            if not live:
                break
            rows = [[outputs[i][-1]] if finish[i] is None else [] for i in range(n)]
            starts = [len(token_rows[i]) + len(outputs[i]) - 1 for i in range(n)]
            batch = ForwardBatch.from_rows(rows, starts, slots, 1, b, False)
            logits, kv = self.runner.forward(batch, kv)
        results = []
        for i in range(n):
            ids, reason = outputs[i], finish[i]
            text = self._decode(ids) if self.tokenizer else None
            if text is not None and params[i].stop:
                cut = min((text.find(s) for s in params[i].stop if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
            results.append(GenerationResult(token_rows[i], ids, text, reason, adapters[i]))
        return results

    def _finished(self, ids: list[int], p: SamplingParams, budget: int, eos: set[int]) -> str | None:
        last = ids[-1]
        if last in p.stop_token_ids or (not p.ignore_eos and last in eos):
            return "stop"
        if p.stop and self.tokenizer is not None and any(s in self._decode(ids) for s in p.stop):
            return "stop"
        return "length" if len(ids) >= budget else None

    # ---- tokens ----

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.model_dir} has no tokenizer.json: pass token ids, not text")
            return self.tokenizer.encode(prompt).ids
        return [int(t) for t in prompt]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _check_prompt(self, tokens: list[int], room_to_generate: bool = True) -> list[int]:
        if not tokens:
            raise RequestError("empty prompt")
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if len(tokens) + room_to_generate > self.max_model_len:
            raise RequestError(f"prompt of {len(tokens)} tokens leaves no room to generate within the context "
                               f"limit of {self.max_model_len} tokens")
        return list(tokens)


def _load_tokenizer(model_dir: str):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)
