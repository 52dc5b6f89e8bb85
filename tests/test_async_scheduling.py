"""Async scheduling (engine/engine.py): step N+1 is queued before step N's tokens are read, with N's tokens fed to
N+1 on the device. Outputs must equal one-step-at-a-time stepping exactly, through chunked prefill, preemption,
adapter cycling, seeded sampling, logprobs, stops that land while the next step is queued, the context limit and
aborts."""

import random

import pytest
from conftest import adapter_dirs, model_dir, reference

from infinilora_jax import LLM, SamplingParams

MODEL = "qwen3-moe-fused"


def _tight(async_scheduling: bool) -> LLM:
    """4 adapters for 2 device slots, an 8-token step budget, a KV cache too small for every request at once."""
    return LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", max_adapters=2,
               max_host_adapters=2, max_num_batched_tokens=8, max_num_seqs=6, page_size=4, num_pages=17,
               max_model_len=28, progress=False, async_scheduling=async_scheduling)


@pytest.fixture(scope="module")
def engines():
    return {mode: _tight(mode) for mode in (False, True)}


def _workload(ref):
    """Requests of every kind: greedy to max_tokens, seeded top-k / top-p, logprobs, ones that stop on a token
    or a string mid-output, and one that runs into the context limit."""
    greedy = ref["greedy__base__1"].tolist()
    rng = random.Random(3)
    names = [None, *adapter_dirs(MODEL)]
    jobs = []
    for k in range(14):
        prompt = ref[f"prompt_{k % 3}"].tolist()
        kind = k % 7
        if kind == 0:
            params = SamplingParams(max_tokens=rng.randint(1, 9), temperature=0.0, ignore_eos=True)
        elif kind == 1:
            params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, top_k=40, seed=k, ignore_eos=True)
        elif kind == 2:
            params = SamplingParams(max_tokens=6, temperature=0.7, seed=k, logprobs=3, ignore_eos=True)
        elif kind == 3:  # stops on a token its greedy output reaches at index 2, while its next row is queued
            prompt = ref["prompt_1"].tolist()
            params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[greedy[2]], ignore_eos=True)
        elif kind == 4:
            params = SamplingParams(max_tokens=10, temperature=0.0, stop=["e"], ignore_eos=True)
        elif kind == 5:  # max_tokens past the context limit: finishes on the limit
            params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=2)
        adapter = None if kind == 3 else rng.choice(names)
        jobs.append((prompt, params, adapter))
    return jobs


def _run(llm, jobs):
    """Feed the jobs two at a time every other step; -> {job index: (tokens, finish reason, logprobs, text)}."""
    engine = llm.engine
    ids, done, pending, step = {}, {}, list(enumerate(jobs)), 0
    preemptions = engine.scheduler.num_preemptions
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            for i, (prompt, params, adapter) in pending[:2]:
                ids[engine.add_request(prompt, params, adapter)] = i
            pending = pending[2:]
        for out in engine.step():
            i = ids[out.request_id]
            tokens, reason, logprobs, text = done.get(i, ([], None, [], None))
            assert out.token_ids == tokens + out.new_token_ids, "outputs arrive in order, each token once"
            done[i] = (out.token_ids, out.finish_reason, logprobs + (out.new_logprobs or []), out.text)
        step += 1
    engine.pop_finished()
    allocator = engine.scheduler.allocator
    assert allocator.num_free == allocator.capacity, "every page came back"
    assert sum(llm.runner.adapters.refcount.values()) == 0
    return done, engine.scheduler.num_preemptions - preemptions


def test_async_scheduling_outputs_equal_one_step_at_a_time(engines):
    jobs = _workload(reference(MODEL))
    sync, _ = _run(engines[False], jobs)
    async_, preempted = _run(engines[True], jobs)
    _assert_same_outputs(sync, async_, jobs)
    assert preempted > 0, "the KV cache never ran out: preemption with a token on the device is untested"


def _assert_same_outputs(sync, async_, jobs):
    assert set(sync) == set(async_) == set(range(len(jobs)))
    for i in range(len(jobs)):
        (tokens, reason, logprobs, text), want = async_[i], sync[i]
        assert (tokens, reason, text) == (want[0], want[1], want[3]), (i, jobs[i][1])
        # the two modes batch differently (a step is scheduled before the previous one's requests finish), and
        # float32 logits of other batch shapes differ in the last bits
        assert [(lp.token_id, [t for t, _ in lp.top]) for lp in logprobs] == \
            [(lp.token_id, [t for t, _ in lp.top]) for lp in want[2]], i
        assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in want[2]], abs=1e-5)
    reasons = {sync[i][1] for i in range(len(jobs))}
    assert {"stop", "length"} <= reasons
    assert any(r == "stop" and len(t) < jobs[i][1].max_tokens for i, (t, r, _, _) in sync.items()), \
        "no request stopped early: a stop landing while the next step is queued is untested"
    assert any(len(t) + len(jobs[i][0]) == 28 for i, (t, _, _, _) in sync.items()), "the context limit untested"


