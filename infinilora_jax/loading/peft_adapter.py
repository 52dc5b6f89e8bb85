"""PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) -> host-side adapter weights.

What is read and how it maps (r = rank, E = experts, s = alpha / r, or alpha / sqrt(r) with rsLoRA):
  attention  ...self_attn.{q,k,v,o}_proj.lora_A [r, in], lora_B [out, r]
  dense MLP  ...mlp.{gate,up,down}_proj.lora_A / lora_B                       (Qwen3 mlp_only layers)
  experts, PEFT `target_parameters` on fused expert tensors (peft >= 0.17, transformers >= 5):
             ...mlp.experts[.base_layer].lora_A [E*r, in]  (rows expert-major: reshape (E, r, in))
             ...mlp.experts[.base_layer].lora_B [out, E*r] (columns expert-minor: reshape (out, r, E))
             which parameter (gate_up_proj or down_proj) a wrapper adapts is told by its shapes;
  experts, per-expert target modules (older checkpoints): ...experts.{e}.{w1,w3,w2 | gate_proj,up_proj,down_proj}.
  router     ...mlp.gate.lora_A [r, H], lora_B [E, r] (`target_parameters` "gate.weight", as PEFT's "all-linear"
             gives on transformers 5; or the router nn.Linear of older models), added to the router logits.
Per-expert gate/up LoRAs (separate A for gate and up) become one gate_up page of rank r_gate + r_up with a
block-diagonal B; the fused form shares one A between gate and up and keeps its rank.
Ranks and alphas may differ per module through `rank_pattern` / `alpha_pattern` (PEFT's own v4->v5 conversion
writes them, e.g. {".*\\.gate_up_proj": 2r}); they are resolved per module with PEFT's matching rule.

PEFT's own rules decide which modules an adapter applies to (target_modules list/regex, exclude_modules,
layers_to_transform/layers_pattern; target_parameters ignore layer filters, as in PEFT). A targeted module
whose tensors are missing is an error; a tensor for a module the config does not target is ignored, as PEFT
ignores it. Everything is validated before anything is returned, so a failed load changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import numpy as np

from infinilora_jax.errors import AdapterError, UnsupportedAdapterError
from infinilora_jax.loading.safetensors_io import SafetensorsError, SafetensorsFile
from infinilora_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT features that change the forward pass and are not implemented: each must be absent, null, false or empty.
_UNSUPPORTED_FIELDS = ("use_dora", "modules_to_save", "lora_bias", "fan_in_fan_out", "layer_replication",
                       "alora_invocation_tokens", "trainable_token_indices", "use_qalora", "use_bdlora",
                       "velora_config", "kasa_config", "monteclora_config", "arrow_config", "megatron_config")

_PREFIX = "base_model.model."
_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj$")
_DENSE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts((?:\.base_layer)*)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.gate$")
_TENSOR = re.compile(r"^(.*)\.lora_(A|B)\.weight$")
_EXPERT_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclasses.dataclass
class AdapterWeights:
    """One adapter on the host, independent of any device layout; scaling is folded into B.

    pages[(layer, target)] = (A [..., r, in], B [..., r, *out]); expert targets have a leading E dim. A keeps
    PEFT's own lora_A orientation (rank-major), which is also the adapter pool's: loading and staging copy it
    without a transpose.
    """

    name: str
    path: str
    rank: int  # the adapter's configured r (rank_pattern may give some modules another)
    alpha: float
    use_rslora: bool
    pages: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pages.values())

    @property
    def max_page_rank(self) -> int:
        return max((a.shape[-2] for a, _ in self.pages.values()), default=0)

    @property
    def targets(self) -> set[str]:
        return {t for _, t in self.pages}


def read_adapter_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise AdapterError("adapter directory does not exist", path=path)
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except FileNotFoundError as e:
        raise AdapterError(f"no {CONFIG_FILE} in adapter directory", path=path) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}", path=cfg_path) from e
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_FILE} is not a JSON object", path=cfg_path)
    return raw


def _check_config(raw: dict, cfg_path: str, max_rank: int) -> tuple[int, float, bool]:
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"peft_type={peft_type!r}: only LoRA adapters are supported",
                                      path=cfg_path, field="peft_type")
    for field in _UNSUPPORTED_FIELDS:
        if raw.get(field):
            raise UnsupportedAdapterError(f"{field}={raw[field]!r} is not supported", path=cfg_path, field=field)
    if raw.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"bias={raw['bias']!r} is not supported (only 'none')", path=cfg_path,
                                      field="bias")
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"r={r!r} must be a positive integer", path=cfg_path, field="r")
    if r > max_rank:
        raise AdapterError(f"r={r} exceeds the configured maximum rank {max_rank}", path=cfg_path, field="r")
    alpha = raw.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha={alpha!r} must be a number", path=cfg_path, field="lora_alpha")
    if not raw.get("target_modules") and not raw.get("target_parameters"):
        raise AdapterError("neither target_modules nor target_parameters is set", path=cfg_path,
                           field="target_modules")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(field) or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pattern.values()):
            raise AdapterError(f"{field}={pattern!r} must map module patterns to positive numbers", path=cfg_path,
                               field=field)
        for key in pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise AdapterError(f"{field} key {key!r} is not a valid regex: {e}", path=cfg_path,
                                   field=field) from e
    for key, rank in (raw.get("rank_pattern") or {}).items():
        if not isinstance(rank, int) or rank > max_rank:
            raise AdapterError(f"rank_pattern[{key!r}]={rank!r} must be an integer <= the configured maximum rank "
                               f"{max_rank}", path=cfg_path, field="rank_pattern")
    return r, float(alpha), bool(raw.get("use_rslora", False))


class _Targeting:
    """PEFT's module/parameter matching rules (peft.tuners.tuners_utils.check_target_module_exists)."""

    def __init__(self, raw: dict):
        self.modules = raw.get("target_modules")
        self.parameters = raw.get("target_parameters") or []
        self.exclude = raw.get("exclude_modules")
        layers = raw.get("layers_to_transform")
        self.layers = None if layers is None or layers == [] else ({layers} if isinstance(layers, int) else set(layers))
        pattern = raw.get("layers_pattern")
        self.layer_patterns = [pattern] if isinstance(pattern, str) and pattern else (pattern or [])
        if self.modules == "all-linear":  # every nn.Linear but the output layer (PEFT saves it expanded today)
            self.modules = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|w1|w2|w3|gate)"
        self.r, self.alpha, self.rslora = raw["r"], float(raw.get("lora_alpha", raw["r"])), bool(raw.get("use_rslora"))
        self.rank_pattern = raw.get("rank_pattern") or {}
        self.alpha_pattern = raw.get("alpha_pattern") or {}

    @staticmethod
    def _pattern(patterns: dict, key: str):
        r"""PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\.)?({p})$", key)."""
        return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", key)), None)

    def rank_and_scale(self, key: str) -> tuple[int, float]:
        """(r, scaling) of the module or parameter `key` (e.g. "model.layers.0.mlp.experts.gate_up_proj")."""
        r = self._pattern(self.rank_pattern, key) or self.r
        alpha = self._pattern(self.alpha_pattern, key) or self.alpha
        return int(r), float(alpha / math.sqrt(r) if self.rslora else alpha / r)

    @staticmethod
    def _matches(names, key: str) -> bool:
        if isinstance(names, str):
            return re.fullmatch(names, key) is not None
        return key in names or any(key.endswith(f".{n}") for n in names)

    def module(self, key: str) -> bool:
        if self.exclude and self._matches(self.exclude, key):
            return False
        if not self.modules:
            return False
        if not self._matches(self.modules, key):
            return False
        if isinstance(self.modules, str) or self.layers is None:
            return True  # PEFT applies layers_to_transform only with list-valued target_modules
        if self.layer_patterns:
            found = [re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key) for p in self.layer_patterns]
            match = next((m for m in found if m), None)
        else:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return match is not None and int(match.group("idx")) in self.layers

    def parameter(self, key: str) -> bool:
        return self._matches(self.parameters, key) if self.parameters else False


