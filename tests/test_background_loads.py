"""Background adapter loading (LLM(adapter_loading="background"), lora/adapter_cache.py): a cold adapter is copied
in while steps go on; only the requests that need it wait, holding their slot, and tokens equal HF's."""

import time

import pytest
from conftest import adapter_dirs, model_dir, reference, variant_adapter, variants

from infinilora_jax import LLM, SamplingParams
from infinilora_jax.errors import ConfigError

MODEL = "qwen3-moe-fused"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
VARIANTS = variants(MODEL)


@pytest.fixture(scope="module")
def llm_bg():
    """Two slots for three adapters: loads and evictions all along."""
    return LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", max_adapters=2, max_num_seqs=8,
               max_model_len=128, progress=False, adapter_loading="background")


def _make_cold(llm, name):
    llm.unload_adapter(name)
    llm.load_adapter(name, adapter_dirs(MODEL)[name])
    assert name not in llm.runner.adapters.slot_of


def test_background_loads_give_the_hf_tokens(llm_bg):
    ref, cache = reference(MODEL), llm_bg.runner.adapters
    before = cache.stats.loads
    jobs = [(i, v) for v in VARIANTS for i in range(3)]
    out = llm_bg.generate([ref[f"prompt_{i}"].tolist() for i, _ in jobs], GREEDY,
                          adapter=[variant_adapter(v) for _, v in jobs])
    for (i, v), r in zip(jobs, out):
        assert r.token_ids == ref[f"greedy__{v}__{i}"].tolist(), (i, v)
    assert cache.stats.loads > before and cache.stats.evictions > 0
    assert cache.stats.layerwise_loads == 0, "no load may be carried by a step"
    assert not cache.loading and not cache.pending


def test_a_cold_load_holds_back_only_the_requests_that_need_it(llm_bg):
    ref, cache, engine = reference(MODEL), llm_bg.runner.adapters, llm_bg.engine
    cold = next(iter(adapter_dirs(MODEL)))
    _make_cold(llm_bg, cold)
    cache.min_load_seconds = 600.0  # the copy "lands" when the test lowers this
    try:
        base = engine.add_request(ref["prompt_0"].tolist(), GREEDY, None)
        waiter = engine.add_request(ref["prompt_1"].tolist(), GREEDY, cold)
        finished = {}
        while base not in finished:
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.token_ids
        req = engine.requests[waiter]
        assert not req.output_token_ids and req.adapter_slot is not None and cache.refcount[cold] == 1, \
            "the waiting request holds its slot while the copy is in flight, and the base request's steps went on"
        landed = time.monotonic()
        cache.min_load_seconds = 0.0
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.token_ids
        assert req.first_token_time >= landed
        assert finished[base] == ref["greedy__base__0"].tolist()
        assert finished[waiter] == ref[f"greedy__{cold}__1"].tolist()
    finally:
        cache.min_load_seconds = 0.0
        engine.pop_finished()


def test_only_waiting_requests_wait_for_the_load(llm_bg):
    """With nothing else to run, the step waits for the load instead of failing."""
    ref, cache = reference(MODEL), llm_bg.runner.adapters
    cold = next(iter(adapter_dirs(MODEL)))
    _make_cold(llm_bg, cold)
    cache.min_load_seconds = 0.3
    try:
        out = llm_bg.generate([ref["prompt_2"].tolist()], GREEDY, adapter=cold)[0]
        assert out.token_ids == ref[f"greedy__{cold}__2"].tolist()
    finally:
        cache.min_load_seconds = 0.0


def test_aborting_a_request_that_waits_for_its_load_frees_its_slot(llm_bg):
    ref, cache, engine = reference(MODEL), llm_bg.runner.adapters, llm_bg.engine
    cold = list(adapter_dirs(MODEL))[1]
    _make_cold(llm_bg, cold)
    cache.min_load_seconds = 30.0
    try:
        base = engine.add_request(ref["prompt_0"].tolist(), GREEDY, None)
        waiter = engine.add_request(ref["prompt_2"].tolist(), GREEDY, cold)
        engine.step()
        assert cache.refcount[cold] == 1 and cold in cache.slot_of and not cache.is_ready(cache.slot_of[cold])
        engine.abort(waiter)
        assert cache.refcount[cold] == 0
        engine.abort(base)
        assert not engine.has_unfinished()
        assert {r.request_id for r in engine.pop_finished()} == {base, waiter}
        llm_bg.unload_adapter(cold)  # its load in flight is dropped with it
        assert not cache.loading
    finally:
        cache.min_load_seconds = 0.0
        if cold not in cache:
            llm_bg.load_adapter(cold, adapter_dirs(MODEL)[cold])


def _make_unstaged(llm, name):
    """Cold, and out of the host store: its next load must read it again (the loader thread's host work)."""
    _make_cold(llm, name)
    cache = llm.runner.adapters
    del cache.host[name]
    cache.staged.pop(name, None)


def _drain(engine, finished: dict, until=None) -> None:
    while engine.has_unfinished() and (until is None or until not in finished):
        finished.update({o.request_id: o for o in engine.step() if o.finished})


