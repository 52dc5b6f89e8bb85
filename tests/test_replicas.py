"""Coupled data parallelism (engine/replicas.py): N independent replicas, each with its own devices, KV cache,
scheduler and adapter cache. Greedy tokens equal the HF references on every replica, requests are routed by
adapter residency and load, adapters are registered on every replica, abort and the replay hooks see all
replicas, and the OpenAI server runs on a replica group."""

import threading

import pytest
from conftest import adapter_dirs, model_dir, reference, variant_adapter, variants

from infinilora_jax import LLM, SamplingParams
from infinilora_jax.bench import metrics, replay
from infinilora_jax.bench.workload import WorkloadRequest
from infinilora_jax.engine.engine import LLMEngine
from infinilora_jax.engine.replicas import ReplicaGroup, split_devices
from infinilora_jax.errors import ConfigError, RequestError

MODEL = "qwen3-moe-fused"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
VARIANTS = variants(MODEL)


@pytest.fixture(scope="module")
def llm2():
    """Two single-device replicas (devices 0 and 1)."""
    return LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", replicas=2, max_num_seqs=16,
               max_model_len=128, progress=False)


def _greedy_all_pairs(llm):
    """Every (prompt, adapter) pair in one generate call; returns {request id: (prompt index, variant)} and the
    replica of each request."""
    ref = reference(MODEL)
    rows = [(i, v) for i in range(3) for v in VARIANTS]
    ids = llm._submit([ref[f"prompt_{i}"].tolist() for i, _ in rows], GREEDY, [variant_adapter(v) for _, v in rows])
    replica = {rid: llm.engine.instance_of(rid) for rid in ids}
    outs = {}
    for out in llm._run(ids):
        if out.finished:
            outs[out.request_id] = out.token_ids
    for rid, (i, v) in zip(ids, rows):
        assert outs[rid] == ref[f"greedy__{v}__{i}"].tolist(), (i, v, replica[rid])
    return dict(zip(ids, rows)), replica


def test_greedy_equals_hf_on_two_replicas(llm2):
    group = llm2.engine
    assert isinstance(group, ReplicaGroup) and group.num_replicas == 2
    devices = [set(r.mesh.devices.flat) for r in group.runners]
    assert all(len(d) == 1 for d in devices) and not devices[0] & devices[1]
    rows, replica = _greedy_all_pairs(llm2)
    assert set(replica.values()) == {0, 1}, "both replicas should have served requests"
    assert len(set(rows)) == len(rows), "request ids must be unique over the replicas"
    # Each replica's adapter cache holds only adapters its own requests used.
    for r, cache in enumerate(llm2.runner.adapters.caches):
        used = {variant_adapter(rows[rid][1]) for rid, rep in replica.items() if rep == r} - {None}
        assert set(cache.slot_of) == used, (r, set(cache.slot_of), used)  # 4 slots per replica: no eviction
    total = llm2.runner.adapters.stats
    assert total.misses == sum(c.stats.misses for c in llm2.runner.adapters.caches)
    assert not group.has_unfinished() and not group.requests


def test_greedy_equals_hf_on_two_ep2_replicas():
    llm = LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", mesh="ep2", replicas=2,
              max_num_seqs=16, max_model_len=128, progress=False)
    groups = [[d.id for d in r.mesh.devices.flat] for r in llm.engine.runners]
    assert groups == [[0, 1], [2, 3]]
    _, replica = _greedy_all_pairs(llm)
    assert set(replica.values()) == {0, 1}


def test_default_is_one_engine_and_bad_configs_are_refused():
    llm = LLM(model_dir(MODEL), dtype="float32", max_model_len=64, progress=False)
    assert type(llm.engine) is LLMEngine and llm.replicas == 1
    with pytest.raises(ConfigError, match="need 12 devices"):
        LLM(model_dir(MODEL), dtype="float32", mesh="ep4", replicas=3, progress=False)
    with pytest.raises(ConfigError, match="coupled mode"):
        LLM(model_dir(MODEL), dtype="float32", mesh="1+1", mode="disaggregated", replicas=2, progress=False)
    with pytest.raises(ConfigError):
        LLM(model_dir(MODEL), dtype="float32", replicas=0, progress=False)
    assert split_devices(list(range(8)), 2, 2) == [[0, 1], [2, 3]]


