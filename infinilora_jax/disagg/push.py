"""A device-initiated push for the disaggregated exchange: a Pallas kernel in which the sending device writes
its array straight into the receiving device's output buffer and signals it, instead of an XLA collective.

`push(x, pairs, axis_names)` has the semantics of `jax.lax.ppermute(x, axis_names, perm=pairs)` for one array,
called inside a shard_map: device with linear index `s` over `axis_names` (row-major, as ppermute numbers them)
sends its `x` to device `d` for each `(s, d)` in `pairs`, the coordinates along every other mesh axis staying
the same; a device that receives nothing gets zeros.

Kernels:
- TPU (`_push_tpu`): `pltpu.make_async_remote_copy` from the sender's input to the receiver's output (HBM to
  HBM), started on the sender, completed by `wait_send` there and `wait_recv` on the receiver. Before the copy
  the receiver signals the sender's barrier semaphore ("my output buffer is live"), and the sender waits on it.
  Runs on CPU in the Pallas TPU interpreter (`interpret=pltpu.InterpretParams()`), which simulates the remote
  DMA and semaphores between the fake CPU devices: that is how the tests check it.
- GPU (`_push_gpu`): Mosaic GPU. Same handshake (the receiver signals the sender's `ready` semaphore); the
  sender then stages its input through SMEM in tiles (TMA boxes of <= 256 elements per dimension; an array whose
  rows are not 16-byte multiples is copied flat, padded) and TMA-stores each into `plgpu.remote_ref(out,
  device)` (the peer's symmetric-memory output buffer), then `pl.semaphore_signal`s the receiver's `done`
  semaphore, which the receiver `pl.semaphore_wait`s on. Lowers for CUDA on CPU (tests); running it needs GPUs
  with peer (symmetric) memory, and jax's Mosaic GPU interpreter does not simulate peer refs.

Which implementation the exchange uses is chosen by `exchange_impl()`: the `INFINILORA_EXCHANGE` environment
variable or the `exchange_impl_override` context manager, read at trace time. "ppermute" (default) is XLA's
collective-permute, the portable path and the reference; "push" the kernel of `jax.default_backend()`;
"push_interpret" the TPU kernel in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from infinilora_jax.trace_choice import TraceTimeChoice

IMPLS = ("ppermute", "push", "push_interpret")
ENV_VAR = "INFINILORA_EXCHANGE"
CHOICE = TraceTimeChoice("exchange implementation", ENV_VAR, IMPLS, "ppermute", "exchange_impl_override")
_GPU_TILE_BYTES = 32 * 1024  # SMEM staging tile of the GPU push
_TMA_MAX_BOX = 256  # elements per dimension of one TMA copy


def exchange_impl() -> str:
    """The implementation the exchange uses now: the innermost `exchange_impl_override`, else $INFINILORA_EXCHANGE,
    else "ppermute"."""
    return CHOICE.selected()


def exchange_impl_override(name: str):
    """Use implementation `name` for exchanges traced inside this block (already-compiled steps keep theirs)."""
    return CHOICE.use(name)


def _axes(axis_names) -> tuple:
    return (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)


def _coords(linear: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """Row-major coordinates of a linear index over axes of these sizes (ppermute's numbering)."""
    out = []
    for s in reversed(sizes):
        out.append(linear % s)
        linear //= s
    return tuple(reversed(out))


def _linear_index(axes: tuple) -> jax.Array:
    idx = jnp.int32(0)
    for a in axes:
        idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
    return idx


def _check_pairs(pairs, n: int) -> list[tuple[int, int]]:
    pairs = [(int(s), int(d)) for s, d in pairs]
    srcs, dsts = [s for s, _ in pairs], [d for _, d in pairs]
    if len(set(srcs)) != len(srcs) or len(set(dsts)) != len(dsts):
        raise ValueError(f"push pairs must have distinct sources and distinct destinations, got {pairs}")
    if any(not 0 <= i < n for i in srcs + dsts):
        raise ValueError(f"push pairs {pairs} out of range for {n} devices")
    return pairs


def _receives_mask(pairs, axes) -> jax.Array:
    """True on the devices that some pair sends to (static table indexed by this device's linear index)."""
    n = math.prod(jax.lax.axis_size(a) for a in axes)
    table = [False] * n
    for _, d in pairs:
        table[d] = True
    return jnp.asarray(table)[_linear_index(axes)]


def _push_tpu(x, pairs, axes, interpret):
    """`interpret`: False, or the `pltpu.InterpretParams` to run the kernel with."""
    sizes = [jax.lax.axis_size(a) for a in axes]

    def kernel(x_ref, o_ref, send_sem, recv_sem):
        me = _linear_index(axes)
        barrier = pltpu.get_barrier_semaphore()
        for s, d in pairs:
            dst = dict(zip(axes, _coords(d, sizes)))
            src = dict(zip(axes, _coords(s, sizes)))
            copy = pltpu.make_async_remote_copy(x_ref, o_ref, send_sem, recv_sem, device_id=dst,
                                                device_id_type=pl.DeviceIdType.MESH)

            @pl.when(me == d)
            def _ready():  # tell the sender this device's output buffer is live
                pl.semaphore_signal(barrier, 1, device_id=src, device_id_type=pl.DeviceIdType.MESH)

            @pl.when(me == s)
            def _send():
                pl.semaphore_wait(barrier, 1)
                copy.start()
                copy.wait_send()

            @pl.when(me == d)
            def _recv():
                copy.wait_recv()

    any_space = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[any_space],
        out_specs=any_space,
        scratch_shapes=[pltpu.SemaphoreType.DMA, pltpu.SemaphoreType.DMA],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret,
    )(x)


