"""Mesh builders and named layouts: coupled (pp x ep x tp) and disaggregated (role x dp x ep, see RoleLayout)."""

from meshes.axes import DP, EP, PP, ROLE, ROLE_AXES, TP, logical_spec
from meshes.layouts import (
    LAYOUTS,
    ROLE_LAYOUTS,
    MeshLayout,
    RoleLayout,
    make_mesh,
    make_role_mesh,
    resolve_layout,
    resolve_role_layout,
)

__all__ = ["DP", "EP", "PP", "ROLE", "ROLE_AXES", "TP", "LAYOUTS", "ROLE_LAYOUTS", "MeshLayout", "RoleLayout",
           "logical_spec", "make_mesh", "make_role_mesh", "resolve_layout", "resolve_role_layout"]