def test_disaggregated_instances_async_equal_one_step_at_a_time():
    """Two base instances sharing one LoRA server (2+2_dp2: the InstanceGroup steps both in one program, each
    instance's placeholders taking its own devices' tokens of the step before) with 2 adapter slots for 4
    adapters: the same outputs queued ahead as one step at a time. An instance whose waiting requests need the
    slots the other holds idles meanwhile (it used to raise "cannot be scheduled")."""
    llm = LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", max_adapters=2, max_host_adapters=2,
              max_num_batched_tokens=8, max_num_seqs=6, page_size=4, num_pages=9, max_model_len=28, progress=False,
              mode="disaggregated", mesh="2+2_dp2")
    group, runner = llm.engine, llm.runner
    assert group.async_scheduling and len(group.instances) == 2
    jobs = _workload(reference(MODEL))
    group.async_scheduling = False
    sync, _ = _run(llm, jobs)
    group.async_scheduling = True
    calls, took_tokens = [], set()
    sample, fetch = runner.sample_instances, runner.fetch_instances

    def sample_instances(*args, **kwargs):
        calls.append("s")
        took_tokens.update(d for d, src in enumerate(kwargs["token_srcs"]) if src is not None and (src >= 0).any())
        return sample(*args, **kwargs)

    def fetch_instances(step):
        calls.append("f")
        return fetch(step)

    runner.sample_instances, runner.fetch_instances = sample_instances, fetch_instances
    try:
        async_, preempted = _run(llm, jobs)
    finally:
        del runner.sample_instances, runner.fetch_instances
    _assert_same_outputs(sync, async_, jobs)
    assert took_tokens == {0, 1}, "each instance's rows took tokens of the step queued before"
    order = "".join(calls)
    assert order.startswith("ss") and "fff" not in order, order
    assert preempted > 0


class _CallLog:
    """Records the order of the runner's `sample` (queue a step) and `fetch` (read a step's tokens) calls."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []
        for name in ("sample", "fetch"):
            setattr(runner, name, self._logged(name, getattr(runner, name)))

    def _logged(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return call

    def close(self):
        del self.runner.sample, self.runner.fetch


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_next_step_is_queued_before_the_tokens_are_read(engines, async_scheduling):
    """Async: every fetch of a decode stream's tokens comes after the next step was queued; sync: alternating.
    And the steps queued with a placeholder read the right tokens (the outputs equal the reference's)."""
    llm, ref = engines[async_scheduling], reference(MODEL)
    log = _CallLog(llm.runner)
    try:
        out = llm.generate([ref["prompt_0"].tolist()], SamplingParams(max_tokens=8, temperature=0.0,
                                                                     ignore_eos=True))[0]
        llm.engine.step()  # the step queued for the finished request is not waited for
    finally:
        log.close()
    assert out.token_ids == ref["greedy__base__0"].tolist()
    order = "".join("s" if c == "sample" else "f" for c in log.calls)
    if async_scheduling:
        # the last fetch (the request's last token) has no step after it to queue
        assert order.startswith("ss") and "ff" not in order[:-1] and order.endswith("sff"), order
        assert all(order[:k + 1].count("s") >= order[:k + 1].count("f") + 1 for k in range(len(order) - 1)), order
    else:
        assert order == "sf" * (len(order) // 2), order
    assert not llm.engine.has_unfinished()


def test_abort_while_a_step_is_queued(engines):
    """Aborting a request whose next step is queued: no token of it arrives afterwards, its pages and adapter slot
    are freed at once, and the request beside it goes on unchanged."""
    llm, ref = engines[True], reference(MODEL)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    keep = engine.add_request(ref["prompt_0"].tolist(), params)
    gone = engine.add_request(ref["prompt_1"].tolist(), params, "attn-experts-r8")
    seen = {keep: [], gone: []}
    while len(seen[gone]) < 3:
        for out in engine.step():
            seen[out.request_id] += out.new_token_ids
    assert engine._queued is not None and engine.requests[gone].num_pending == 1
    engine.abort(gone)
    assert llm.runner.adapters.refcount.get("attn-experts-r8", 0) == 0
    assert not engine.requests[gone].pages
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id != gone, "a token of the aborted request arrived after the abort"
            seen[out.request_id] += out.new_token_ids
    engine.pop_finished()
    assert seen[keep] == ref["greedy__base__0"].tolist()
    assert seen[gone] == ref["greedy__attn-experts-r8__1"].tolist()[: len(seen[gone])]
    allocator = engine.scheduler.allocator
    assert allocator.num_free == allocator.capacity
