"""The continuous-batching engine: tokens equal the reference under mixed adapters, chunked prefill, preemption
and adapter cycling; adapters in use are never evicted; steady streams do not recompile."""

import random

import jax
import numpy as np
import pytest
from conftest import adapter_dirs, model_dir, reference

from infinilora_jax import LLM, SamplingParams
from infinilora_jax.bench.compilations import CompileCounter
from infinilora_jax.engine.request import Status

MODEL = "qwen3-moe-fused"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _check_invariants(llm):
    """Every running request's adapter sits pinned in the slot the request computes with."""
    cache = llm.runner.adapters
    for req in llm.engine.scheduler.running:
        assert req.status is Status.RUNNING
        if req.adapter is not None:
            assert cache.slot_of.get(req.adapter) == req.adapter_slot, req
            assert cache.refcount[req.adapter] >= 1
        assert len(req.pages) * llm.engine.cache_config.page_size >= req.num_computed_tokens
    held = sum(len(r.pages) for r in llm.engine.scheduler.running)
    alloc = llm.engine.scheduler.allocator
    assert held + alloc.num_free == alloc.capacity
    assert sum(cache.refcount.values()) == sum(r.adapter is not None for r in llm.engine.scheduler.running)


@pytest.fixture(scope="module")
def tight_llm():
    """4 adapters for 2 device slots, an 8-token step budget (prompts of 6-17 tokens are prefilled in chunks)
    and a KV cache too small for all requests at once (preemption)."""
    return LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", max_adapters=2,
               max_host_adapters=2, max_num_batched_tokens=8, max_num_seqs=6, page_size=4, num_pages=17,
               progress=False)


def test_continuous_batching_matches_reference(tight_llm):
    llm, ref = tight_llm, reference(MODEL)
    variants = ["base", *adapter_dirs(MODEL)]
    jobs = [(i, v) for v in variants for i in range(3)]
    random.Random(0).shuffle(jobs)
    engine, done, ids = llm.engine, {}, {}
    pending = list(jobs)
    stats = llm.runner.adapters.stats
    before = (engine.scheduler.num_preemptions, stats.evictions, stats.disk_reads, stats.layerwise_loads)
    chunked = False
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # requests keep arriving while others run
            for i, v in pending[:2]:
                rid = engine.add_request(ref[f"prompt_{i}"].tolist(), GREEDY, None if v == "base" else v)
                ids[rid] = (i, v)
            pending = pending[2:]
        work_before = [(r, len(r.prompt_token_ids) - r.num_computed_tokens) for r in engine.scheduler.running]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        chunked |= any(0 < left < len(r.prompt_token_ids) for r, left in work_before)
        _check_invariants(llm)
        step += 1
    engine.pop_finished()
    for rid, (i, v) in ids.items():
        assert done[rid] == ref[f"greedy__{v}__{i}"].tolist(), (i, v)
    assert chunked, "no prompt was prefilled in more than one chunk"
    assert engine.scheduler.num_preemptions > before[0], "the KV cache never ran out: preemption untested"
    assert stats.evictions > before[1], "adapters never had to leave their slots"
    assert stats.disk_reads > before[2], "the host store never had to re-read an adapter"
    assert stats.layerwise_loads > before[3], "no adapter was carried into a step layer by layer"
    assert llm.engine.scheduler.allocator.num_free == llm.engine.scheduler.allocator.capacity


