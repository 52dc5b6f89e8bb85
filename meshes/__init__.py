"""Mesh builders and named layouts (coupled today; disaggregated role x pp x ep later)."""

from meshes.axes import EP, PP, TP, logical_spec
from meshes.layouts import LAYOUTS, MeshLayout, make_mesh, resolve_layout

__all__ = ["EP", "PP", "TP", "LAYOUTS", "MeshLayout", "logical_spec", "make_mesh", "resolve_layout"]