def _push_gpu(x, pairs, axes):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.gpu import install_kernel_caches

    install_kernel_caches()  # one lowering and one compile per distinct kernel across step programs

    sizes = [jax.lax.axis_size(a) for a in axes]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)
    size, padded = x.size, x2.shape[1] * x.dtype.itemsize % 16 != 0
    if padded:  # TMA needs 16-byte row strides: copy the flat array, padded, in rows of 64 elements
        x2 = jnp.pad(x.reshape(-1), (0, -size % 64)).reshape(-1, 64)
    rows, cols = x2.shape
    # SMEM tiles of (tile, ctile): a TMA copy moves at most 256 elements along each dimension
    ctile = math.gcd(cols, _TMA_MAX_BOX)
    tile = math.gcd(rows, min(_TMA_MAX_BOX, max(1, _GPU_TILE_BYTES // (ctile * x.dtype.itemsize) // 8 * 8)))

    def kernel(x_ref, o_ref, ready, done):
        me = _linear_index(axes)
        for s, d in pairs:
            dst = dict(zip(axes, _coords(d, sizes)))
            src = dict(zip(axes, _coords(s, sizes)))

            @pl.when(me == d)
            def _ready(src=src):  # tell the sender this device's output buffer is live
                pl.semaphore_signal(ready, 1, device_id=src, device_id_type=pl.DeviceIdType.MESH)

            @pl.when(me == s)
            def _send(dst=dst):
                pl.semaphore_wait(ready, 1)
                peer = plgpu.remote_ref(o_ref, dst, device_id_type=pl.DeviceIdType.MESH)  # peer's output buffer

                @functools.partial(pl.run_scoped, smem=plgpu.SMEM((tile, ctile), x.dtype),
                                   bar=plgpu.Barrier(num_arrivals=1))
                def _copy(smem, bar):
                    @pl.loop(0, rows // tile)
                    def _row_tile(i):
                        @pl.loop(0, cols // ctile)
                        def _col_tile(j):
                            box = (pl.ds(i * tile, tile), pl.ds(j * ctile, ctile))
                            plgpu.copy_gmem_to_smem(x_ref.at[box], smem, bar)
                            plgpu.barrier_wait(bar)
                            plgpu.copy_smem_to_gmem(smem, peer.at[box])  # TMA store into the peer's memory
                            plgpu.wait_smem_to_gmem(0)

                pl.semaphore_signal(done, 1, device_id=dst, device_id_type=pl.DeviceIdType.MESH)

            @pl.when(me == d)
            def _recv():
                pl.semaphore_wait(done, 1)

    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(x2.shape, x.dtype),
        scratch_types=[plgpu.SemaphoreType.REGULAR, plgpu.SemaphoreType.REGULAR],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(x2)
    return (out.reshape(-1)[:size] if padded else out).reshape(shape)


def push(x, pairs, axis_names, *, kernel: str | None = None, interpret_params=None):
    """`jax.lax.ppermute(x, axis_names, perm=pairs)` for one array, as a device-initiated push (see module doc).
    `kernel`: "tpu", "gpu" or "tpu_interpret"; default: the platform of the default backend.
    `interpret_params`: the `pltpu.InterpretParams` for "tpu_interpret" (default: jax's defaults)."""
    axes = _axes(axis_names)
    pairs = _check_pairs(pairs, math.prod(jax.lax.axis_size(a) for a in axes))
    if kernel is None:
        kernel = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}.get(jax.default_backend())
        if kernel is None:
            raise ValueError(f"push has no kernel for backend {jax.default_backend()!r}; use "
                             f"{ENV_VAR}=ppermute, or push_interpret to run the TPU kernel in the interpreter")
    if not pairs:
        return jnp.zeros_like(x)
    if kernel == "gpu":
        out = _push_gpu(x, pairs, axes)
    elif kernel in ("tpu", "tpu_interpret"):
        params = (interpret_params or pltpu.InterpretParams()) if kernel == "tpu_interpret" else False
        out = _push_tpu(x, pairs, axes, interpret=params)
    else:
        raise ValueError(f"unknown push kernel {kernel!r}")
    return jnp.where(_receives_mask(pairs, axes), out, jnp.zeros_like(out))


def permute(x, axis_names, pairs, impl: str | None = None):
    """One array over `axis_names` with the selected implementation (see `exchange_impl`)."""
    impl = CHOICE.selected(impl)
    if impl == "ppermute":
        return jax.lax.ppermute(x, axis_names, perm=pairs)
    return push(x, pairs, axis_names, kernel="tpu_interpret" if impl == "push_interpret" else None)


__all__ = ["ENV_VAR", "IMPLS", "exchange_impl", "exchange_impl_override", "permute", "push"]
