"""InstanceGroup: several base instances sharing one LoRA server, stepped by one SPMD program.

Each base instance is an LLMEngine with its own scheduler, request queue and KV page allocator (its devices
hold its KV blocks); all of them share the runner, hence the LoRA server and its adapter cache, so any
instance's requests may use any adapter. A step schedules every instance, packs each one's rows into batches
of one common shape (the largest buckets any instance needs), runs one jitted step for all of them and hands
each instance its sampled tokens. The group offers the LLMEngine methods the LLM API and the server call.
"""

from __future__ import annotations

import itertools

from infinilora_jax.disagg.runner import DisaggRunner
from infinilora_jax.engine.engine import LLMEngine
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.request import RequestOutput
from infinilora_jax.engine.scheduler import SchedulerConfig
from infinilora_jax.errors import RequestError
from infinilora_jax.lora.adapter_cache import AdapterBusyError
from infinilora_jax.models.batch import step_needs


class _Allocators:
    """The instances' page allocators seen as one (for metrics)."""

    def __init__(self, instances):
        self.instances = instances

    @property
    def num_free(self) -> int:
        return sum(i.scheduler.allocator.num_free for i in self.instances)

    @property
    def capacity(self) -> int:
        return sum(i.scheduler.allocator.capacity for i in self.instances)


class _Schedulers:
    """The instances' schedulers seen as one (waiting, running, preemptions, pages: for metrics)."""

    def __init__(self, instances):
        self.instances = instances
        self.allocator = _Allocators(instances)

    @property
    def waiting(self) -> list:
        return [r for i in self.instances for r in i.scheduler.waiting]

    @property
    def running(self) -> list:
        return [r for i in self.instances for r in i.scheduler.running]

    @property
    def num_preemptions(self) -> int:
        return sum(i.scheduler.num_preemptions for i in self.instances)


class InstanceGroup:
    def __init__(self, runner: DisaggRunner, cache: CacheConfig, scheduler: SchedulerConfig, tokenizer=None,
                 eos_token_ids: tuple[int, ...] = ()):
        self.runner = runner
        self.instances = [LLMEngine(runner, cache, scheduler, tokenizer, eos_token_ids)
                          for _ in range(runner.layout.dp)]
        self.cache_config, self.config = cache, scheduler
        self.scheduler = _Schedulers(self.instances)
        self.kv = self.instances[0].kv
        self._ids = itertools.count()
        self._owner: dict[str, LLMEngine] = {}
        self.num_steps = 0

    @property
    def requests(self) -> dict:
        return {rid: r for i in self.instances for rid, r in i.requests.items()}

    # ---- requests ----

    def check_prompt(self, tokens, room_to_generate: bool = True) -> list[int]:
        return self.instances[0].check_prompt(tokens, room_to_generate)

    def add_request(self, prompt_token_ids, params, adapter=None, request_id=None, arrival_time=None) -> str:
        """Queue a request on the least loaded instance (fewest unfinished requests)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._owner:
            raise RequestError(f"duplicate request id {request_id!r}")
        load = lambda inst: sum(1 for r in inst.requests.values() if not r.finished)
        instance = min(self.instances, key=load)
        instance.add_request(prompt_token_ids, params, adapter, request_id, arrival_time)
        self._owner[request_id] = instance
        return request_id

    def instance_of(self, request_id: str) -> int:
        return self.instances.index(self._owner[request_id])

    def abort(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None:
            owner.abort(request_id)

    def abort_all(self) -> list[str]:
        return [rid for inst in self.instances for rid in inst.abort_all()]

    def unload_adapter(self, name: str) -> None:
        users = sum(1 for r in self.requests.values() if not r.finished and r.adapter == name)
        if users:
            raise AdapterBusyError(f"adapter {name!r} is in use by {users} queued or running request(s)",
                                   field="name")
        self.runner.adapters.unregister(name)

    def has_unfinished(self) -> bool:
        return any(i.has_unfinished() for i in self.instances)

    def pop_finished(self) -> list:
        done = [r for i in self.instances for r in i.pop_finished()]
        for r in done:
            self._owner.pop(r.request_id, None)
        return done

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        plans = [inst.schedule_step() for inst in self.instances]
        active = [(inst, plan) for inst, plan in zip(self.instances, plans) if plan is not None]
        if not active:
            return []
        page_size = self.cache_config.page_size
        needs = [step_needs(plan.rows, page_size) for _, plan in active]
        shapes = self.instances[0].shapes
        shape = dict(n_pad=max(shapes.tokens(n) for n, _, _ in needs),
                     p_pad=max(shapes.pages(p) for _, p, _ in needs), prefill=any(f for _, _, f in needs))
        built = [inst.build_step(plan, **shape) for inst, plan in active]
        want = any(plan.want_logprobs for _, plan in active)
        # Instance d's batch sits at position d; instances with no work run an idle batch of the same shapes.
        batches = [None] * len(self.instances)
        samplings = [None] * len(self.instances)
        for (inst, _), (batch, sampling) in zip(active, built):
            d = self.instances.index(inst)
            batches[d], samplings[d] = batch, sampling
        idle_batch = self.runner.idle_like(built[0][0])
        idle_sampling = type(built[0][1]).build([], [], [], len(built[0][0].logits_indices))
        batches = [b if b is not None else idle_batch for b in batches]
        samplings = [s if s is not None else idle_sampling for s in samplings]
        tokens, top = self.runner.sample_instances(batches, samplings, want)
        self.num_steps += 1
        outputs = []
        for inst, plan in active:
            d = self.instances.index(inst)
            outputs += inst.complete_step(plan, tokens[d], None if top is None else tuple(x[d] for x in top))
        return outputs

    # ---- compilation and teacher forcing (instance 0; the others idle) ----

    def program_shapes(self, scoring: bool = False):
        return self.instances[0].program_shapes(scoring)

    def warmup(self, scoring: bool = False, progress: bool = True, workers: int = 8) -> int:
        return self.instances[0].warmup(scoring, progress, workers)

    def score(self, token_ids, adapter=None):
        return self.instances[0].score(token_ids, adapter)

    def prompt_logprobs(self, token_ids, adapter=None):
        return self.instances[0].prompt_logprobs(token_ids, adapter)


__all__ = ["InstanceGroup"]
