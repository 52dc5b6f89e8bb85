"""Step-time models for the simulator, fitted to measured engine steps and stored with their provenance.

One engine step (schedule, pack, one jitted forward, sampling, tokens back on the host) is modelled as

    step_ms = host_ms + layers * (const + tokens_coef * tokens + adapters_coef * adapters)

tokens: new tokens in the step (decode tokens plus prefill chunks); adapters: distinct adapters in the batch.
The part inside the brackets is per layer, so a model measured at a cut depth (the GPU runs use 4-8 layers to
keep compile times short) extends to the full depth; `host_ms` does not scale with depth. `split` gives the
base part and the LoRA part separately (the simulator's disaggregated mode overlaps them when the model was
measured on a coupled engine).

Two more measured terms describe how steps follow each other and what a step's time holds:
  gap_ms       host time between two steps of a replica that still has work (bench/replay.py `host_gaps`): the
               caller's loop adding the requests that arrived, a replica group handing the step back and the
               next one to the replica's thread. No step's time holds it; the simulator charges it after every
               step. 0 where it was not measured.
  engine_mode  the engine whose whole steps the model describes: "coupled", or "disaggregated" for steps timed
               on the disaggregated engine (base instance, LoRA server, exchange and whatever overlap the two
               devices had are all in them), which the simulator then takes as they are.

A calibration file (configs/calibration/*.json) holds one model per (machine, model shape) with provenance:
date, machine, command, the raw measured points, and, for models not measured but derived from others
(`extrapolated: true`), the method. `fit` is a non-negative least-squares fit to raw points.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

FEATURES = ("const", "tokens", "adapters")
ENGINE_MODES = ("coupled", "disaggregated")
POINT_COLUMNS = ("tokens", "adapters", "rows", "layers", "ms")


@dataclasses.dataclass(frozen=True)
class StepPoint:
    """One measured step: its features and time, at a given model depth."""

    tokens: int
    adapters: int
    ms: float
    layers: int
    rows: int = 0  # sequences in the step (recorded, not a feature of the model)


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
    name: str
    layers: int  # depth the model is used at (full depth unless cut)
    const: float  # ms per layer
    tokens_coef: float  # ms per token per layer
    adapters_coef: float  # ms per distinct adapter in the batch per layer
    host_ms: float = 0.0  # per step, independent of depth
    rank: int = 0  # LoRA rank of the adapters it was measured (or derived) with
    targets: tuple = ()  # their targets (lora/targets.py names)
    shape_config: str = ""  # the model's config.json (repository-relative), for its shape
    extrapolated: bool = False
    provenance: dict = dataclasses.field(default_factory=dict, compare=False)
    points: tuple = dataclasses.field(default=(), compare=False)  # raw measured points (StepPoint as dicts)
    gap_ms: float = 0.0  # host time between consecutive steps of a busy replica, outside any step (docstring)
    engine_mode: str = "coupled"  # the engine the steps were timed on: "coupled" | "disaggregated" (docstring)

    def split(self, tokens, adapters, layers: int | None = None) -> tuple:
        """(base ms, LoRA ms) of a step: host and per-layer base work; the per-layer adapter term."""
        layers = self.layers if layers is None else layers
        base = self.host_ms + layers * (self.const + self.tokens_coef * np.asarray(tokens))
        return base, layers * self.adapters_coef * np.asarray(adapters)

    def step_ms(self, tokens, adapters=0, layers: int | None = None):
        base, lora = self.split(tokens, adapters, layers)
        return base + lora

    def __post_init__(self):
        if self.engine_mode not in ENGINE_MODES:
            raise ValueError(f"step-time model {self.name!r}: engine_mode={self.engine_mode!r}, not one of "
                             f"{ENGINE_MODES}")
        if self.gap_ms < 0:
            raise ValueError(f"step-time model {self.name!r}: gap_ms={self.gap_ms} < 0")

    def with_layers(self, layers: int) -> StepTimeModel:
        return dataclasses.replace(self, layers=layers)

    def to_dict(self) -> dict:
        """JSON-ready; points as rows of POINT_COLUMNS."""
        d = dataclasses.asdict(self)
        d["points"] = [[round(float(p[c]), 4) if c == "ms" else int(p[c]) for c in POINT_COLUMNS]
                       for p in (dataclasses.asdict(p) if isinstance(p, StepPoint) else p for p in self.points)]
        d["point_columns"] = list(POINT_COLUMNS)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StepTimeModel:
        d = dict(d)
        columns = d.pop("point_columns", POINT_COLUMNS)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"step-time model {d.get('name')!r} has unknown fields {sorted(unknown)}")
        points = tuple(dict(zip(columns, row)) if isinstance(row, list) else row for row in d.get("points", ()))
        return cls(**{**d, "points": points, "targets": tuple(d.get("targets", ()))})


def fit(points: list[StepPoint], name: str, layers: int | None = None, host_ms: float = 0.0,
        provenance: dict | None = None, **fields) -> StepTimeModel:
    """Non-negative least squares on measured steps, all at one depth (`layers` defaults to theirs). host_ms is
    taken as given (it cannot be told apart from the per-layer constant at one depth) and subtracted first."""
    from scipy.optimize import nnls

    depths = {p.layers for p in points}
    if len(depths) != 1:
        raise ValueError(f"points at several depths {sorted(depths)}: fit each depth on its own")
    depth = depths.pop()
    if len(points) < len(FEATURES):
        raise ValueError(f"{len(points)} points cannot determine {len(FEATURES)} coefficients")
    x = np.array([[1.0, p.tokens, p.adapters] for p in points])
    y = np.array([p.ms for p in points]) - host_ms
    coef, _ = nnls(x, y)
    const, tok, ad = (float(c) / depth for c in coef)
    return StepTimeModel(name, layers or depth, const, tok, ad, host_ms, provenance=provenance or {},
                         points=tuple(dataclasses.asdict(p) for p in points), **fields)


def residuals(model: StepTimeModel, points: list[StepPoint]) -> np.ndarray:
    """Relative errors (predicted / measured - 1) of a model on points (each at its own depth)."""
    return np.array([model.step_ms(p.tokens, p.adapters, p.layers) / p.ms - 1 for p in points])


def provenance(command: str, machine: str | None = None, extra: dict | None = None) -> dict:
    """Where measured points come from: date, machine (given, or this host's platform and jax devices),
    the command, and the git commit of the code that measured them."""
    import datetime
    import os
    import platform
    import subprocess

    if machine is None:
        import jax

        machine = (f"{platform.node()}: {platform.machine()} {os.cpu_count()} CPU cores, "
                   f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{len(jax.devices())}")
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=here).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                          cwd=here).stdout.strip():
            commit += "+uncommitted changes"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": datetime.date.today().isoformat(), "machine": machine, "command": command,
            "git_commit": commit, **(extra or {})}


def save(path: str, models: dict[str, StepTimeModel], note: str = "") -> None:
    text = json.dumps({"note": note, "models": {k: m.to_dict() for k, m in models.items()}}, indent=1)
    # one point per line
    text = re.sub(r"\[\s+([-0-9.e,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(path, "w") as f:
        f.write(text + "\n")


def load(path: str) -> dict[str, StepTimeModel]:
    with open(path) as f:
        raw = json.load(f)
    return {k: StepTimeModel.from_dict(v) for k, v in raw["models"].items()}
