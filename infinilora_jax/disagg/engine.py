"""InstanceGroup: several base instances sharing one LoRA server, stepped by one SPMD program.

Each base instance is an LLMEngine with its own scheduler, request queue and KV page allocator (its devices
hold its KV blocks); all of them share the runner, hence the LoRA server and its adapter cache, so any
instance's requests may use any adapter. A step schedules every instance, packs each one's rows into batches
of one common shape (the largest buckets any instance needs), runs one jitted step for all of them and hands
each instance its sampled tokens. With async scheduling (the default, as an LLMEngine's) the group queues the
next step before it reads the previous one's tokens, for all instances at once. The group offers the LLMEngine
methods the LLM API and the server call.
"""

from __future__ import annotations

import contextlib
import dataclasses

from infinilora_jax.disagg.runner import DisaggRunner
from infinilora_jax.engine.engine import STUCK, LLMEngine, QueuedStep, StepPlan
from infinilora_jax.engine.instance_set import InstanceSet
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.request import RequestOutput
from infinilora_jax.engine.runner import StepTokens
from infinilora_jax.engine.scheduler import SchedulerConfig
from infinilora_jax.models.batch import step_needs


@dataclasses.dataclass(frozen=True)
class GroupStep:
    """A step queued for several instances at once, whose tokens are not read yet."""

    plans: list[tuple[LLMEngine, StepPlan]]  # the instances that had work, with their plans
    tokens: StepTokens