def load_peft_adapter(path: str | os.PathLike, cfg: ModelConfig, *, max_rank: int, dtype=np.float32,
                      name: str | None = None, max_bytes: int | None = None) -> AdapterWeights:
    """Read, validate and convert one PEFT LoRA adapter for a model with config `cfg`.

    Raises AdapterError (or UnsupportedAdapterError) naming the file and field on any problem.
    """
    path = os.fspath(path)
    raw = read_adapter_config(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    r, alpha, rslora = _check_config(raw, cfg_path, max_rank)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights_path):
        raise AdapterError(f"no {WEIGHTS_FILE} in adapter directory", path=path)
    if max_bytes is not None and os.path.getsize(weights_path) > max_bytes:
        raise AdapterError(f"{os.path.getsize(weights_path)} bytes exceeds the adapter size limit of {max_bytes}",
                           path=weights_path)
    try:
        st = SafetensorsFile(weights_path)
    except SafetensorsError as e:
        raise AdapterError(str(e), path=weights_path) from e

    tensors: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key}
    for key in st.keys():
        m = _TENSOR.match(key)
        if m is None or not m.group(1).startswith(_PREFIX):
            raise UnsupportedAdapterError(f"tensor {key!r} is not a LoRA A/B weight this server supports",
                                          path=weights_path, field=key)
        tensors.setdefault(m.group(1)[len(_PREFIX):], {})[m.group(2)] = key

    targeting = _Targeting(raw)
    conv = _Converter(cfg, st, weights_path, targeting, max_rank, dtype)
    legacy_experts = any(_EXPERT.match(mod) for mod in tensors)
    block = "block_sparse_moe" if any(".block_sparse_moe." in mod for mod in tensors) else "mlp"
    used: set[str] = set()
    for module in _expected_modules(cfg, targeting, legacy_experts, block):
        pair = tensors.get(module, {})
        for ab in ("A", "B"):
            if ab not in pair:
                raise AdapterError(f"missing tensor for targeted module {module!r}", path=weights_path,
                                   field=f"{_PREFIX}{module}.lora_{ab}.weight")
        conv.add(module, pair["A"], pair["B"])
        used.add(module)
    ignored = sorted(set(tensors) - used)
    for module in ignored:
        if not any(rx.match(module) for rx in (_ATTN, _DENSE, _EXPERT, _FUSED, _ROUTER)):
            raise UnsupportedAdapterError(f"LoRA on module {module!r} is not supported", path=weights_path,
                                          field=module)
    if ignored:
        log.warning("%s: ignoring %d tensors for modules the adapter config does not target (as PEFT does): %s",
                    weights_path, len(ignored), ignored[:4])
    pages = conv.finish()
    if not pages:
        raise AdapterError("the adapter applies to no module of this model", path=path, field="target_modules")
    return AdapterWeights(name or os.path.basename(os.path.normpath(path)), path, r, alpha, rslora, pages)


