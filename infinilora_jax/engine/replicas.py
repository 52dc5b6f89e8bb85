"""ReplicaGroup: N independent coupled replicas (S-LoRA-style data parallelism), served as one engine.

Each replica is an LLMEngine with its own ModelRunner on its own devices: its own copy of the base weights, KV
cache, scheduler and adapter pool, so an adapter used on two replicas sits in a device slot of each (the cost
a disaggregated LoRA server avoids: docs/architecture/07-disaggregated.md). The group offers the LLMEngine
methods the LLM API, the OpenAI server and bench/replay.py call (add_request, step, abort, abort_all, requests,
pop_finished, check_prompt, warmup, score, prompt_logprobs, unload_adapter, instances, instance_of, scheduler
counters) and `runner`, a ReplicaRunners whose `adapters` is the replicas' adapter registry seen as one.

Routing (`ReplicaGroup.route`): a new request goes to a replica with *affinity* for its adapter (the adapter is
resident in, or being loaded into, one of the replica's device slots, or an unfinished request of that replica
uses it), the least loaded of those, unless that replica's load exceeds the least loaded replica's by more than
`affinity_slack` tokens (default: one step's token budget, about what a cold adapter load costs in step time);
otherwise (and for requests without an adapter) the least loaded replica. Load is outstanding tokens: prompt
tokens not yet computed plus tokens still to generate (max_tokens minus those generated), over the replica's
unfinished requests. Ties go to the lowest replica index.

Replicas step independently, as separate servers would: `step` starts a step on every idle replica with work,
each in its own thread of a persistent pool (JAX releases the GIL while a step computes and while its tokens come
back), waits until at least one of the steps in flight completes and returns the outputs of those that have. A
slow step on one replica (a long prefill chunk, a cold adapter load) therefore holds back only that replica's
requests; the caller meanwhile adds requests (LLMEngine's lock covers a step's host phases only). A replica's
exception is raised once every step in flight has completed (the caller aborts, as after any failed step); the
outputs of the other replicas' steps come with the next `step`. What changes a replica's state beyond requests
(adapter registration, warmup, teacher forcing, abort_all) first waits for every step in flight (`quiesce`).

Adapters are registered on every replica: the PEFT directory is read and converted once and the same host
AdapterWeights object is entered into each replica's cache; a replica that has to re-read an adapter its host
store dropped first takes it from a sibling's store when one still holds it. Pinned staging copies and device
slots are per replica (they live on the replica's devices).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import jax

from infinilora_jax.engine.engine import LLMEngine
from infinilora_jax.engine.instance_set import InstanceSet
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.request import Request, RequestOutput
from infinilora_jax.engine.runner import ModelRunner
from infinilora_jax.engine.scheduler import SchedulerConfig
from infinilora_jax.errors import ConfigError
from infinilora_jax.loading.peft_adapter import AdapterWeights
from infinilora_jax.lora.adapter_cache import AdapterBusyError, AdapterCache, AdapterStats, check_adapter_name


def split_devices(devices: list, replicas: int, per_replica: int) -> list[list]:
    """`replicas` contiguous groups of `per_replica` devices from the front of `devices`; ConfigError when there
    are too few."""
    if replicas < 1:
        raise ConfigError(f"replicas={replicas}: must be at least 1")
    need = replicas * per_replica
    if len(devices) < need:
        raise ConfigError(f"{replicas} replicas of {per_replica} device(s) each need {need} devices; "
                          f"{len(devices)} available")
    return [list(devices[r * per_replica:(r + 1) * per_replica]) for r in range(replicas)]


class ReplicaAdapters:
    """Every replica's AdapterCache seen as one registry: registration and unregistration apply to all of them;
    lookups answer from replica 0 (all hold the same names); stats are summed over the replicas. `caches` are the
    per-replica caches (device slots, residency and per-replica stats)."""

    def __init__(self, caches: list[AdapterCache]):
        self.caches = caches
        self.quiesce = lambda: None  # ReplicaGroup: waits for the steps in flight (registration changes slots)
        for cache in caches:  # re-reads of a dropped adapter reuse a sibling's host copy when there is one
            cache._read = self._shared_reader(cache, cache._read)

    def _shared_reader(self, cache: AdapterCache, read):
        def read_shared(name: str, path: str) -> AdapterWeights:
            for other in self.caches:
                weights = other.host.get(name)
                if other is not cache and weights is not None and other.paths.get(name) == path:
                    return weights
            return read(name, path)
        return read_shared

    # ---- what AdapterCache answers ----

    @property
    def first(self) -> AdapterCache:
        return self.caches[0]

    @property
    def max_adapters(self) -> int:
        """Device slots per replica."""
        return self.first.max_adapters

    @property
    def total_slots(self) -> int:
        return sum(c.max_adapters for c in self.caches)

    @property
    def max_adapter_bytes(self) -> int | None:
        return self.first.max_adapter_bytes

    @property
    def max_host_adapters(self) -> int:
        return self.first.max_host_adapters

    @property
    def stats(self) -> AdapterStats:
        """Summed over the replicas (a fresh object: take a copy before, subtract after)."""
        total = AdapterStats()
        for cache in self.caches:
            for f in dataclasses.fields(AdapterStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(cache.stats, f.name))
        return total

    @property
    def slot_of(self) -> dict[tuple[int, str], int]:
        """(replica, adapter) -> slot for every resident copy (an adapter resident on two replicas counts twice)."""
        return {(r, name): slot for r, cache in enumerate(self.caches) for name, slot in cache.slot_of.items()}

    def names(self) -> list[str]:
        return self.first.names()

    def path(self, name: str) -> str | None:
        return self.first.path(name)

    def require(self, name: str) -> str:
        return self.first.require(name)

    def info(self, name: str) -> AdapterWeights:
        return self.first.info(name)

    def __contains__(self, name: str) -> bool:
        return name in self.first

    def resident_on(self, name: str) -> list[int]:
        return [r for r, cache in enumerate(self.caches) if name in cache.slot_of]

    # ---- registration, on every replica ----

    def register(self, name: str, path: str) -> None:
        """Read, validate and convert the adapter at `path` once and register it on every replica (all or
        nothing)."""
        check_adapter_name(name)
        weights = self.first._read(name, path)
        self._add_all(name, os.path.abspath(path), weights)

    def register_weights(self, weights: AdapterWeights) -> None:
        check_adapter_name(weights.name)
        self._add_all(weights.name, None, weights)

    def _add_all(self, name: str, path: str | None, weights: AdapterWeights) -> None:
        # Replica 0 last: lookups (names, require) answer from it, so a name is visible only once every replica
        # has it.
        self.quiesce()
        done = []
        try:
            for cache in [*self.caches[1:], self.first]:
                cache._add(name, path, weights)
                done.append(cache)
        except BaseException:
            for cache in done:
                cache.unregister(name)
            raise

    def unregister(self, name: str) -> None:
        """Forget an adapter on every replica; refused while any replica's requests hold it."""
        self.require(name)
        self.quiesce()
        busy = sum(c.refcount[name] for c in self.caches)
        if busy:
            raise AdapterBusyError(f"adapter {name!r} is in use by {busy} running request(s)", field="name")
        for cache in [self.first, *self.caches[1:]]:  # replica 0 first: the name disappears before its slots go
            cache.unregister(name)


