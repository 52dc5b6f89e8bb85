"""InstanceGroup: several base instances sharing one LoRA server, stepped by one SPMD program.

Each base instance is an LLMEngine with its own scheduler, request queue and KV page allocator (its devices
hold its KV blocks); all of them share the runner, hence the LoRA server and its adapter cache, so any
instance's requests may use any adapter. A step schedules every instance, packs each one's rows into batches
of one common shape (the largest buckets any instance needs), runs one jitted step for all of them and hands
each instance its sampled tokens. The group offers the LLMEngine methods the LLM API and the server call.
"""

from __future__ import annotations

from infinilora_jax.disagg.runner import DisaggRunner
from infinilora_jax.engine.engine import LLMEngine
from infinilora_jax.engine.instance_set import InstanceSet
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.request import RequestOutput
from infinilora_jax.engine.scheduler import SchedulerConfig
from infinilora_jax.models.batch import step_needs


class InstanceGroup(InstanceSet):
    def __init__(self, runner: DisaggRunner, cache: CacheConfig, scheduler: SchedulerConfig, tokenizer=None,
                 eos_token_ids: tuple[int, ...] = ()):
        self.runner = runner
        self.instances = [LLMEngine(runner, cache, scheduler, tokenizer, eos_token_ids)
                          for _ in range(runner.layout.dp)]
        self.cache_config, self.config = cache, scheduler
        self.kv = self.instances[0].kv
        super().__init__()

    def add_request(self, prompt_token_ids, params, adapter=None, request_id=None, arrival_time=None) -> str:
        """Queue a request on the least loaded instance (fewest unfinished requests)."""
        request_id = self._request_id(request_id)
        load = lambda inst: sum(1 for r in inst.requests.values() if not r.finished)
        return self._queue(min(self.instances, key=load), prompt_token_ids, params, adapter, request_id,
                           arrival_time)

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        plans = [inst.schedule_step(wait_for_loads=False) for inst in self.instances]
        failed = [out for inst in self.instances for out in inst.failed_outputs()]
        active = [(inst, plan) for inst, plan in zip(self.instances, plans) if plan is not None]
        if not active:
            if self.runner.adapters.loading:  # queued requests wait for background loads: wait for one
                self.runner.adapters.wait_for_load()
            return failed
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
        outputs = failed
        for inst, plan in active:
            inst.mark_dispatched(plan)
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