def _expected_modules(cfg: ModelConfig, t: _Targeting, legacy_experts: bool, block: str) -> list[str]:
    """Every module (or wrapped fused-expert / router parameter) of the model that this adapter config targets."""
    out = []
    mixtral = cfg.family == "mixtral"
    for layer in range(cfg.num_layers):
        base = f"model.layers.{layer}"
        out += [m for p in "qkvo" if t.module(m := f"{base}.self_attn.{p}_proj")]
        if not cfg.moe_layers[layer]:
            out += [m for p in ("gate", "up", "down") if t.module(m := f"{base}.mlp.{p}_proj")]
            continue
        router = f"{base}.{block}.gate"
        if t.module(router) or t.parameter(f"{base}.mlp.gate.weight"):
            out.append(router)
        if legacy_experts or (mixtral and not t.parameters):
            names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
            out += [m for e in range(cfg.num_experts) for n in names
                    if t.module(m := f"{base}.{block}.experts.{e}.{n}")]
        else:
            wanted = [p for p in ("gate_up_proj", "down_proj") if t.parameter(f"{base}.mlp.experts.{p}")]
            # PEFT nests one ParamWrapper per targeted parameter; all but the outermost sit on `.base_layer`s.
            for depth, _ in enumerate(wanted):
                out.append(f"{base}.mlp.experts" + ".base_layer" * (len(wanted) - 1 - depth))
    return out