def test_in_use_adapters_are_never_evicted(tight_llm):
    """With both slots pinned by running requests, a third adapter's requests wait instead of evicting."""
    llm, ref = tight_llm, reference(MODEL)
    names = list(adapter_dirs(MODEL))
    engine = llm.engine
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a = engine.add_request(ref["prompt_1"].tolist(), long, names[0])
    b = engine.add_request(ref["prompt_1"].tolist(), long, names[1])
    c = engine.add_request(ref["prompt_1"].tolist(), GREEDY, names[2])
    engine.step()
    running = {r.request_id for r in engine.scheduler.running}
    assert {a, b} <= running and c not in running
    slots_before = dict(llm.runner.adapters.slot_of)
    while engine.requests[a].status is Status.RUNNING:
        engine.step()
        _check_invariants(llm)
        if engine.requests[c].status is Status.WAITING:
            assert llm.runner.adapters.slot_of[names[0]] == slots_before[names[0]]
            assert llm.runner.adapters.slot_of[names[1]] == slots_before[names[1]]
    while engine.has_unfinished():
        engine.step()
    outs = {r.request_id: r.output_token_ids for r in engine.pop_finished()}
    assert outs[c] == ref[f"greedy__{names[2]}__1"].tolist()


def test_abort_and_streaming(tight_llm):
    llm, ref = tight_llm, reference(MODEL)
    stream = llm.generate_stream([ref["prompt_0"].tolist()] * 2, GREEDY, adapter=[None, "attn-experts-r8"])
    seen: dict[str, list[int]] = {}
    for out in stream:
        seen.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert out.token_ids == seen[out.request_id]
        if len(seen) == 2 and all(len(v) >= 3 for v in seen.values()):
            break  # the consumer walks away: its requests must be aborted and their pages freed
    stream.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.scheduler.allocator.num_free == llm.engine.scheduler.allocator.capacity
    assert sum(llm.runner.adapters.refcount.values()) == 0
    want = ref["greedy__base__0"].tolist()
    assert list(seen.values())[0] == want[: len(list(seen.values())[0])]


def test_warmed_up_engine_never_compiles(monkeypatch):
    """warmup() compiles every program the shape policy allows (with and without a carried adapter load); then a
    stream of varied lengths, sampling settings and adapters (more than the device slots, so adapters are loaded
    layer-wise while requests run) compiles nothing. With run_programs (the GPU default: a program's first run
    does one-time setup) it also runs one step per shape on its padding batch, which leaves the KV cache and
    the adapter pool as they were: the greedy tokens afterwards are the reference's."""
    llm = LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", max_num_batched_tokens=16,
              max_num_seqs=8, max_model_len=64, page_size=8, max_adapters=2, progress=False)
    runs = []
    real_sample = llm.runner.sample
    monkeypatch.setattr(llm.runner, "sample",
                        lambda batch, *a, **kw: runs.append(batch) or real_sample(batch, *a, **kw))
    shapes = llm.engine.warmup(progress=False)
    assert shapes == len(llm.engine.program_shapes()) == 4  # N=16 x P in {4, 8} x {decode only, with prefill}
    assert runs == []  # CPU: nothing compiles at launch
    state = lambda: [np.asarray(x).copy() for x in jax.tree.leaves((llm.engine.kv, llm.runner.adapters.pool_state))]
    before = state()
    llm.engine.warmup(progress=False, run_programs=True)
    assert len(runs) == shapes
    assert len({tuple(np.shape(x) for x in jax.tree.leaves(b)) for b in runs}) == shapes  # one run per shape
    assert all(np.array_equal(a, b) for a, b in zip(before, state(), strict=True))
    ref = reference(MODEL)
    got = llm.generate([ref["prompt_0"].tolist()], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert got[0].token_ids == ref["greedy__base__0"].tolist()[:8]
    counter = CompileCounter()
    names = [None, *adapter_dirs(MODEL)]
    stats = llm.runner.adapters.stats
    loads_before = stats.layerwise_loads
    rng = random.Random(2)
    prompts, params, adapters = [], [], []
    for _ in range(60):
        prompts.append([rng.randrange(3, 500) for _ in range(rng.randint(1, 40))])
        params.append(SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 0.8]),
                                     top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1000), ignore_eos=True))
        adapters.append(rng.choice(names))
    out = llm.generate(prompts, params, adapter=adapters)
    assert [len(o.token_ids) for o in out] == [p.max_tokens for p in params]
    assert counter.count == 0, f"{counter.count} compilations after warmup"
    assert stats.layerwise_loads > loads_before