class InstanceGroup(InstanceSet):
    def __init__(self, runner: DisaggRunner, cache: CacheConfig, scheduler: SchedulerConfig, tokenizer=None,
                 eos_token_ids: tuple[int, ...] = (), async_scheduling: bool = True):
        """async_scheduling: queue each step before reading the previous one's tokens (engine/engine.py), for
        every instance at once."""
        self.runner = runner
        self.instances = [LLMEngine(runner, cache, scheduler, tokenizer, eos_token_ids, async_scheduling)
                          for _ in range(runner.layout.dp)]
        self.async_scheduling = self.instances[0].async_scheduling
        self.cache_config, self.config = cache, scheduler
        self.kv = self.instances[0].kv
        self._queued: GroupStep | None = None
        super().__init__()

    def add_request(self, prompt_token_ids, params, adapter=None, request_id=None, arrival_time=None) -> str:
        """Queue a request on the least loaded instance (fewest unfinished requests)."""
        request_id = self._request_id(request_id)
        load = lambda inst: sum(1 for r in inst.requests.values() if not r.finished)
        return self._queue(min(self.instances, key=load), prompt_token_ids, params, adapter, request_id,
                           arrival_time)

    def abort_all(self) -> list[str]:
        self._queued = None  # its tokens are not wanted (and may never come, after a failure)
        return super().abort_all()

    # ---- the step ----

    @contextlib.contextmanager
    def _host_phase(self):
        """Every instance's lock: the host phases of a step exclude request operations (engine/engine.py)."""
        with contextlib.ExitStack() as stack:
            for inst in self.instances:
                stack.enter_context(inst._lock)
            yield

    def step(self) -> list[RequestOutput]:
        """Queue the next step for every instance with work, then complete the one before it (async scheduling)
        or this one; return the completed step's outputs. Instances with no work run an idle batch."""
        with self._host_phase():
            plans = [inst.schedule_step(wait_for_loads=False) for inst in self.instances]
            outputs = [out for inst in self.instances for out in inst.failed_outputs()]
            queued = self._queued
            if queued is not None and not any(inst._queued_is_wanted() for inst, _ in queued.plans):
                queued = None  # every request it samples for has finished: nobody reads it
            active = [(inst, plan) for inst, plan in zip(self.instances, plans) if plan is not None]
            if not active and queued is None:
                self._set_queued(None)
                if self.runner.adapters.loading:  # queued requests wait for background loads: wait for one
                    self.runner.adapters.wait_for_load()
                elif any(inst.scheduler.waiting for inst in self.instances):
                    raise RuntimeError(STUCK)  # (an instance's waiting requests may wait for another's slots)
                return outputs
            if active:
                args = self._build(active)
            for inst in self.instances:
                inst._on_device = True
        try:
            new = None
            if active:
                tokens = self.runner.sample_instances(**args, prev=None if queued is None else queued.tokens)
                with self._host_phase():
                    for inst, plan in active:
                        inst.mark_dispatched(plan)
                self.num_steps += 1
                new = GroupStep(active, tokens)
            self._set_queued(new)
            if queued is not None:
                outputs += self._complete(queued)
            if not self.async_scheduling and new is not None:
                self._set_queued(None)
                outputs += self._complete(new)
            return outputs
        finally:
            with self._host_phase():
                for inst in self.instances:
                    inst._on_device = False
                    inst._abort_deferred()

    def _build(self, active: list[tuple[LLMEngine, StepPlan]]) -> dict:
        """sample_instances' arguments (but `prev`) for the active instances' plans: every instance's batch packed
        to one common shape (the largest buckets any needs), instance d's at position d, idle batches elsewhere,
        and where each placeholder token comes from in the step queued before."""
        page_size = self.cache_config.page_size
        needs = [step_needs(plan.rows, page_size) for _, plan in active]
        shapes = self.instances[0].shapes
        shape = dict(n_pad=max(shapes.tokens(n) for n, _, _ in needs),
                     p_pad=max(shapes.pages(p) for _, p, _ in needs), prefill=any(f for _, _, f in needs))
        built = [inst.build_step(plan, **shape) for inst, plan in active]
        batches, samplings, token_srcs = ([None] * len(self.instances) for _ in range(3))
        for (inst, plan), (batch, sampling) in zip(active, built):
            d = self.instances.index(inst)
            batches[d], samplings[d] = batch, sampling
            token_srcs[d] = inst.token_sources(plan, batch, inst._queued)
        idle_batch = self.runner.idle_like(built[0][0])
        idle_sampling = type(built[0][1]).build([], [], [], len(built[0][0].logits_indices))
        batches = [b if b is not None else idle_batch for b in batches]
        samplings = [s if s is not None else idle_sampling for s in samplings]
        want = any(plan.want_logprobs for _, plan in active)
        return dict(batches=batches, samplings=samplings, rows_out=self.instances[0].rows_out,
                    token_srcs=token_srcs, logprobs=want)

    def _set_queued(self, step: GroupStep | None) -> None:
        """The group's queued step, and each instance's share of it (what `has_unfinished` and `token_sources`
        of an instance read)."""
        self._queued = step
        for inst in self.instances:
            inst._queued = None
        for inst, plan in step.plans if step is not None else []:
            inst._queued = QueuedStep(plan, step.tokens)

    def _complete(self, step: GroupStep) -> list[RequestOutput]:
        tokens, top = self.runner.fetch_instances(step.tokens)  # waits for that step
        outputs = []
        with self._host_phase():
            for inst, plan in step.plans:
                d = self.instances.index(inst)
                outputs += inst.complete_step(plan, tokens[d], None if top is None else tuple(x[d] for x in top))
        return outputs

    # ---- compilation and teacher forcing (instance 0; the others idle) ----

    def program_shapes(self, scoring: bool = False):
        return self.instances[0].program_shapes(scoring)

    def warmup(self, scoring: bool = False, progress: bool = True, workers: int = 8,
               run_programs: bool = False) -> int:
        """Instance 0's LLMEngine.warmup. Its padding-batch runs stay off unless asked: the disaggregated step's
        first-execution cost was never measured, and the runs were only exercised in coupled mode."""
        return self.instances[0].warmup(scoring, progress, workers, run_programs)

    def score(self, token_ids, adapter=None):
        return self.instances[0].score(token_ids, adapter)

    def prompt_logprobs(self, token_ids, adapter=None):
        return self.instances[0].prompt_logprobs(token_ids, adapter)


__all__ = ["InstanceGroup"]