class ReplicaRunners:
    """The replicas' ModelRunners seen as one where the LLM API and the benchmarks look at `llm.runner`: the
    shared adapter registry (`adapters`), the model config and dtype, the base weights of replica 0 (for
    save_converted: every replica holds the same), and live bytes over every replica's devices."""

    def __init__(self, runners: list[ModelRunner]):
        self.runners = runners
        first = runners[0]
        self.cfg, self.layout, self.dtype = first.cfg, first.layout, first.dtype
        self.adapters = ReplicaAdapters([r.adapters for r in runners])

    @property
    def model_state(self):
        return self.runners[0].model_state

    @property
    def devices(self) -> list:
        return [d for r in self.runners for d in r.mesh.devices.flat]

    def live_bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for runner in self.runners:
            out.update(runner.live_bytes_per_device())
        return out


def shares_compiled_programs(device) -> bool:
    """Whether replicas on other devices can load this device's compiled programs from jax's persistent
    compilation cache: on GPU, whose cache keys leave the device assignment out, once the cache is on."""
    return device.platform == "gpu" and bool(jax.config.jax_compilation_cache_dir)


def outstanding_tokens(req: Request) -> int:
    """Work a request still brings to its replica: prompt (or recomputed) tokens not yet computed, plus the tokens
    it may still generate."""
    return ((req.num_scheduled_tokens - req.num_computed_tokens)
            + max(0, req.params.max_tokens - len(req.output_token_ids) - req.num_pending))


