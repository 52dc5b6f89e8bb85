"""Named device layouts for one model replica: how many pipeline stages, expert and tensor shards."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from infinilora_jax.errors import LayoutError
from meshes.axes import MODEL_AXES


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    name: str
    pp: int = 1
    ep: int = 1
    tp: int = 1

    @property
    def num_devices(self) -> int:
        return self.pp * self.ep * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pp, self.ep, self.tp)

    def check_fits(self, config) -> None:
        """Raise LayoutError naming the first model dimension this layout cannot split evenly."""
        checks = [
            ("num_layers", config.num_layers, self.pp, "pp"),
            ("num_heads", config.num_heads, self.tp, "tp"),
            ("num_kv_heads", config.num_kv_heads, self.tp, "tp"),
        ]
        if config.has_moe_layers:
            checks += [("num_experts", config.num_experts, self.ep, "ep"),
                       ("moe_intermediate_size", config.moe_intermediate_size, self.tp, "tp")]
        if config.has_dense_layers:
            checks.append(("dense_intermediate_size", config.dense_intermediate_size, self.tp, "tp"))
        for field, value, parts, axis in checks:
            if value % parts:
                raise LayoutError(f"layout {self.name!r}: {field}={value} is not divisible by {axis}={parts}")


LAYOUTS: dict[str, MeshLayout] = {
    layout.name: layout
    for layout in [
        MeshLayout("single"),
        MeshLayout("tp2", tp=2),
        MeshLayout("ep2", ep=2),
        MeshLayout("ep4", ep=4),
        MeshLayout("ep8", ep=8),
        MeshLayout("pp2", pp=2),
        MeshLayout("ep2_tp2", ep=2, tp=2),
        MeshLayout("pp2_ep2_tp2", pp=2, ep=2, tp=2),
        MeshLayout("pp2_ep4", pp=2, ep=4),
        MeshLayout("pp4_ep2", pp=4, ep=2),
    ]
}

_GENERIC = re.compile(r"^(?:(pp|ep|tp)(\d+))(?:_(pp|ep|tp)(\d+))*$")


def resolve_layout(layout: str | MeshLayout | None) -> MeshLayout:
    """A MeshLayout from a name in LAYOUTS, a generic 'ppX_epY_tpZ' string, or None (one device)."""
    if layout is None:
        return LAYOUTS["single"]
    if isinstance(layout, MeshLayout):
        return layout
    if layout in LAYOUTS:
        return LAYOUTS[layout]
    if _GENERIC.match(layout):
        sizes = {axis: int(n) for axis, n in re.findall(r"(pp|ep|tp)(\d+)", layout)}
        if all(n > 0 for n in sizes.values()):
            return MeshLayout(layout, **sizes)
    raise LayoutError(f"unknown mesh layout {layout!r}; named layouts: {sorted(LAYOUTS)}, "
                      "or spell one as e.g. 'pp2_ep2_tp2'")


def make_mesh(layout: MeshLayout, devices: list | None = None) -> Mesh:
    """A (pp, ep, tp) mesh over the first `layout.num_devices` devices (or the given ones)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < layout.num_devices:
        raise LayoutError(f"layout {layout.name!r} needs {layout.num_devices} devices, {len(devices)} available")
    grid = np.array(devices[: layout.num_devices]).reshape(layout.shape)
    return Mesh(grid, MODEL_AXES, axis_types=(AxisType.Auto,) * len(MODEL_AXES))
