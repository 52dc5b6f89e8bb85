"""Steps called by name through ahead-of-time compiled executables (shared by the coupled and disaggregated steps).

A step's shapes follow from its batch (models/batch.py ShapePolicy), so the executable for a call is keyed by the
step's name and the shapes of its batch, the third argument of every step. `precompile` traces the calls one
after another and compiles them in threads (XLA compiles outside the GIL); `run` uses the executable when there is
one and the jitted function otherwise (compiling on first use).

A call's numpy arguments (the batch, the sampling rows, a load's slot) cross to the device packed into one
buffer (models/host_inputs.py) that the program slices apart: one transfer per step instead of one per array.
INFINILORA_HOST_INPUTS=separate passes them one by one as before (for comparison).
"""

from __future__ import annotations

import concurrent.futures

import jax

from infinilora_jax.models import host_inputs
from infinilora_jax.trace_choice import env_choice

ENV_VAR = "INFINILORA_HOST_INPUTS"
MODES = ("packed", "separate")


def pack_host_inputs_default() -> bool:
    return env_choice(ENV_VAR, MODES, "packed") == "packed"


class PrecompiledSteps:
    def __init__(self, pack_host_inputs: bool | None = None):
        self._compiled: dict[tuple, jax.stages.Compiled] = {}  # (step name, batch shapes, packing) -> executable
        self._donated: dict[str, tuple[int, ...]] = {}  # step name -> its donated argument positions
        self._packed: dict[tuple, tuple] = {}  # (name, structure, host leaves) -> (jitted wrapper, other leaves)
        self.pack_host_inputs = pack_host_inputs_default() if pack_host_inputs is None else pack_host_inputs

    def jit_step(self, name: str, fn, donate_argnums: tuple[int, ...] = ()):
        """Define step `name` (an attribute of that name): jit(fn), donating those arguments."""
        self._donated[name] = tuple(donate_argnums)
        setattr(self, name, jax.jit(fn, donate_argnums=donate_argnums))

    def run(self, name: str, *args):
        """Call step `name` with (state, state, batch, ...): through the executable `precompile` made for this
        batch's shapes if there is one, else through jit."""
        fn, call_args, key = self._callable(name, args)
        executable = self._compiled.get(key)
        return (executable or fn)(*call_args)

    def precompile(self, calls: list[tuple[str, tuple]], workers: int = 8, on_done=None) -> None:
        """Compile the steps for these (name, args) calls ahead of time, `workers` at once. Nothing runs on the
        device."""
        lowered = {}
        for name, args in calls:
            fn, call_args, key = self._callable(name, args)
            if key not in self._compiled and key not in lowered:
                lowered[key] = fn.lower(*call_args)
        self._compile_all(lowered, self._compiled, workers, on_done)

    @staticmethod
    def _compile_all(lowered: dict, into: dict, workers: int, on_done=None) -> None:
        """Compile each lowered program (`workers` at once) into `into` under its key."""
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(low.compile): key for key, low in lowered.items()}
            for future in concurrent.futures.as_completed(futures):
                into[futures[future]] = future.result()
                if on_done is not None:
                    on_done()

    def _callable(self, name: str, args: tuple):
        """(jitted function, its arguments, executable key) for step `name` on `args`: with several numpy leaves
        and packing on, a wrapper taking them as one int32 buffer, then the two states (args 0 and 1, device
        arrays, passed through whole), then the other leaves; else the step itself on `args`. The key: the name,
        the batch's (args[2]) shapes and the packing (the host leaves' places and shapes, or None). Run every
        step, so it stays cheap: the layout is built once per key."""
        batch = jax.tree.flatten(args[2])
        shapes = (name, *(tuple(x.shape) for x in batch[0]))
        if not self.pack_host_inputs:
            return getattr(self, name), args, (*shapes, None)
        per_arg = [batch, *(jax.tree.flatten(a) for a in args[3:])]
        flat = [leaf for leaves, _ in per_arg for leaf in leaves]
        host = tuple(i for i, leaf in enumerate(flat) if host_inputs.packable(leaf))
        if len(host) < 2:
            return getattr(self, name), args, (*shapes, None)
        packing = (host, tuple((flat[i].shape, flat[i].dtype) for i in host))
        key = (name, tuple(t for _, t in per_arg), packing)
        if key not in self._packed:
            layout = host_inputs.layout_of(flat[i] for i in host)
            self._packed[key] = (self._packed_step(name, key[1], host, layout),
                                 [i for i in range(len(flat)) if i not in set(host)])
        fn, others = self._packed[key]
        return (fn, (host_inputs.pack([flat[i] for i in host]), *args[:2], *(flat[i] for i in others)),
                (*shapes, packing))

    def _packed_step(self, name: str, treedefs: tuple, host: tuple[int, ...], layout):
        """jit(words, state, state, *other leaves) -> step `name`'s outputs (treedefs: of its arguments from the
        third on), donating what the step donates."""
        step = getattr(self, name)
        arg_of = [2 + a for a, t in enumerate(treedefs) for _ in range(t.num_leaves)]
        others = [i for i in range(len(arg_of)) if i not in set(host)]

        def call(words, state0, state1, *other_leaves):
            flat = [None] * len(arg_of)
            for i, leaf in zip(host, host_inputs.unpack(words, layout)):
                flat[i] = leaf
            for i, leaf in zip(others, other_leaves):
                flat[i] = leaf
            args, start = [state0, state1], 0
            for t in treedefs:
                args.append(jax.tree.unflatten(t, flat[start: start + t.num_leaves]))
                start += t.num_leaves
            return step(*args)

        call.__name__ = f"_{name}"  # the program keeps the step's name (jit__sample) in profiles
        donated = self._donated.get(name, ())
        return jax.jit(call, donate_argnums=(*(1 + a for a in donated if a < 2),
                                             *(3 + k for k, i in enumerate(others) if arg_of[i] in donated)))
