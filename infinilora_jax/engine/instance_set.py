"""InstanceSet: several LLMEngines served as one engine: what ReplicaGroup (coupled replicas, engine/replicas.py)
and InstanceGroup (base instances over one LoRA server, disagg/engine.py) share.

It owns the bookkeeping of which instance serves which request (ids unique over the set), and offers the
LLMEngine methods that only fan out to the instances: requests, check_prompt, instance_of, abort, abort_all,
unload_adapter, has_unfinished, pop_finished, and `scheduler`, the instances' schedulers seen as one (metrics).
Subclasses choose the instance for a new request (`_queue`) and run the step.
"""

from __future__ import annotations

import itertools

from infinilora_jax.engine.engine import LLMEngine, refuse_if_in_use
from infinilora_jax.engine.request import Request
from infinilora_jax.errors import RequestError


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

    # list() copies each queue in one C call: a replica stepping in its own thread may change it meanwhile
    @property
    def waiting(self) -> list:
        return [r for i in self.instances for r in list(i.scheduler.waiting)]

    @property
    def running(self) -> list:
        return [r for i in self.instances for r in list(i.scheduler.running)]

    @property
    def num_preemptions(self) -> int:
        return sum(i.scheduler.num_preemptions for i in self.instances)


class InstanceSet:
    """Subclasses set `instances` and `runner` (whose `adapters` is the registry every instance uses), then call
    `super().__init__()`."""

    instances: list[LLMEngine]

    def __init__(self):
        self.scheduler = _Schedulers(self.instances)
        self._ids = itertools.count()
        self._owner: dict[str, LLMEngine] = {}
        self.num_steps = 0

    @property
    def requests(self) -> dict[str, Request]:
        return {rid: r for inst in self.instances for rid, r in inst.requests.items()}

    def check_prompt(self, tokens, room_to_generate: bool = True) -> list[int]:
        return self.instances[0].check_prompt(tokens, room_to_generate)

    def _request_id(self, request_id: str | None) -> str:
        """The id a new request gets: the caller's, unique over the set, or a fresh one."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._owner:
            raise RequestError(f"duplicate request id {request_id!r}")
        return request_id

    def _queue(self, instance: LLMEngine, prompt_token_ids, params, adapter, request_id, arrival_time) -> str:
        """Queue a request (its id from `_request_id`) on `instance`."""
        instance.add_request(prompt_token_ids, params, adapter, request_id, arrival_time)
        self._owner[request_id] = instance
        return request_id

    def instance_of(self, request_id: str) -> int:
        """The instance serving a request (while it is known: until pop_finished returns it)."""
        return self.instances.index(self._owner[request_id])

    def abort(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None:
            owner.abort(request_id)

    def abort_all(self) -> list[str]:
        return [rid for inst in self.instances for rid in inst.abort_all()]

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; refused while a queued or running request of any instance uses it."""
        refuse_if_in_use(self.requests.values(), name)
        self.runner.adapters.unregister(name)

    def has_unfinished(self) -> bool:
        return any(inst.has_unfinished() for inst in self.instances)

    def pop_finished(self) -> list[Request]:
        done = [r for inst in self._settled_instances() for r in inst.pop_finished()]
        for r in done:
            self._owner.pop(r.request_id, None)
        return done

    def _settled_instances(self) -> list[LLMEngine]:
        """The instances whose finished requests may be returned now (all; replicas: those not stepping)."""
        return self.instances
