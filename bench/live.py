"""Replay agent programs against a running mesh through the Python client, and measure them.

The programs are the simulator's (:mod:`autellix.sim.generators` or a JSONL trace read by
:mod:`autellix.sim.trace`), with arrivals scaled to the rate exactly as ``autellix sim`` scales them,
so one workload, seed, program count and rate give the same programs in both. Each program:

- starts at its arrival time; a call is submitted when all its parents have completed plus its
  think time (a root: think time after the arrival); parallel calls (a fan-out) run concurrently;
- asks for exactly the trace's output tokens (``max_tokens`` with ``ignore_eos``);
- sends a prompt of the trace's token count for the ``sim`` backend (one token per whitespace-
  separated word): with context carrying, its context parent's prompt and answer followed by its own
  new input (a call-unique first word, then filler words of four characters with the space, so the
  scheduler's 4-characters-a-token estimate matches the count), cut to its most recent words when
  longer than the context window, as the simulator does;
- names its parents (``[]`` for a root) so ATLAS stamps the exact critical path.

Time: the ``sim`` backend runs the modelled GPU ``time_scale`` times real time; arrivals and think
times are scaled by the same factor here and every figure is divided by it, so figures are in
*modelled* seconds and compare with ``autellix sim``. The figures come from the simulator's own
:func:`autellix.sim.metrics.summarise` (steady state: first and last 10% of programs by arrival left
out), fed with what the client measured.

TTFT: with ``stream`` the client's own first-chunk time; without (the default, which spares the
CPU one message per token) the client's submit-to-final time minus the engine's first-token-to-
final time (``total_s - ttft_s`` in the final message; one clock, one machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autellix.engine.core import CoreConfig
from autellix.engine.cost_model import CostModel, llama31_8b_h100
from autellix.engine.factory import BackendSpec
from autellix.engine.sim_backend import SimBackend
from autellix.policy.mlfq import MultiLevelQueues
from autellix.proto import CallRequest
from autellix.services.client import CallFailed, CallResult, CallStream, Client
from autellix.services.engine.config import EngineConfig
from autellix.services.local_mesh import LocalMesh
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.tracker.config import TrackerConfig
from autellix.sim.engine_model import SIM_SCHEDULE_EVERY
from autellix.sim.metrics import summarise
from autellix.sim.simulator import CallRecord, ProgramResult, SimConfig, SimResult
from autellix.sim.sweep import WorkloadSource, unit_rate_programs
from autellix.sim.workload import ProgramSpec, scaled_arrivals

FILLER = "www"

#: KV memory per variant (the simulator's ``--memory`` names): the engines' retention order, their CPU tier
#: size in multiples of the KV capacity, and whether the schedulers' door admits new programs by working set
#: (with its spill gate, as deployed). ``lru`` is LRU with no tier and no door (the old behaviour); ``retain``
#: the program-aware order (contained, ended programs', LRU); ``tier`` that plus a CPU tier of 4x the budget;
#: ``door`` LRU behind the door; ``all`` the tier and the door: what ``autellix up`` runs.
MEMORY_VARIANTS: dict[str, tuple[str, float, bool]] = {
    "lru": ("lru", 0.0, False),
    "retain": ("program", 0.0, False),
    "tier": ("program", 4.0, False),
    "door": ("lru", 0.0, True),
    "all": ("program", 4.0, True),
}


def load_programs(workload: str, programs: int, seed: int, think_scale: float = 1.0) -> list[ProgramSpec]:
    """The simulator's programs for ``workload`` (a generator name or a trace path) at unit rate."""
    return unit_rate_programs(WorkloadSource(name=workload, programs=programs, seed=seed, think_scale=think_scale))


def at_rate(programs: Sequence[ProgramSpec], rate: float) -> list[ProgramSpec]:
    """Arrivals scaled to ``rate`` programs/s, exactly as the simulator's sweep does."""
    return scaled_arrivals(programs, 1.0 / rate)