class ReplicaGroup(InstanceSet):
    def __init__(self, runners: list[ModelRunner], cache: CacheConfig, scheduler: SchedulerConfig, tokenizer=None,
                 eos_token_ids: tuple[int, ...] = (), *, affinity_slack: int | None = None,
                 async_scheduling: bool = True):
        """One LLMEngine per runner (each runner on its own devices). affinity_slack: the most outstanding tokens
        a replica holding a request's adapter may carry beyond the least loaded replica and still get the
        request (None: max_num_batched_tokens). async_scheduling: each replica's engine's (LLMEngine)."""
        if not runners:
            raise ConfigError("a ReplicaGroup needs at least one runner")
        self.runners = runners
        self.runner = ReplicaRunners(runners)
        self.instances = [LLMEngine(r, cache, scheduler, tokenizer, eos_token_ids, async_scheduling)
                          for r in runners]
        self.cache_config, self.config, self.tokenizer = cache, scheduler, tokenizer
        self.affinity_slack = scheduler.max_num_batched_tokens if affinity_slack is None else affinity_slack
        self._pool = concurrent.futures.ThreadPoolExecutor(len(runners), thread_name_prefix="replica")
        self._in_flight: dict[int, concurrent.futures.Future] = {}  # replica -> its step on the device
        self._carried: list[RequestOutput] = []  # completed steps' outputs not yet returned by `step`
        self._failure: BaseException | None = None  # a step that failed while quiescing: raised by `step`
        self.runner.adapters.quiesce = self.quiesce
        super().__init__()

    @property
    def num_replicas(self) -> int:
        return len(self.instances)

    def close(self) -> None:
        """Stop the step threads (the group cannot step afterwards)."""
        self._in_flight.clear()
        self._pool.shutdown(wait=True)

    # ---- routing ----

    def load(self, replica: int) -> int:
        """Outstanding tokens of a replica's unfinished requests."""
        return sum(outstanding_tokens(r) for r in self.instances[replica].requests.values() if not r.finished)

    def has_affinity(self, replica: int, adapter: str | None) -> bool:
        """The adapter is resident in (or being loaded into) one of the replica's slots, or one of its unfinished
        requests uses it (so it will be)."""
        if adapter is None:
            return False
        inst = self.instances[replica]
        return adapter in inst.runner.adapters.slot_of or any(
            r.adapter == adapter and not r.finished for r in inst.requests.values())

    def route(self, adapter: str | None) -> int:
        """The replica a new request with this adapter goes to (module docstring: affinity within a load slack,
        else the least loaded; ties to the lowest index)."""
        loads = [self.load(r) for r in range(self.num_replicas)]
        least = min(range(self.num_replicas), key=lambda r: (loads[r], r))
        warm = [r for r in range(self.num_replicas) if self.has_affinity(r, adapter)]
        if warm:
            best = min(warm, key=lambda r: (loads[r], r))
            if loads[best] <= loads[least] + self.affinity_slack:
                return best
        return least

    # ---- requests ----

    def add_request(self, prompt_token_ids, params, adapter=None, request_id=None, arrival_time=None) -> str:
        """Queue a request on the replica `route` picks; ids are unique over the group."""
        request_id = self._request_id(request_id)
        if adapter is not None:
            self.runner.adapters.require(adapter)
        return self._queue(self.instances[self.route(adapter)], prompt_token_ids, params, adapter, request_id,
                           arrival_time)

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Start a step on every idle replica with work; return the outputs of the steps that have completed,
        waiting for at least one (module docstring)."""
        self._raise_failure()
        for r, inst in enumerate(self.instances):
            if r not in self._in_flight and inst.has_unfinished():
                self._in_flight[r] = self._pool.submit(inst.step)
        outputs, self._carried = self._carried, []
        if self._in_flight and not outputs:
            concurrent.futures.wait(self._in_flight.values(), return_when=concurrent.futures.FIRST_COMPLETED)
        outputs += self._collect(block=False)
        try:
            self._raise_failure()
        except BaseException:
            self._carried = outputs + self._carried
            raise
        return outputs

    def _collect(self, block: bool) -> list[RequestOutput]:
        """Outputs of the completed steps in flight (all of them, waiting, when `block`), in replica order; a
        failure is kept for `_raise_failure`, after the other steps in flight have completed."""
        outputs = []
        for r in sorted(self._in_flight):
            future = self._in_flight[r]
            if not (block or future.done()):
                continue
            del self._in_flight[r]
            try:
                outputs += future.result()
            except BaseException as e:  # noqa: BLE001 - raised by _raise_failure
                if self._failure is None:
                    self._failure = e
            else:
                self.num_steps += 1  # replica steps completed
        if self._failure is not None and self._in_flight:
            outputs += self._collect(block=True)
        return outputs

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def quiesce(self) -> None:
        """Wait for every step in flight; their outputs come with the next `step` (a failure is raised there)."""
        self._carried += self._collect(block=True)

    def has_unfinished(self) -> bool:
        return bool(self._in_flight or self._carried or self._failure) or super().has_unfinished()

    def _settled_instances(self) -> list[LLMEngine]:
        """The replicas not stepping now: a request that a step in flight finishes is returned by pop_finished
        once that step's outputs have been."""
        return [inst for i, inst in enumerate(self.instances) if i not in self._in_flight]

    def abort_all(self) -> list[str]:
        self.quiesce()
        return super().abort_all()

    def unload_adapter(self, name: str) -> None:
        self.quiesce()
        super().unload_adapter(name)

    # ---- compilation and teacher forcing ----

    def program_shapes(self, scoring: bool = False):
        return self.instances[0].program_shapes(scoring)

    def warmup(self, scoring: bool = False, progress: bool = True, workers: int = 8,
               run_programs: bool | None = None) -> int:
        """Compile every replica's step programs, and run each shape once where LLMEngine.warmup's
        `run_programs` says so (each replica's devices pay their own first-execution setup). Each replica's
        devices need their own executables, but on GPU jax's persistent compilation cache leaves the devices out
        of its keys: there, when the cache is on, the first replica compiles alone (with every replica's
        workers) and the others load its programs. Elsewhere all replicas compile at once with `workers`
        compilations each (XLA compiles outside the GIL, and one replica's compilations alone leave most of a
        large host's cores idle)."""
        self.quiesce()
        rest = self.instances  # those compiling at once
        if len(rest) > 1 and shares_compiled_programs(rest[0].runner.mesh.devices.flat[0]):
            shapes = rest[0].warmup(scoring, progress, workers * len(rest), run_programs)
            rest, progress = rest[1:], False
        futures = [self._pool.submit(inst.warmup, scoring, progress and i == 0, workers, run_programs)
                   for i, inst in enumerate(rest)]
        concurrent.futures.wait(futures)
        for future in futures:  # the first failure (in replica order) is raised
            shapes = future.result()
        return shapes

    def score(self, token_ids, adapter=None):
        self.quiesce()
        return self.instances[self.route(adapter)].score(token_ids, adapter)

    def prompt_logprobs(self, token_ids, adapter=None):
        self.quiesce()
        return self.instances[self.route(adapter)].prompt_logprobs(token_ids, adapter)


__all__ = ["ReplicaAdapters", "ReplicaGroup", "ReplicaRunners", "outstanding_tokens", "split_devices"]
