"""Step-time models for shapes, ranks and device counts that were not measured, derived from measured ones.

Everything here is an extrapolation, and models made here say so (`extrapolated=True`, with the method in their
provenance). From the measured models (per layer, at the rank and targets they were measured with) three rates
are read, and applied to the target shape:

  adapters_coef  the adapter term is taken as proportional to one adapter's page bytes per layer: bytes per ms
                 of adapter term, averaged over the measured models, times the target's bytes at its rank and
                 targets. (On the H200 the two measured shapes gave 1.7 and 1.9 TB/s of page bytes.)
  tokens_coef    proportional to the parameters a token multiplies with per layer (top-k experts plus
                 attention): the measured models' effective FLOP rate.
  const          proportional to a layer's weight bytes, at a time per byte interpolated log-linearly in the
                 number of experts between the measured models (clamped outside them): the engine's per-layer
                 fixed cost per byte grew ~4.5x from Mixtral's 8 experts to Qwen3's 128 (many small groups).

A measured model keeps its own const and tokens_coef; only its adapter term is rescaled to the target rank and
targets. A replica on several devices (tensor/expert parallel) divides the per-layer terms by the device count:
perfect scaling, no collective cost (optimistic). host_ms is kept.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from infinilora_jax.bench import model_shapes
from infinilora_jax.bench.calibration import StepTimeModel
from infinilora_jax.bench.model_shapes import ModelShape

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository


def _mean_layer(shape: ModelShape, f) -> float:
    return float(np.mean([f(layer) for layer in range(shape.num_layers)]))


def adapter_layer_bytes(shape: ModelShape, rank: int, targets, dtype_bytes: int = 2) -> float:
    return _mean_layer(shape, lambda i: dtype_bytes * sum(shape.adapter_layer_params(i, rank, targets).values()))


def measured_shape(model: StepTimeModel, root: str = ROOT) -> ModelShape:
    """The shape a measured model was measured on (its shape_config, relative to the repository)."""
    if not model.shape_config:
        raise ValueError(f"step-time model {model.name!r} names no shape_config")
    shape = model_shapes.load(os.path.join(root, model.shape_config))
    return dataclasses.replace(shape, name=model.name)


def derive(target: ModelShape, rank: int, targets, measured: dict[str, StepTimeModel], devices: int = 1,
           dtype_bytes: int = 2, root: str = ROOT) -> StepTimeModel:
    """A step-time model of `target` at full depth, LoRA rank `rank` on `targets`, a replica of `devices` devices,
    from measured models (each with its rank, targets and shape_config)."""
    if not measured:
        raise ValueError("no measured step-time models to derive from")
    byte_rates, flop_rates, per_byte, experts = [], [], [], []
    shapes = {name: measured_shape(model, root) for name, model in measured.items()}
    for name, model in measured.items():
        shape = shapes[name]
        byte_rates.append(adapter_layer_bytes(shape, model.rank, model.targets, dtype_bytes) / model.adapters_coef)
        flop_rates.append(2 * _mean_layer(shape, shape.active_layer_params) / model.tokens_coef)
        per_byte.append(model.const / (dtype_bytes * _mean_layer(shape, shape.layer_params)))
        experts.append(shape.num_experts)
    adapters_coef = adapter_layer_bytes(target, rank, targets, dtype_bytes) / float(np.mean(byte_rates))
    reference = measured.get(target.name)
    if reference is not None and shapes[target.name] == dataclasses.replace(target, name=reference.name):
        const, tokens_coef = reference.const, reference.tokens_coef
        how = f"measured {target.name} (const, tokens_coef); adapter term rescaled"
    else:
        order = np.argsort(experts)
        x = np.log(np.asarray(experts, np.float64)[order])
        y = np.asarray(per_byte)[order]
        const = float(np.interp(np.log(target.num_experts), x, y)) * dtype_bytes * _mean_layer(target,
                                                                                               target.layer_params)
        tokens_coef = 2 * _mean_layer(target, target.active_layer_params) / float(np.mean(flop_rates))
        how = f"derived from {sorted(measured)} (weight bytes, active parameters, adapter bytes)"
    host = float(np.mean([m.host_ms for m in measured.values()]))
    return StepTimeModel(f"{target.name}-r{rank}-x{devices}", target.num_layers, const / devices,
                         tokens_coef / devices, adapters_coef / devices, host, rank, tuple(targets), "", True,
                         {"method": how + f"; rank {rank}, targets {list(targets)}, {devices} device(s) per replica "
                                          "with perfect scaling",
                          "sources": sorted(measured)})
