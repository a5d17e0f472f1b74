"""Steady-state figures of one simulation run.

**Steady state.** Programs are ranked by arrival; the first ``warmup`` fraction (default 10%) and
the last ``drain`` fraction (10%) are discarded: the first arrive at an empty system, the last see
the load fall away as arrivals stop. The simulation still runs until every program has finished, so
the measured programs' latencies are complete and include the load that later arrivals put on
them. Rates (throughput, offered load) are counted inside the *measurement window*: from the first
measured program's arrival to the last one's.

**Program-level token latency** (the paper's metric): a program's response time (arrival to its
last call's completion; for a DAG that is its critical path) divided by all the tokens it
generated. TTFT is per call: submission to first token.

**Stable**: tokens served in the window reach 90% of the tokens offered in it (output tokens of
the programs arriving in the window per second). An unstable run's latencies grow with the run's
length: beyond that rate a finite run understates them.

**Keeps up** (stricter; what ``autellix sim --capacity`` bisects on), both of:

- *served*: the output tokens served in the window shifted by the measured programs' mean latency
  ``L`` (``[t0 + L, t1 + L]``) reach 95% of those offered in ``[t0, t1]``: work offered in the window
  is served about ``L`` later, so long programs straddling the window's end do not count against a
  run that keeps up, while a run past its capacity serves at most its capacity in any window;
- *no growing backlog*: the mean program latency of the programs arriving in the window's last
  quarter is at most 1.5 x that of the programs arriving in its first half (past capacity the queue,
  and with it the latency, grows for as long as arrivals last; below it the two agree within noise).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from autellix.sim.simulator import SimResult

STABLE_SERVED_FRACTION = 0.9
KEEPS_UP_SERVED_FRACTION = 0.95
LATENCY_GROWTH_FACTOR = 1.5


def _stats(values: np.ndarray, prefix: str) -> dict[str, float]:
    if values.size == 0:
        return {f"{prefix}_{k}": math.nan for k in ("mean", "p50", "p95", "p99")}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_p50": float(p50),
        f"{prefix}_p95": float(p95),
        f"{prefix}_p99": float(p99),
    }


def measured_slice(n: int, warmup: float, drain: float) -> tuple[int, int]:
    """Indices ``[lo, hi)`` of the measured programs among ``n`` ranked by arrival."""
    if not (0.0 <= warmup < 1.0 and 0.0 <= drain < 1.0 and warmup + drain < 1.0):
        raise ValueError(f"warmup ({warmup}) and drain ({drain}) must be fractions summing below 1")
    lo = math.floor(warmup * n)
    hi = n - math.floor(drain * n)
    return lo, max(hi, lo + 1)


def backlog_mean(programs: list[Any], a: float, b: float, samples: int = 64) -> float:
    """Time average of the programs in the system (arrived, not finished) over ``[a, b]``."""
    arrivals = np.sort(np.array([p.arrival_s for p in programs]))
    finishes = np.sort(np.array([p.finish_s for p in programs]))
    ts = np.linspace(a, b, samples)
    n = np.searchsorted(arrivals, ts, side="right") - np.searchsorted(finishes, ts, side="right")
    return float(n.mean())


def summarise(result: SimResult, warmup: float = 0.1, drain: float = 0.1) -> dict[str, Any]:
    programs = sorted(result.programs, key=lambda p: p.arrival_s)
    lo, hi = measured_slice(len(programs), warmup, drain)
    measured = programs[lo:hi]
    arrival_index = {p.program_id: i for i, p in enumerate(result.programs)}
    chosen = {arrival_index[p.program_id] for p in measured}
    t0, t1 = measured[0].arrival_s, measured[-1].arrival_s
    span = t1 - t0

    latency = np.array([p.finish_s - p.arrival_s for p in measured])
    token_latency = latency / np.array([max(1, p.output_tokens) for p in measured])
    ttft = np.array([c.first_token_s - c.submit_s for c in result.calls if c.program_index in chosen])
    out: dict[str, Any] = {"programs": len(programs), "measured_programs": len(measured)}
    out.update(_stats(latency, "latency_s"))
    out.update(_stats(token_latency, "token_latency_s"))
    out.update(_stats(ttft, "ttft_s"))

    if span > 0:
        finished = sum(1 for p in programs if t0 <= p.finish_s <= t1)
        served = sum(c.output_tokens for c in result.calls if t0 <= c.finish_s <= t1)
        offered = sum(p.output_tokens for p in programs if t0 <= p.arrival_s <= t1)
        out["throughput_programs_s"] = finished / span
        out["throughput_tokens_s"] = served / span
        out["offered_tokens_s"] = offered / span
        out["stable"] = bool(served >= STABLE_SERVED_FRACTION * offered)
        lag = float(latency.mean())
        shifted = sum(c.output_tokens for c in result.calls if t0 + lag <= c.finish_s <= t1 + lag)
        early = [p.finish_s - p.arrival_s for p in measured if p.arrival_s <= t0 + 0.5 * span]
        late = [p.finish_s - p.arrival_s for p in measured if p.arrival_s >= t0 + 0.75 * span]
        growth = float(np.mean(late) / np.mean(early)) if early and late and np.mean(early) > 0 else 1.0
        out["served_fraction"] = shifted / offered if offered else 1.0
        out["latency_growth"] = growth
        out["backlog_q3"] = backlog_mean(programs, t0 + 0.5 * span, t0 + 0.75 * span)
        out["backlog_q4"] = backlog_mean(programs, t0 + 0.75 * span, t1)
        out["keeps_up"] = bool(
            shifted >= KEEPS_UP_SERVED_FRACTION * offered and growth <= LATENCY_GROWTH_FACTOR
        )
    else:
        out.update(throughput_programs_s=math.nan, throughput_tokens_s=math.nan, offered_tokens_s=math.nan)
        out.update(served_fraction=1.0, latency_growth=1.0, backlog_q3=0.0, backlog_q4=0.0)
        out["stable"] = True
        out["keeps_up"] = True

    wait = sum(p.program_wait_s for p in measured)
    service = sum(p.program_service_s for p in measured)
    out["wait_fraction"] = wait / (wait + service) if wait + service > 0 else 0.0
    stats = result.engine_stats
    prompt = sum(s["prompt_tokens"] for s in stats)
    out["prefix_hit_rate"] = sum(s["cache_hit_tokens"] for s in stats) / prompt if prompt else 0.0
    out["preemptions"] = int(sum(s["preemptions"] for s in stats))
    busy = sum(s.get("busy_s", 0.0) for s in stats)
    out["evicted_active_tokens"] = int(sum(s.get("evicted_active_tokens", 0) for s in stats))
    out["tier_in_tokens"] = int(sum(s.get("tier_in_tokens", 0) for s in stats))
    out["tier_out_tokens"] = int(sum(s.get("tier_out_tokens", 0) for s in stats))
    out["tier_busy_fraction"] = sum(s.get("tier_s", 0.0) for s in stats) / busy if busy > 0 else 0.0
    #: PCIe time the overlapped copies out took, relative to busy time (must stay well below 1)
    out["tier_out_busy_fraction"] = sum(s.get("tier_out_s", 0.0) for s in stats) / busy if busy > 0 else 0.0
    door = np.array([p.door_wait_s for p in measured])
    out["door_wait_s_mean"] = float(door.mean())
    out["door_wait_s_p99"] = float(np.percentile(door, 99))
    out["door_held_fraction"] = float((door > 0).mean())
    out["swap_s"] = float(sum(s["swap_s"] for s in stats))
    out["makespan_s"] = result.makespan_s
    out["wall_s"] = result.wall_s
    out["boundaries_s"] = list(result.boundaries)
    by_kind: dict[str, list[float]] = {}
    for p, tl in zip(measured, token_latency, strict=True):
        by_kind.setdefault(p.kind or "-", []).append(float(tl))
    out["token_latency_mean_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
    return out