def test_routing_prefers_residency_within_the_slack(llm2):
    group, registry = llm2.engine, llm2.runner.adapters
    a, b = "attn-experts-r8", "all-linear-r4"
    # Make `a` resident on replica 1 only and `b` on none: forget both everywhere, register them again, load `a`
    # into replica 1.
    for name in (a, b):
        llm2.unload_adapter(name)
        llm2.load_adapter(name, adapter_dirs(MODEL)[name])
    assert registry.resident_on(a) == registry.resident_on(b) == []
    caches = registry.caches
    assert caches[0].host[a] is caches[1].host[a], "one converted copy in host memory for every replica"
    assert caches[1].acquire(a) is not None
    caches[1].release(a)
    assert registry.resident_on(a) == [1]
    prompt = reference(MODEL)["prompt_0"].tolist()
    ids = []

    def add(adapter, want):
        ids.append(group.add_request(prompt, GREEDY, adapter))
        assert group.instance_of(ids[-1]) == want, (adapter, want, [group.load(r) for r in (0, 1)])

    try:
        add(None, 0)  # no adapter, both idle: the lowest index
        add(None, 1)  # replica 0 is busier now
        add(a, 1)  # resident on 1, loads equal: 1
        add(a, 1)  # 1 is busier, but within the slack: still 1
        add(b, 0)  # b has no affinity anywhere: the least loaded
        add(None, 0)  # equal loads: the lowest index
        add(None, 0)
        assert group.load(0) > group.load(1)
        add(b, 0)  # b has a queued request on replica 0: affinity, although 0 is busier
        group.affinity_slack = 0  # affinity only at equal load
        add(b, 1)
        with pytest.raises(RequestError, match="duplicate"):
            group.add_request(prompt, GREEDY, request_id=ids[1])  # an id of replica 1, added again
    finally:
        group.affinity_slack = group.config.max_num_batched_tokens
        for rid in ids:
            group.abort(rid)
        group.pop_finished()
    assert not group.has_unfinished()


def test_abort_across_replicas(llm2):
    group, ref = llm2.engine, reference(MODEL)
    long = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ids = [group.add_request(ref[f"prompt_{i % 3}"].tolist(), long, None) for i in range(4)]
    assert {group.instance_of(rid) for rid in ids} == {0, 1}
    group.step()
    victims = [next(rid for rid in ids if group.instance_of(rid) == r) for r in (0, 1)]
    for rid in victims:
        group.abort(rid)
    done = {}
    while group.has_unfinished():
        for out in group.step():
            if out.finished:
                done[out.request_id] = out
    finished = {r.request_id: r for r in group.pop_finished()}
    for rid in ids:
        if rid in victims:
            assert finished[rid].finish_reason == "abort" and len(finished[rid].output_token_ids) < 24
        else:
            assert done[rid].finish_reason == "length" and len(done[rid].token_ids) == 24
    for inst in group.instances:
        assert inst.scheduler.allocator.num_free == inst.scheduler.allocator.capacity
    # abort_all reaches every replica
    ids = [group.add_request(ref["prompt_1"].tolist(), long) for _ in range(2)]
    assert sorted(group.abort_all()) == sorted(ids)
    assert len(group.pop_finished()) == 2 and not group.has_unfinished()


class _HeldSample:
    """Replica `r`'s step program waits for `release` (or raises `error`) on its first call after install; the
    test's thread meanwhile drives the group."""

    def __init__(self, group, r, error=None):
        self.runner, self.error = group.runners[r], error
        self.release, self.entered = threading.Event(), threading.Event()
        sample = self.runner.sample

        def held(*args, **kwargs):
            del self.runner.sample  # only the first call waits
            self.entered.set()
            assert self.release.wait(30), "the test never released the held step"
            if self.error is not None:
                raise self.error
            return sample(*args, **kwargs)
        self.runner.sample = held


def _one_per_replica(group, ref, params):
    ids = [group.add_request(ref[f"prompt_{i}"].tolist(), params, None) for i in range(2)]
    assert [group.instance_of(rid) for rid in ids] == [0, 1]
    return ids