def test_a_cold_read_runs_on_the_loader_thread(llm_bg, monkeypatch):
    """An adapter the host store dropped is read, converted and staged on the loader thread: the engine thread's
    steps go on (a base request finishes) while the read is held back, then the waiting request runs exactly."""
    import threading

    ref, cache, engine = reference(MODEL), llm_bg.runner.adapters, llm_bg.engine
    cold = list(adapter_dirs(MODEL))[2]
    _make_unstaged(llm_bg, cold)
    release, readers = threading.Event(), []
    real_read = cache._read

    def held_read(name, path):
        readers.append(threading.current_thread().name)
        assert release.wait(60), "the test never released the read"
        return real_read(name, path)

    monkeypatch.setattr(cache, "_read", held_read)
    reads = cache.stats.disk_reads
    try:
        base = engine.add_request(ref["prompt_0"].tolist(), GREEDY, None)
        waiter = engine.add_request(ref["prompt_1"].tolist(), GREEDY, cold)
        finished = {}
        _drain(engine, finished, until=base)
        assert finished[base].token_ids == ref["greedy__base__0"].tolist(), "steps went on during the read"
        assert not engine.requests[waiter].output_token_ids and cache.refcount[cold] == 1
        assert readers and all(name.startswith("adapter-loader") for name in readers)
        release.set()
        _drain(engine, finished)
        assert finished[waiter].token_ids == ref[f"greedy__{cold}__1"].tolist()
        assert cache.stats.disk_reads == reads + 1 and cold in cache.staged and not cache.loading
    finally:
        release.set()
        engine.pop_finished()


def test_a_background_load_that_cannot_read_fails_only_its_requests(llm_bg, monkeypatch):
    """A read that fails on the loader thread (the adapter's files vanished since registration) fails the requests
    waiting for that load, with finish_reason "error" naming the adapter; the slot maps to nothing, the other
    requests are exact, and once the files can be read again the adapter serves again."""
    from infinilora_jax.errors import AdapterError

    ref, cache, engine = reference(MODEL), llm_bg.runner.adapters, llm_bg.engine
    cold = list(adapter_dirs(MODEL))[0]
    _make_unstaged(llm_bg, cold)

    def gone(name, path):
        raise AdapterError("adapter directory does not exist", path=path)

    monkeypatch.setattr(cache, "_read", gone)
    base = engine.add_request(ref["prompt_0"].tolist(), GREEDY, None)
    waiters = [engine.add_request(ref[f"prompt_{i}"].tolist(), GREEDY, cold) for i in (1, 2)]
    finished = {}
    _drain(engine, finished)
    engine.pop_finished()
    assert finished[base].token_ids == ref["greedy__base__0"].tolist() and finished[base].error is None
    for w in waiters:
        assert finished[w].finish_reason == "error" and finished[w].token_ids == []
        assert cold in finished[w].error and "could not be read again" in finished[w].error
    assert cold not in cache.slot_of and cache.refcount[cold] == 0 and not cache.failed_loads
    monkeypatch.undo()
    out = llm_bg.generate([ref["prompt_2"].tolist()], GREEDY, adapter=cold)[0]
    assert out.token_ids == ref[f"greedy__{cold}__2"].tolist()


def test_a_read_finishing_after_its_name_was_registered_anew_stages_nothing(llm_bg, monkeypatch):
    """A prefetch's background read that finishes after its adapter was unregistered and a different adapter
    registered under the same name must not leave its pages staged for the new one."""
    import threading

    from infinilora_jax.loading.peft_adapter import load_peft_adapter

    cache = llm_bg.runner.adapters
    names = list(adapter_dirs(MODEL))
    name, other = names[2], names[3]
    for resident in list(cache.slot_of):  # free every slot, so the prefetch takes one
        if resident in names and cache.refcount[resident] == 0:
            _make_cold(llm_bg, resident)
    _make_unstaged(llm_bg, name)
    entered, release, real_read = threading.Event(), threading.Event(), cache._read

    def held_read(n, p):
        entered.set()
        assert release.wait(60)
        return real_read(n, p)

    monkeypatch.setattr(cache, "_read", held_read)
    try:
        cache.prefetch([name])
        load = next(load for load in cache.loading.values() if load.name == name)
        assert entered.wait(60), "the loader thread is reading the original"
        llm_bg.unload_adapter(name)  # drops the load in flight
        replacement = load_peft_adapter(adapter_dirs(MODEL)[other], llm_bg.config, max_rank=16, name=name)
        cache.register_weights(replacement)
        release.set()
        load.preparing.result(timeout=60)
        assert name not in cache.staged and cache.host[name] is replacement
    finally:
        release.set()
        monkeypatch.undo()
        llm_bg.unload_adapter(name)
        llm_bg.load_adapter(name, adapter_dirs(MODEL)[name])


def test_unknown_loading_mode_is_refused():
    with pytest.raises(ConfigError, match="adapter_loading"):
        LLM(model_dir(MODEL), adapter_loading="eager", progress=False)
