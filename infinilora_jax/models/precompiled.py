"""Steps called by name through ahead-of-time compiled executables (shared by the coupled and disaggregated steps).

A step's shapes follow from its batch (models/batch.py ShapePolicy), so the executable for a call is keyed by the
step's name and the shapes of its batch, the third argument of every step. `precompile` traces the calls one
after another and compiles them in threads (XLA compiles outside the GIL); `run` uses the executable when there is
one and the jitted function otherwise (compiling on first use).
"""

from __future__ import annotations

import concurrent.futures

import jax


def _shape_key(name: str, batch) -> tuple:
    return (name, *(tuple(x.shape) for x in jax.tree.leaves(batch)))


class PrecompiledSteps:
    def __init__(self):
        self._compiled: dict[tuple, jax.stages.Compiled] = {}  # (step name, batch shapes) -> executable

    def run(self, name: str, *args):
        """Call step `name` with (state, state, batch, ...): through the executable `precompile` made for this
        batch's shapes if there is one, else through jit."""
        executable = self._compiled.get(_shape_key(name, args[2]))
        return (executable or getattr(self, name))(*args)

    def precompile(self, calls: list[tuple[str, tuple]], workers: int = 8, on_done=None) -> None:
        """Compile the steps for these (name, args) calls ahead of time, `workers` at once. Nothing runs on the
        device."""
        lowered = {}
        for name, args in calls:
            key = _shape_key(name, args[2])
            if key not in self._compiled and key not in lowered:
                lowered[key] = getattr(self, name).lower(*args)
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(low.compile): key for key, low in lowered.items()}
            for future in concurrent.futures.as_completed(futures):
                self._compiled[futures[future]] = future.result()
                if on_done is not None:
                    on_done()
