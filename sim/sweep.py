"""Run a grid of (balancer, policy, rate) simulations, serially or on several processes.

All points of a sweep replay the *same* programs; only the arrival times are scaled to each rate
(common random numbers: differences between policies are not sampling noise between workloads).
Workloads come as a :class:`WorkloadSource`: a generator name or a JSONL trace, turned into
programs at unit rate (:func:`unit_rate_programs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from autellix.sim.generators import WORKLOAD_NAMES, generate
from autellix.sim.metrics import summarise
from autellix.sim.simulator import SimConfig, simulate
from autellix.sim.trace import read_trace
from autellix.sim.workload import ProgramSpec, scaled_arrivals


@dataclass(frozen=True, slots=True)
class WorkloadSource:
    """A generator (``name`` in WORKLOAD_NAMES) or a trace path; ``programs`` caps a trace."""

    name: str
    programs: int = 1000
    seed: int = 0
    think_scale: float = 1.0

    @property
    def is_trace(self) -> bool:
        return self.name not in WORKLOAD_NAMES


def unit_rate_programs(source: WorkloadSource) -> list[ProgramSpec]:
    """The source's programs with arrivals at a mean rate of one program per second.

    Generated workloads are Poisson at rate 1. A trace keeps its own arrival pattern, its gaps
    rescaled to a mean of 1 s; a trace without arrival times (all equal) gets Poisson arrivals.
    """
    if not source.is_trace:
        return generate(source.name, source.programs, source.seed, source.think_scale)
    programs = read_trace(source.name)[: source.programs]
    first, last = programs[0].arrival_s, programs[-1].arrival_s
    if len(programs) > 1 and last > first:
        scale = (len(programs) - 1) / (last - first)
        return [replace(p, arrival_s=(p.arrival_s - first) * scale) for p in programs]
    gaps = np.cumsum(np.random.default_rng([source.seed, 1]).exponential(1.0, len(programs))).tolist()
    return [replace(p, arrival_s=float(t)) for p, t in zip(programs, gaps, strict=True)]


@dataclass(frozen=True, slots=True)
class SweepPoint:
    balancer: str
    policy: str
    rate: float
    memory: str = "lru"


_WORKER_PROGRAMS: list[ProgramSpec] = []


def _init_worker(source: WorkloadSource) -> None:
    _WORKER_PROGRAMS[:] = unit_rate_programs(source)


def run_point(
    programs: Sequence[ProgramSpec], base: SimConfig, point: SweepPoint, warmup: float, drain: float
) -> dict[str, Any]:
    config = replace(base, policy=point.policy, balancer=point.balancer, memory=point.memory)
    result = simulate(scaled_arrivals(programs, 1.0 / point.rate), config)
    figures = summarise(result, warmup, drain)
    return {
        "balancer": point.balancer,
        "policy": point.policy,
        "memory": point.memory,
        "variant": variant_name(point.policy, point.memory),
        "rate": point.rate,
        **figures,
    }


def variant_name(policy: str, memory: str) -> str:
    """``plas`` with the default memory (``lru``), else ``plas+tier``: the name the analysis uses."""
    return policy if memory == "lru" else f"{policy}+{memory}"


def _run_in_worker(args: tuple[SimConfig, SweepPoint, float, float]) -> dict[str, Any]:
    base, point, warmup, drain = args
    return run_point(_WORKER_PROGRAMS, base, point, warmup, drain)


def sweep_points(
    balancers: Iterable[str], policies: Iterable[str], rates: Iterable[float], memories: Iterable[str] = ("lru",)
) -> list[SweepPoint]:
    memories = list(memories)
    return [SweepPoint(b, p, r, m) for b in balancers for p in policies for m in memories for r in rates]


def run_sweep(
    source: WorkloadSource,
    base: SimConfig,
    points: Sequence[SweepPoint],
    *,
    warmup: float = 0.1,
    drain: float = 0.1,
    jobs: int = 1,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Simulate every point; results come back in ``points`` order."""
    results: list[dict[str, Any] | None] = [None] * len(points)
    if jobs <= 1 or len(points) <= 1:
        programs = unit_rate_programs(source)
        for i, point in enumerate(points):
            results[i] = run_point(programs, base, point, warmup, drain)
            if on_done:
                on_done(results[i])  # type: ignore[arg-type]
    else:
        # longest points first (higher rates and preemptive policies run longer), for balance
        order = sorted(range(len(points)), key=lambda i: -points[i].rate)
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(source,)) as pool:
            futures = {i: pool.submit(_run_in_worker, (base, points[i], warmup, drain)) for i in order}
            for i in order:
                results[i] = futures[i].result()
                if on_done:
                    on_done(results[i])  # type: ignore[arg-type]
    return [r for r in results if r is not None]