def test_a_slow_replica_holds_back_only_its_own_requests(llm2):
    """Replicas step independently: while replica 0's step waits on its device, replica 1 finishes a request,
    takes a new one, and a request of replica 0 aborted meanwhile stops once that step completes."""
    group, ref = llm2.engine, reference(MODEL)
    held = _HeldSample(group, 0)
    slow, fast = _one_per_replica(group, ref, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    outs = {}
    try:
        while fast not in outs:
            for out in group.step():
                if out.finished:
                    outs[out.request_id] = out
        assert held.entered.is_set() and not held.release.is_set()
        assert group.requests[slow].output_token_ids == [], "replica 0's first step is still on its device"
        late = group.add_request(ref["prompt_2"].tolist(), GREEDY, None, request_id="late")
        assert group.instance_of(late) == 1, "the idle replica takes the new request"
        group.abort(slow)  # replica 0's engine is inside its step: the abort waits for that call
        assert not group.requests[slow].finished
        while late not in outs:
            for out in group.step():
                if out.finished:
                    outs[out.request_id] = out
    finally:
        held.release.set()
    while group.has_unfinished():
        group.step()
    assert outs[fast].token_ids == ref["greedy__base__1"].tolist()[:6]
    assert outs[late].token_ids == ref["greedy__base__2"].tolist()
    finished = {r.request_id: r for r in group.pop_finished()}
    # the held call queued replica 0's first step (async scheduling); the abort took effect when that call
    # returned, before the step's token was read, so none arrived
    assert finished[slow].finish_reason == "abort" and finished[slow].output_token_ids == []
    for inst in group.instances:
        assert inst.scheduler.allocator.num_free == inst.scheduler.allocator.capacity


def test_a_failed_replica_step_is_raised_after_the_others_and_loses_no_output(llm2):
    group, ref = llm2.engine, reference(MODEL)
    held = _HeldSample(group, 0, error=RuntimeError("device lost"))
    one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    failing, other = _one_per_replica(group, ref, one_token)
    outs = []
    while other not in {o.request_id for o in outs}:  # replica 1 completes while replica 0 waits
        outs += group.step()
    held.release.set()
    with pytest.raises(RuntimeError, match="device lost"):
        while True:
            outs += group.step()
    assert sorted(group.abort_all()) == [failing]
    group.pop_finished()
    assert group.has_unfinished() is False
    assert [o.request_id for o in outs] == [other] and outs[0].token_ids == ref["greedy__base__1"].tolist()[:1]


def test_replay_hooks_see_every_replica(llm2):
    ref, names = reference(MODEL), list(adapter_dirs(MODEL))
    reqs = [WorkloadRequest(0.0, k % 2 if k % 3 else None, ref[f"prompt_{k % 3}"].tolist(), 6) for k in range(6)]
    log = replay.StepLog()
    steps = [inst.num_steps for inst in llm2.engine.instances]
    timings, _ = replay.replay(llm2.engine, reqs, names, step_log=log)
    assert len(timings) == 6
    steps = [inst.num_steps - n for inst, n in zip(llm2.engine.instances, steps)]
    assert min(steps) > 0 and len(log.records) == sum(steps), "one record per replica step, both replicas"
    assert all(r.instances == 1 for r in log.records)
    assert not any("step" in vars(inst) or {"sample", "fetch"} & set(vars(inst.runner))
                   for inst in llm2.engine.instances)
    assert sum(r.tokens for r in log.records) == sum(len(r.prompt) + r.max_tokens - 1 for r in reqs)
    assert all(r.device_ms > 0 for r in log.records)
    summary = replay.measured(llm2.engine, reqs, names, metrics.SLO(10.0, 10.0))
    assert summary["steps"] > 0 and summary["hits"] + summary["misses"] == 4
    assert summary["async_scheduling"] is True  # the replicas' engines queue steps ahead (the default)
    # The slot limit and the policy switch act on every replica.
    limit = replay.AdapterSlotLimit(llm2)
    limit.set(1)
    try:
        for cache in replay.adapter_caches(llm2.engine):
            assert sum(cache.refcount[p] for p in limit.placeholders) == len(limit.placeholders) == 3
        replay.set_policy(llm2.engine, "sjf")
        assert all(inst.scheduler.config.policy == "sjf" for inst in llm2.engine.instances)
        assert len(replay.replay(llm2.engine, reqs, names)[0]) == 6
    finally:
        limit.set(llm2.runner.adapters.max_adapters)
        replay.set_policy(llm2.engine, "fcfs")
    assert not limit.placeholders and "placeholder-0" not in llm2.adapters


def test_server_on_two_replicas(llm2):
    """One completion through the OpenAI server on the 2-replica LLM. Runs last: the server's engine thread then
    owns the LLM."""
    import httpx

    from infinilora_jax.serving import BackgroundServer, ServerConfig, ServerState

    ref, tok = reference(MODEL), llm2.tokenizer
    server = BackgroundServer(ServerState(llm2, ServerConfig(model_name="tiny"))).start()
    try:
        body = {"model": "attn-experts-r8", "prompt": ref["prompt_2"].tolist(), "max_tokens": 8, "temperature": 0.0,
                "ignore_eos": True}
        r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        want = tok.decode(ref["greedy__attn-experts-r8__2"].tolist(), skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == want
        text = httpx.get(server.base_url + "/metrics").text
        assert "infinilora_adapter_slots 8.0" in text, "slots over both replicas"
    finally:
        server.stop(stop_engine=True)


def test_warmed_up_replicas_never_compile():
    """ReplicaGroup.warmup compiles every replica's programs (concurrently); then requests on both replicas,
    with adapter loads, compile nothing."""
    import random

    from infinilora_jax.bench.compilations import CompileCounter

    llm = LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", replicas=2, max_num_batched_tokens=16,
              max_num_seqs=8, max_model_len=64, page_size=8, max_adapters=2, progress=False)
    counter = CompileCounter()
    shapes = llm.engine.warmup(progress=False, workers=2)
    assert shapes == len(llm.engine.program_shapes()) == 4
    assert counter.count >= 2 * 2 * shapes  # per replica: each shape with and without a carried load
    counter.count = 0
    rng = random.Random(3)
    names = [None, *adapter_dirs(MODEL)]
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 40))] for _ in range(24)]
    params = [SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0, ignore_eos=True) for _ in prompts]
    ids = llm._submit(prompts, params, [rng.choice(names) for _ in prompts])
    assert {llm.engine.instance_of(rid) for rid in ids} == {0, 1}  # both replicas serve
    done = [o for o in llm._run(ids) if o.finished]
    assert sorted(len(o.token_ids) for o in done) == sorted(p.max_tokens for p in params)
    assert counter.count == 0, f"{counter.count} compilations after warmup"
