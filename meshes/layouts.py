"""Named device layouts: one model replica (coupled mode: pp x ep x tp) or a global mesh with a role axis
(disaggregated mode: base instances beside a LoRA server, see RoleLayout)."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from infinilora_jax.errors import LayoutError
from meshes.axes import MODEL_AXES, ROLE_AXES


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


@dataclasses.dataclass(frozen=True)
class RoleLayout:
    """A disaggregated deployment: `dp` base instances of `ep` devices each, and a LoRA server of as many
    devices, split into `dp` pipeline stages of `ep` devices.

    The global mesh is (role=2, dp, pp=1, ep, tp=1) (meshes/axes.py ROLE_AXES). Role 0 devices are base
    instances: instance d is the (pp, ep, tp) = (1, ep, 1) replica at dp=d, holding base weights and its KV cache.
    Role 1 devices are the LoRA server: the device at (dp=s, ep=e) holds the adapter pages of the layers of
    LoRA pipeline stage s for expert shard e (attention, router and dense-MLP pages are replicated over ep). So
    the `dp` coordinate means "instance" on the base role and "stage" on the LoRA role, and base device (d, e)
    exchanges with LoRA device (stage of the layer, e): both roles split experts the same way.

    Equal device counts per role are what one rectangular SPMD mesh gives; with base pp = tp = 1 they make
    the LoRA server's pipeline depth equal to the number of base instances.
    """

    name: str
    dp: int = 1  # base instances (= LoRA-server pipeline stages)
    ep: int = 1  # expert shards per base instance (= per LoRA stage)

    @property
    def num_devices(self) -> int:
        return 2 * self.dp * self.ep

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.dp, 1, self.ep, 1)

    @property
    def lora_pp(self) -> int:
        return self.dp

    @property
    def base(self) -> MeshLayout:
        """The layout of one base instance (a coupled-mode replica without adapters)."""
        return MeshLayout(f"ep{self.ep}" if self.ep > 1 else "single", ep=self.ep)

    def describe(self) -> str:
        return (f"{self.name}: base {self.dp} instance(s) x ep{self.ep} | LoRA server pp{self.lora_pp} x "
                f"ep{self.ep} ({self.num_devices} devices)")

    def check_fits(self, config) -> None:
        self.base.check_fits(config)
        if config.num_layers % self.lora_pp:
            raise LayoutError(f"layout {self.name!r}: num_layers={config.num_layers} is not divisible by the LoRA "
                              f"server's pp={self.lora_pp}")


ROLE_LAYOUTS: dict[str, RoleLayout] = {
    layout.name: layout
    for layout in [
        RoleLayout("1+1"),  # one base device, one LoRA device (the 2-GPU machine)
        RoleLayout("2+2", ep=2),  # base ep2 | LoRA ep2
        RoleLayout("2+2_dp2", dp=2),  # two single-device base instances | LoRA pp2
        RoleLayout("4+4", dp=2, ep=2),  # base dp2 x ep2 | LoRA pp2 x ep2
        RoleLayout("8+8", dp=2, ep=4),  # base dp2 x ep4 | LoRA pp2 x ep4
    ]
}

_GENERIC_ROLE = re.compile(r"^role_dp(\d+)_ep(\d+)$")


def resolve_role_layout(layout: str | RoleLayout | None) -> RoleLayout:
    """A RoleLayout from a name in ROLE_LAYOUTS, a generic 'role_dpD_epE' string, or None ("1+1")."""
    if layout is None:
        return ROLE_LAYOUTS["1+1"]
    if isinstance(layout, RoleLayout):
        return layout
    if layout in ROLE_LAYOUTS:
        return ROLE_LAYOUTS[layout]
    match = _GENERIC_ROLE.match(layout)
    if match and all(int(n) > 0 for n in match.groups()):
        return RoleLayout(layout, dp=int(match[1]), ep=int(match[2]))
    raise LayoutError(f"unknown disaggregated layout {layout!r}; named layouts: {sorted(ROLE_LAYOUTS)}, "
                      "or spell one as e.g. 'role_dp2_ep2'")


def make_role_mesh(layout: RoleLayout, devices: list | None = None) -> Mesh:
    """The global (role, dp, pp, ep, tp) mesh over the first `layout.num_devices` devices (or the given ones):
    the first half are base devices, the second half the LoRA server's."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < layout.num_devices:
        raise LayoutError(f"layout {layout.name!r} needs {layout.num_devices} devices, {len(devices)} available")
    grid = np.array(devices[: layout.num_devices]).reshape(layout.shape)
    return Mesh(grid, ROLE_AXES, axis_types=(AxisType.Auto,) * len(ROLE_AXES))