def _marker(index: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        index, r = divmod(index, 36)
        out = digits[r] + out
        if index == 0:
            break
    return "q" + out.rjust(2, "0")


def new_input(index: int, tokens: int) -> str:
    """``tokens`` words: a marker unique within the program, then filler."""
    return " ".join([_marker(index)] + [FILLER] * (tokens - 1))


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    #: the engines' sim time scale: real seconds per modelled second
    time_scale: float = 1.0
    carry_context: bool = True
    #: longest prompt + output, as the simulator's ``max_context``
    max_context: int = 131_072
    stream: bool = False
    timeout_s: float = 600.0
    #: steady state, as in the simulator
    warmup: float = 0.1
    drain: float = 0.1


@dataclass(slots=True)
class _CallOutcome:
    submit: float
    first: float
    finish: float
    result: CallResult


@dataclass(slots=True)
class ReplayOutcome:
    """What the client saw, in real seconds from the replay's start (``t0``)."""

    programs: list[ProgramSpec]
    records: list[ProgramResult | None]
    calls: list[CallRecord]
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    finals: list[Any] = field(default_factory=list)


class Replayer:
    def __init__(
        self,
        client: Client,
        programs: Sequence[ProgramSpec],
        config: ReplayConfig,
        tag: str | None = None,
        on_program: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.programs = sorted(programs, key=lambda p: p.arrival_s)
        self.config = config
        self.tag = tag or uuid.uuid4().hex[:6]
        self.on_program = on_program
        self.t0 = 0.0
        self.outcome = ReplayOutcome(self.programs, [None] * len(self.programs), [])

    def _since(self, t: float) -> float:
        """Real perf-counter time -> modelled seconds since the start."""
        scale = self.config.time_scale
        return (t - self.t0) / scale if scale > 0 else t - self.t0

    async def run(self) -> ReplayOutcome:
        self.t0 = time.perf_counter()
        started = time.perf_counter()
        await asyncio.gather(*(self._program(i, p) for i, p in enumerate(self.programs)))
        self.outcome.wall_s = time.perf_counter() - started
        return self.outcome

    async def _sleep_until(self, modelled_s: float) -> None:
        delay = self.t0 + modelled_s * self.config.time_scale - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _program(self, index: int, spec: ProgramSpec) -> None:
        await self._sleep_until(spec.arrival_s)
        cfg = self.config
        program = self.client.program(f"{self.tag}-{spec.program_id}")
        done: dict[str, asyncio.Future[_CallOutcome]] = {
            c.call_id: asyncio.get_running_loop().create_future() for c in spec.calls
        }
        prompts: dict[str, tuple[str, int]] = {}  # call id -> (full prompt text, words)
        answers: dict[str, tuple[str, int]] = {}  # call id -> (answer text, tokens)

        async def one(i: int) -> None:
            c = spec.calls[i]
            fut = done[c.call_id]
            try:
                if c.parents:
                    await asyncio.gather(*(done[p] for p in c.parents))
                    await asyncio.sleep(c.think_s * cfg.time_scale)
                else:
                    await self._sleep_until(spec.arrival_s + c.think_s)
                text, words = new_input(i, c.new_prompt_tokens), c.new_prompt_tokens
                if cfg.carry_context and c.context_parent is not None:
                    ptext, pwords = prompts[c.context_parent]
                    atext, atokens = answers[c.context_parent]
                    text, words = f"{ptext}{atext} {text}", pwords + atokens + words
                limit = max(1, cfg.max_context - c.output_tokens)
                if words > limit:  # as chat front-ends truncate: keep the most recent tokens
                    text, words = " ".join(text.split()[-limit:]), limit
                prompts[c.call_id] = (text, words)
                outcome = await self._call(program.program_id, f"{program.program_id}-{c.call_id}", c, text)
                answers[c.call_id] = (outcome.result.text, outcome.result.output_tokens)
                fut.set_result(outcome)
            except CallFailed as exc:
                self.outcome.errors[exc.code] += 1
                fut.set_exception(exc)
            except BaseException as exc:  # a parent failed, or we were cancelled
                fut.set_exception(exc if isinstance(exc, Exception) else CallFailed(c.call_id, "cancelled", ""))
                if not isinstance(exc, Exception):
                    raise

        await asyncio.gather(*(one(i) for i in range(len(spec.calls))), return_exceptions=True)
        outcomes: list[_CallOutcome] = []
        failed = False
        for c in spec.calls:
            fut = done[c.call_id]
            if fut.exception() is not None:
                failed = True
            else:
                outcomes.append(fut.result())
        for o in outcomes:
            final = o.result.final
            scale = cfg.time_scale if cfg.time_scale > 0 else 1.0
            self.outcome.calls.append(
                CallRecord(
                    program_index=index,
                    submit_s=self._since(o.submit),
                    first_token_s=self._since(o.first),
                    finish_s=self._since(o.finish),
                    output_tokens=o.result.output_tokens,
                    queue_wait_s=final.queue_wait_s / scale,
                    service_s=final.service_s / scale,
                    preemptions=final.preemptions,
                    cached_tokens=0,
                    prompt_tokens=o.result.prompt_tokens,
                )
            )
            self.outcome.finals.append(final)
        if not failed:
            scale = cfg.time_scale if cfg.time_scale > 0 else 1.0
            self.outcome.records[index] = ProgramResult(
                program_id=spec.program_id,
                kind=spec.kind,
                arrival_s=spec.arrival_s,
                finish_s=max(self._since(o.finish) for o in outcomes),
                output_tokens=sum(o.result.output_tokens for o in outcomes),
                n_calls=len(outcomes),
                first_token_s=min(self._since(o.first) for o in outcomes),
                program_wait_s=sum(o.result.final.queue_wait_s for o in outcomes) / scale,
                program_service_s=sum(o.result.final.service_s for o in outcomes) / scale,
            )
        with contextlib.suppress(Exception):
            await program.end()
        if self.on_program is not None:
            self.on_program(not failed)

    async def _call(self, program_id: str, call_id: str, c: Any, text: str) -> _CallOutcome:
        cfg = self.config
        parents = [f"{program_id}-{p}" for p in c.parents]
        request = CallRequest(
            program_id=program_id,
            call_id=call_id,
            prompt=text,
            max_tokens=c.output_tokens,
            ignore_eos=True,
            parents=parents,
            stream=cfg.stream,
        )
        submit = time.perf_counter()
        async with CallStream(self.client, request, cfg.timeout_s) as stream:
            result = await stream.collect()
        finish = time.perf_counter()
        if cfg.stream:
            first = submit + result.ttft_s
        else:
            final = result.final
            first = finish - max(0.0, final.total_s - final.ttft_s)
            first = min(max(first, submit), finish)
        return _CallOutcome(submit, first, finish, result)


def figures(
    outcome: ReplayOutcome,
    config: ReplayConfig,
    policy: str,
    engines: int,
    engine_stats: list[dict[str, float]] | None = None,
    boundaries: Sequence[float] = (),
) -> dict[str, Any]:
    """The simulator's figures (:func:`autellix.sim.metrics.summarise`) for a live replay, plus the
    counts only a live run has (errors, calls and programs completed)."""
    records = [r for r in outcome.records if r is not None]
    # summarise indexes calls by program position among the completed programs
    position = {id(r): i for i, r in enumerate(records)}
    index_map = {i: position[id(r)] for i, r in enumerate(outcome.records) if r is not None}
    calls = [
        replace(c, program_index=index_map[c.program_index]) for c in outcome.calls if c.program_index in index_map
    ]
    stats = engine_stats
    if stats is None:  # from the finals: no prefix-cache figures through the wire
        per: dict[str, dict[str, float]] = {}
        for f in outcome.finals:
            s = per.setdefault(f.engine_id, {"prompt_tokens": 0, "cache_hit_tokens": 0, "preemptions": 0, "swap_s": 0})
            s["prompt_tokens"] += f.prompt_tokens
            s["preemptions"] += f.preemptions
            s["swap_s"] += f.swap_s / (config.time_scale or 1.0)
        stats = list(per.values()) or [{"prompt_tokens": 0, "cache_hit_tokens": 0, "preemptions": 0, "swap_s": 0}]
    out: dict[str, Any] = {
        "programs_offered": len(outcome.programs),
        "programs_completed": len(records),
        "programs_failed": len(outcome.programs) - len(records),
        "calls_offered": sum(len(p.calls) for p in outcome.programs),
        "calls_completed": len(outcome.calls),
        "errors": sum(outcome.errors.values()),
        "errors_by_code": dict(outcome.errors),
        "real_wall_s": outcome.wall_s,
        "time_scale": config.time_scale,
    }
    if not records:
        return out
    sim_like = SimResult(
        config=SimConfig(policy=policy, engines=engines),
        programs=records,
        calls=calls,
        makespan_s=max(r.finish_s for r in records),
        wall_s=outcome.wall_s,
        engine_stats=stats,
        boundaries=tuple(boundaries),
    )
    out.update(summarise(sim_like, config.warmup, config.drain))
    if engine_stats is None:
        out["prefix_hit_rate"] = None  # not reported through the wire
    return out


# -- an in-process mesh ------------------------------------------------------------------------
@dataclass
class SimMesh(LocalMesh):
    """A :class:`LocalMesh` of sim engines, with their backends' figures."""

    policy: str = "plas"
    backends: list[SimBackend] = field(default_factory=list)
    url: str = ""

    def engine_stats(self) -> list[dict[str, float]]:
        stats = []
        for e, b in zip(self.engines, self.backends, strict=True):
            cache = b.cache_stats()
            core = e.core
            stats.append(
                {
                    "prompt_tokens": cache.prompt_tokens,
                    "cache_hit_tokens": cache.hit_tokens,
                    "tier_hit_tokens": cache.tier_hit_tokens,
                    "preemptions": core.total_preemptions if core is not None else 0,
                    "swap_s": 0.0,
                    "steps": b.stat_steps,
                }
            )
        return stats

    def boundaries(self, time_scale: float) -> list[float]:
        core = self.engines[0].core
        q = core.queue if core is not None else None
        if isinstance(q, MultiLevelQueues):
            return [b / (time_scale or 1.0) for b in q.boundaries]
        return []


async def start_local_mesh(
    url: str,
    policy: str,
    engines: int,
    time_scale: float,
    cost: CostModel | None = None,
    balancer: str = "locality",
    schedule_every: int = SIM_SCHEDULE_EVERY,
    pace: bool = True,
    root: str | None = None,
    memory: str = "lru",
) -> SimMesh:
    """Tracker, scheduler and ``engines`` sim engines in this process, on ``url``, every service
    set to ``policy``; the engines' limits are the cost model's (as in the simulator), their KV
    memory one of :data:`MEMORY_VARIANTS`."""
    if memory not in MEMORY_VARIANTS:
        raise ValueError(f"unknown memory variant {memory!r}; expected one of {', '.join(MEMORY_VARIANTS)}")
    retention, tier_scale, door = MEMORY_VARIANTS[memory]
    cost = cost or llama31_8b_h100()
    nats = NatsConfig.at(url, root or f"bench{uuid.uuid4().hex[:8]}")
    tier_tokens = int(tier_scale * cost.kv_capacity_tokens)
    spec = BackendSpec(
        name="sim", max_batch=cost.max_batch, kv_capacity_tokens=cost.kv_capacity_tokens, sim_time_scale=time_scale,
        retention=retention, kv_tier_tokens=tier_tokens,
    )
    backends = [
        SimBackend(cost, time_scale=time_scale, pace=pace, retention=retention, tier_tokens=tier_tokens)  # type: ignore[arg-type]
        for _ in range(engines)
    ]
    core = CoreConfig(
        max_batched_tokens=cost.max_batched_tokens, policy=policy, schedule_every=schedule_every, preempt_mode="swap"
    )
    local = LocalMesh.of(
        tracker=TrackerConfig(nats=nats, gc_interval_s=1.0, persist=False),
        scheduler=SchedulerConfig(
            nats=nats, policy=policy, balancer=balancer, max_tokens_ceiling=cost.max_context, door=door
        ),
        engines=[
            EngineConfig(nats=nats, engine_id=f"engine-{i}-{nats.root}", backend=spec, core=core, heartbeat_s=0.25)
            for i in range(engines)
        ],
        backends=backends,
    )
    mesh = SimMesh(local.tracker, local.scheduler, local.engines, policy=policy, backends=backends, url=url)
    try:
        await mesh.start()
    except BaseException:
        await mesh.stop()
        raise
    return mesh


@dataclass(frozen=True, slots=True)
class PointSpec:
    policy: str
    rate: float


async def run_point(
    url: str,
    root: str | None,
    programs_unit: Sequence[ProgramSpec],
    point: PointSpec,
    config: ReplayConfig,
    engines: int,
    local: bool,
    cost: CostModel | None = None,
    on_program: Callable[[bool], None] | None = None,
    pace: bool = True,
    balancer: str = "locality",
    memory: str = "lru",
) -> dict[str, Any]:
    """Replay the programs at ``point.rate``: on a fresh in-process mesh set to ``point.policy``
    and ``memory`` (``local``), or on the mesh already running at ``url``/``root``."""
    programs = at_rate(programs_unit, point.rate)
    mesh: SimMesh | None = None
    if local:
        mesh = await start_local_mesh(
            url, point.policy, engines, config.time_scale, cost=cost, pace=pace, balancer=balancer, memory=memory
        )
        root = mesh.root
    client = await Client.connect(url, root=root or "autellix", timeout_s=config.timeout_s, ack_timeout_s=30.0)
    try:
        outcome = await Replayer(client, programs, config, on_program=on_program).run()
    finally:
        await client.close()
        if mesh is not None:
            stats, bounds = mesh.engine_stats(), mesh.boundaries(config.time_scale)
            await mesh.stop()
    figs = figures(
        outcome, config, point.policy, engines,
        engine_stats=stats if mesh is not None else None,
        boundaries=bounds if mesh is not None else (),
    )
    return {"balancer": balancer, "policy": point.policy, "memory": memory, "rate": point.rate, **figs}


def simulate_point(
    programs_unit: Sequence[ProgramSpec], policy: str, rate: float, engines: int, config: ReplayConfig,
    cost: CostModel | None = None, schedule_every: int = SIM_SCHEDULE_EVERY, balancer: str = "locality",
    memory: str = "lru",
) -> dict[str, Any]:
    """The same point in the simulator (``autellix sim``'s own code path)."""
    if memory != "lru":
        raise ValueError(f"the simulator here models only the lru memory variant, not {memory!r}")
    from autellix.sim.sweep import SweepPoint
    from autellix.sim.sweep import run_point as sim_run_point

    base = SimConfig(
        policy=policy, engines=engines, cost=cost or llama31_8b_h100(), carry_context=config.carry_context,
        schedule_every=schedule_every, balancer=balancer,
    )
    return sim_run_point(programs_unit, base, SweepPoint(balancer, policy, rate), config.warmup, config.drain)


AGREEMENT_KEYS = (
    "latency_s_mean", "latency_s_p50", "latency_s_p95", "latency_s_p99",
    "token_latency_s_mean", "token_latency_s_p50", "token_latency_s_p99",
    "ttft_s_mean", "ttft_s_p50", "ttft_s_p99",
    "throughput_programs_s", "throughput_tokens_s", "prefix_hit_rate",
)


def agreement(live: dict[str, Any], sim: dict[str, Any]) -> dict[str, float | None]:
    """live / sim for each headline figure."""
    out: dict[str, float | None] = {}
    for k in AGREEMENT_KEYS:
        a, b = live.get(k), sim.get(k)
        ok = isinstance(a, int | float) and isinstance(b, int | float) and b and math.isfinite(a) and math.isfinite(b)
        out[k] = float(a) / float(b) if ok else None  # type: ignore[arg-type]
    return out