def test_seeded_sampling_is_batch_independent(tight_llm):
    """A seeded request samples the same tokens alone and in a busy, preempting batch."""
    llm, ref = tight_llm, reference(MODEL)
    hot = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=5, ignore_eos=True)
    prompt = ref["prompt_2"].tolist()
    alone = llm.generate([prompt], hot, adapter="attn-experts-r8")[0].token_ids
    others = [ref[f"prompt_{i}"].tolist() for i in (0, 1, 2, 0)]
    crowd = llm.generate([*others, prompt], [GREEDY] * 4 + [hot],
                         adapter=["attn-r4-rslora", None, "all-linear-r4", None, "attn-experts-r8"])
    assert crowd[-1].token_ids == alone
    assert llm.generate([prompt], hot, adapter="attn-experts-r8")[0].token_ids == alone


def test_token_slice_equals_slicing_all_token_ids():
    """The engine's per-step token lookup (no prompt + output concatenation) at every boundary."""
    from infinilora_jax.engine.request import Request

    req = Request("r", [10, 11, 12, 13], SamplingParams(), None, 0, output_token_ids=[20, 21, 22])
    for start in range(8):
        for n in range(0, 8 - start + 1):
            assert req.token_slice(start, n) == req.all_token_ids[start:start + n], (start, n)


def test_step_batch_packing_fast_path_equals_array_path():
    """build_step_batch writes decode rows (one token) with scalars and longer rows with arrays: a batch
    whose rows are all taken as one-token rows equals the same positions packed as multi-token rows."""
    import numpy as np

    from infinilora_jax.models.batch import RowSpec, build_step_batch

    page = 4
    decode = [RowSpec([7], 9, 2, [5, 3, 8], "last"), RowSpec([9], 0, 1, [6], "none"),
              RowSpec([4], 3, 3, [2, 1], "all")]
    prefill = [RowSpec([1, 7], 8, 2, [5, 3, 8], "last"), RowSpec([4, 4], 2, 3, [2, 1], "all")]
    b1, logits1 = build_step_batch(decode, page, 16)
    b2, logits2 = build_step_batch(prefill, page, 16)
    assert logits1 == [[0], [], [1]] and logits2 == [[0], [1, 2]]
    # the one-token rows' positions 9 and 3 are the last positions of the two-token rows
    assert b1.tokens[0] == 7 and b1.positions[0] == 9 and b1.adapter_slots[0] == 2
    assert b1.cache_slots[0] == 8 * page + 1 == b2.cache_slots[1]
    assert b1.cache_slots[2] == 2 * page + 3 == b2.cache_slots[3]
    assert b1.cache_slots[1] == 6 * page
    np.testing.assert_array_equal(b1.logits_indices[:2], [0, 2])
    np.testing.assert_array_equal(b1.decode.block_tables[:3, :3], [[5, 3, 8], [6, 0, 0], [2, 0, 0]])


def test_step_batch_bounds_its_sequences_by_its_decode_rows():
    """StepBatch.max_sequences (the decode block's rows) bounds the token runs the GPU LoRA kernels take in place
    (one run per sequence): a batch with more sequences than its policy's rows is refused, not built."""
    import pytest

    from infinilora_jax.models.batch import RowSpec, ShapePolicy, build_step_batch

    policy = ShapePolicy(page_size=4, num_pages=16, max_rows=2, max_prefill_rows=3, max_pages=4, max_tokens=16)
    rows = [RowSpec([1, 2], 0, 1, [1]), RowSpec([3, 4], 0, 2, [2]), RowSpec([5], 2, 1, [3])]
    batch, _ = build_step_batch(rows[:2], 4, 16, policy)
    assert batch.max_sequences == 2
    with pytest.raises(ValueError, match="3 rows exceed the 2 sequences"):
        build_step_batch(rows, 4, 16, policy)