class _Converter:
    """Validates shapes and converts PEFT tensors into pages (A [.., r, in], B [.., r, out]), scaling folded in."""

    def __init__(self, cfg: ModelConfig, st: SafetensorsFile, path: str, targeting: _Targeting, max_rank: int,
                 dtype):
        self.cfg, self.st, self.path, self.targeting, self.max_rank, self.dtype = (cfg, st, path, targeting,
                                                                                   max_rank, dtype)
        self.pages: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self.legacy: dict[tuple[int, str], dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def _read(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        found = self.st.shape(key)
        if tuple(found) != tuple(shape):
            raise AdapterError(f"tensor has shape {tuple(found)}, expected {tuple(shape)} for this base model "
                               f"(a base-model mismatch, or a rank that differs from adapter_config.json)",
                               path=self.path, field=key)
        arr = np.asarray(self.st.get(key), dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise AdapterError("tensor holds NaN or infinite values", path=self.path, field=key)
        return arr

    def _rank(self, key: str, field: str) -> tuple[int, float]:
        r, scale = self.targeting.rank_and_scale(key)
        if r > self.max_rank:
            raise AdapterError(f"{key} has rank {r}, above the configured maximum rank {self.max_rank}",
                               path=self.path, field=field)
        return r, scale

    def _io(self, proj: str) -> tuple[int, int]:
        cfg = self.cfg
        q, kv, h = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
        return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, cfg.dense_intermediate_size),
                "up": (h, cfg.dense_intermediate_size), "down": (cfg.dense_intermediate_size, h),
                "router": (h, cfg.num_experts)}[proj]

    def add(self, module: str, key_a: str, key_b: str):
        cfg = self.cfg
        if m := _ATTN.match(module) or _DENSE.match(module) or _ROUTER.match(module):
            layer = int(m.group(1))
            proj = "router" if m.re is _ROUTER else m.group(2)
            pattern_key = f"{module}.weight" if proj == "router" and self.targeting.parameter(f"{module}.weight") \
                else module
            r, scale = self._rank(pattern_key, key_a)
            d_in, d_out = self._io(proj)
            a, b = self._read(key_a, (r, d_in)), self._read(key_b, (d_out, r))
            self.pages[(layer, proj)] = self._cast(a, b.T * scale)
        elif m := _EXPERT.match(module):
            layer, expert, role = int(m.group(1)), int(m.group(3)), _EXPERT_ROLE[m.group(4)]
            r, scale = self._rank(module, key_a)
            h, i = cfg.hidden_size, cfg.moe_intermediate_size
            d_in, d_out = (i, h) if role == "down" else (h, i)
            a, b = self._read(key_a, (r, d_in)), self._read(key_b, (d_out, r))
            self.legacy.setdefault((layer, role), {})[expert] = (a, b.T * scale)
        elif m := _FUSED.match(module):
            self._add_fused(int(m.group(1)), module, key_a, key_b)
        else:
            raise UnsupportedAdapterError(f"LoRA on module {module!r} is not supported", path=self.path,
                                          field=key_a)

    def _add_fused(self, layer: int, module: str, key_a: str, key_b: str):
        """PEFT target_parameters on fused experts; which parameter (gate_up_proj / down_proj) by the shapes."""
        e, h, i = self.cfg.num_experts, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        (a_rows, a_in), (b_out, b_cols) = self.st.shape(key_a), self.st.shape(key_b)
        if (a_in, b_out) == (h, 2 * i):
            target, param = "expert_gate_up", "gate_up_proj"
        elif (a_in, b_out) == (i, h):
            target, param = "expert_down", "down_proj"
        else:
            raise AdapterError(f"fused-expert LoRA shapes A{(a_rows, a_in)} B{(b_out, b_cols)} fit neither "
                               f"gate_up_proj (A [E*r, {h}], B [{2 * i}, E*r]) nor down_proj (A [E*r, {i}], "
                               f"B [{h}, E*r]) of this base model", path=self.path, field=key_a)
        r, scale = self._rank(f"{module.replace('.base_layer', '')}.{param}", key_a)
        a = self._read(key_a, (e * r, a_in)).reshape(e, r, a_in)  # [E, r, in] (rows expert-major)
        b = self._read(key_b, (b_out, e * r)).reshape(b_out, r, e).transpose(2, 1, 0) * scale  # [E, r, out]
        if target == "expert_gate_up":
            b = b.reshape(e, r, 2, i)
        if (layer, target) in self.pages:
            raise AdapterError(f"two fused-expert LoRAs adapt {param} of layer {layer}", path=self.path,
                               field=key_a)
        self.pages[(layer, target)] = self._cast(a, b)

    def finish(self) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
        """Assemble per-expert modules into stacked expert pages; gate and up share one block-diagonal page."""
        e, i = self.cfg.num_experts, self.cfg.moe_intermediate_size
        for layer in sorted({layer for layer, _ in self.legacy}):
            def stacked(role):
                per = self.legacy.get((layer, role))
                if per is None:
                    return None
                return np.stack([per[x][0] for x in range(e)]), np.stack([per[x][1] for x in range(e)])
            gate, up, down = stacked("gate"), stacked("up"), stacked("down")
            if down is not None:
                self.pages[(layer, "expert_down")] = self._cast(*down)
            parts = [(half, p) for half, p in ((0, gate), (1, up)) if p is not None]
            if parts:
                a = np.concatenate([p[0] for _, p in parts], axis=-2)  # [E, r_gate + r_up, H]
                b = np.zeros((e, a.shape[-2], 2, i), np.float32)
                start = 0
                for half, (_, pb) in parts:
                    b[:, start:start + pb.shape[1], half] = pb
                    start += pb.shape[1]
                self.pages[(layer, "expert_gate_up")] = self._cast(a, b)
        return self.pages

    def _cast(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(a.astype(self.dtype)), np.ascontiguousarray(b.astype(self.dtype))
