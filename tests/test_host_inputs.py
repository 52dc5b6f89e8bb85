"""A step's numpy inputs cross to the device as one packed buffer (models/host_inputs.py, models/precompiled.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinilora_jax import LLM, SamplingParams
from infinilora_jax.errors import ConfigError
from infinilora_jax.models import host_inputs
from infinilora_jax.models.precompiled import PrecompiledSteps


def test_pack_unpack_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((3, 5)).astype(np.float32)
    floats[0, :3] = [np.nan, np.inf, -0.0]
    leaves = [rng.integers(-2**31, 2**31 - 1, (4, 2), dtype=np.int32), floats,
              rng.integers(0, 2**32 - 1, 7, dtype=np.uint64).astype(np.uint32), rng.random(6) > 0.5,
              np.int32(-9), np.zeros((0, 3), np.int32), np.array(True)]
    assert all(map(host_inputs.packable, leaves))
    layout = host_inputs.layout_of(leaves)
    words = host_inputs.pack(leaves)
    assert words.dtype == np.int32 and words.shape == (sum(np.size(a) for a in leaves),)
    out = jax.jit(lambda w: host_inputs.unpack(w, layout))(words)
    for got, want in zip(out, leaves):
        got = np.asarray(got)
        assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
        assert got.tobytes() == np.asarray(want).tobytes()  # NaN, inf and -0.0 bit for bit


def test_only_exact_host_arrays_are_packable():
    assert not host_inputs.packable(np.zeros(3, np.int64))
    assert not host_inputs.packable(np.zeros(3, np.float16))
    assert not host_inputs.packable(jnp.zeros(3, jnp.int32))  # already on a device
    assert not host_inputs.packable(3)


class _Steps(PrecompiledSteps):
    """A step of the engine's signature (state, state, batch, kv, extra), kv donated."""

    def __init__(self, pack: bool):
        super().__init__(pack_host_inputs=pack)

        def step(weights, pool, batch, kv, extra):  # a new function per instance: jit caches are per function
            tokens, scale, mask = batch
            out = jnp.where(mask, weights[tokens] * scale, 0.0) + extra["bias"]
            return out.sum(), kv + 1.0

        self.jit_step("step", step, (3,))


def _args():
    batch = (np.array([0, 2, 1], np.int32), np.array([0.5, -2.0, 4.0], np.float32), np.array([True, False, True]))
    return jnp.arange(4, dtype=jnp.float32), None, batch, jnp.zeros(8), {"bias": np.float32(1.5)}


@pytest.mark.parametrize("precompile", [False, True])
def test_packed_step_matches_separate_and_keeps_donation(precompile):
    results = {}
    for pack in (True, False):
        steps = _Steps(pack)
        if precompile:
            steps.precompile([("step", _args())], workers=1)
            assert len(steps._compiled) == 1
        args = _args()
        fn, call_args, key = steps._callable("step", args)
        packing = key[-1]  # the executable key ends with the packing (None: not packed)
        if pack:  # one int32 buffer for the 4 numpy leaves, the two states (weights, None), then kv
            assert isinstance(call_args[0], np.ndarray) and call_args[0].dtype == np.int32 and len(call_args) == 4
            assert call_args[1] is args[0] and call_args[2] is None and call_args[3] is args[3] and packing
        else:
            assert call_args is args and packing is None
        kv = args[3]
        total, new_kv = steps.run("step", *args)
        assert kv.is_deleted()  # the kv argument is still donated
        results[pack] = (float(total), np.asarray(new_kv))
        # with precompile, run used the executable made ahead of time: the jitted function never traced
        assert fn._cache_size() == (0 if precompile else 1)
    assert results[True][0] == results[False][0] == pytest.approx(0.5 * 0 + 4.0 * 1 + 3 * 1.5)
    np.testing.assert_array_equal(results[True][1], results[False][1])


def test_a_donated_state_stays_donated():
    """sample_loading donates its second argument (the pool it writes pages into) as well as the kv."""
    steps = PrecompiledSteps(pack_host_inputs=True)
    steps.jit_step("load", lambda weights, pool, batch, kv, slot: (pool.at[slot].set(batch[0].sum()), kv + 1),
                   (1, 3))
    pool, kv = jnp.zeros(4), jnp.zeros(2)
    new_pool, _ = steps.run("load", jnp.ones(3), pool, (np.arange(3, dtype=np.int32),), kv, np.int32(2))
    assert pool.is_deleted() and kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(new_pool), [0, 0, 3, 0])


def test_bad_environment_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("INFINILORA_HOST_INPUTS", "sometimes")
    with pytest.raises(ConfigError, match="INFINILORA_HOST_INPUTS"):
        _Steps(None)


def test_engine_outputs_are_identical_packed_or_separate(monkeypatch):
    """Greedy and seeded sampling with logprobs, through adapters and without, in the coupled engine."""
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, top_k=20, seed=7, logprobs=2,
                             ignore_eos=True)]
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    outputs = {}
    for mode in ("packed", "separate"):
        monkeypatch.setenv("INFINILORA_HOST_INPUTS", mode)
        llm = LLM(None, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                  progress=False)
        assert llm.runner.steps.pack_host_inputs is (mode == "packed")
        outputs[mode] = [(r.token_ids, r.finish_reason) for r in llm.generate(prompts, params)]
        if mode == "packed":
            assert llm.runner.steps._packed, "the engine's steps went through the packed wrapper"
    assert outputs["packed"] == outputs["separate"]
