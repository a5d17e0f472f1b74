"""Highest stable arrival rate of each (policy, memory) variant, found by bisection.

Why: a latency curve swept over a fixed grid credits rates a run cannot actually carry (its
backlog grows for as long as arrivals last and a finite run understates the latency). Capacity here
is the highest rate at which a run **keeps up** with its load (:mod:`autellix.sim.metrics`: at
least 95% of the offered output tokens served in the measurement window, and a backlog that does
not grow over the window's second half). Stability is assumed monotone in the rate.

Per variant, in order:

1. **capacity**: bracket (multiply the rate by ``step`` from a start until a run fails to keep up,
   or divide until one keeps up), then bisect geometrically until the bracket is within ``tol``;
   the figure is the highest rate that kept up. ``fcfs`` + ``lru`` goes first and its capacity
   seeds the others' brackets.
2. **sustainable rate at each latency target** (``10x`` = ten times ``fcfs`` + ``lru``'s mean
   program token latency at ``baseline_fraction`` of its capacity): the highest rate that keeps
   up *and* stays under the target, by the same bisection, below the capacity.
3. **do no harm**: mean and p99 program latency at fractions of ``fcfs`` + ``lru``'s capacity,
   as ratios to ``fcfs`` + ``lru`` at the same rates (same programs, only arrivals scaled).

Every run is kept (variant, rate, every figure) for the JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from autellix.sim.simulator import SimConfig
from autellix.sim.sweep import SweepPoint, run_point, variant_name
from autellix.sim.workload import ProgramSpec

BASELINE = ("fcfs", "lru")


@dataclass(frozen=True, slots=True)
class CapacityConfig:
    #: bisection stops when hi / lo <= 1 + tol
    tol: float = 0.03
    #: bracket growth factor
    step: float = 1.5
    #: first rate tried for fcfs + lru; None: offered output tokens of 500/s
    start_rate: float | None = None
    #: at most this many runs per bisection (a bracket that cannot be found gives up)
    max_runs: int = 14
    baseline_fraction: float = 0.1
    #: latency-target multiples of the baseline token latency
    targets: tuple[float, ...] = (10.0,)
    #: fractions of fcfs + lru's capacity where the latencies are compared
    harm_fractions: tuple[float, ...] = (0.5, 0.9)
    warmup: float = 0.1
    drain: float = 0.1


class CapacitySearch:
    """Runs the simulations (memoised by variant and rate) and records each."""

    def __init__(
        self,
        programs: Sequence[ProgramSpec],
        base: SimConfig,
        config: CapacityConfig,
        on_run: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.programs = programs
        self.base = base
        self.config = config
        self.on_run = on_run
        self.runs: list[dict[str, Any]] = []
        self._memo: dict[tuple[str, str, float], dict[str, Any]] = {}

    def run(self, policy: str, memory: str, rate: float) -> dict[str, Any]:
        key = (policy, memory, round(rate, 12))
        if key not in self._memo:
            point = SweepPoint(self.base.balancer, policy, rate, memory)
            out = run_point(self.programs, self.base, point, self.config.warmup, self.config.drain)
            self._memo[key] = out
            self.runs.append(out)
            if self.on_run:
                self.on_run(out)
        return self._memo[key]

    def highest(
        self, policy: str, memory: str, start: float, ok: Callable[[dict[str, Any]], bool], ceiling: float = math.inf
    ) -> dict[str, Any]:
        """The highest rate whose run satisfies ``ok`` (bracket, then bisect); ``ceiling`` is known to fail."""
        cfg = self.config
        runs = 0
        lo: float | None = None
        hi: float | None = ceiling if math.isfinite(ceiling) else None
        rate = start if hi is None or start < hi else hi / cfg.step
        while lo is None or hi is None:
            if runs >= cfg.max_runs:
                return {"rate": lo or 0.0, "bracket": [lo, hi], "runs": runs, "bounded": "lower" if lo else "upper"}
            runs += 1
            if ok(self.run(policy, memory, rate)):
                lo = rate
                rate *= cfg.step
                if hi is not None and rate >= hi:
                    rate = math.sqrt(lo * hi)
            else:
                hi = rate
                rate /= cfg.step
        while hi / lo > 1.0 + cfg.tol and runs < cfg.max_runs:
            runs += 1
            mid = math.sqrt(lo * hi)
            if ok(self.run(policy, memory, mid)):
                lo = mid
            else:
                hi = mid
        return {"rate": lo, "bracket": [lo, hi], "runs": runs, "bounded": None}


def default_start_rate(programs: Sequence[ProgramSpec], tokens_s: float = 500.0) -> float:
    mean = sum(p.output_tokens for p in programs) / len(programs)
    return tokens_s / max(mean, 1.0)


def find_capacities(
    programs: Sequence[ProgramSpec],
    base: SimConfig,
    policies: Sequence[str],
    memories: Sequence[str],
    config: CapacityConfig | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every variant's capacity, sustainable rates and latency ratios (see the module docstring)."""
    cfg = config or CapacityConfig()
    search = CapacitySearch(programs, base, cfg, on_run)
    variants = [BASELINE] + [(p, m) for p in policies for m in memories if (p, m) != BASELINE]

    def keeps_up(p: dict[str, Any]) -> bool:
        return bool(p["keeps_up"])

    start = cfg.start_rate or default_start_rate(programs)
    base_cap = search.highest(*BASELINE, start, keeps_up)
    cap0 = base_cap["rate"]
    out: dict[str, Any] = {"variants": {}, "baseline_variant": variant_name(*BASELINE)}
    if cap0 <= 0:
        out["error"] = "fcfs + lru kept up at no rate tried"
        out["runs"] = search.runs
        return out
    light = search.run(*BASELINE, cap0 * cfg.baseline_fraction)
    baseline_latency = light["token_latency_s_mean"]
    out["baseline_rate"] = cap0 * cfg.baseline_fraction
    out["baseline_token_latency_s"] = baseline_latency
    for policy, memory in variants:
        name = variant_name(policy, memory)
        cap = base_cap if (policy, memory) == BASELINE else search.highest(policy, memory, cap0, keeps_up)
        entry: dict[str, Any] = {
            "policy": policy,
            "memory": memory,
            "capacity": cap,
            "capacity_ratio": cap["rate"] / cap0,
            "targets": {},
            "at_fractions": {},
        }
        at_cap = search.run(policy, memory, cap["rate"]) if cap["rate"] > 0 else None
        if at_cap is not None:
            entry["at_capacity"] = {k: at_cap[k] for k in _SHOWN}
        for mult in cfg.targets:
            target = mult * baseline_latency

            def under(p: dict[str, Any], target: float = target) -> bool:
                return bool(p["keeps_up"]) and p["token_latency_s_mean"] <= target

            ceiling = cap["bracket"][1] if cap["bracket"][1] is not None else math.inf
            found = search.highest(policy, memory, cap["rate"], under, ceiling=ceiling)
            entry["targets"][f"{mult:g}x"] = {"token_latency_s": target, **found}
        for f in cfg.harm_fractions:
            rate = f * cap0
            mine, ref = search.run(policy, memory, rate), search.run(*BASELINE, rate)
            entry["at_fractions"][f"{f:g}"] = {
                "rate": rate,
                "keeps_up": mine["keeps_up"],
                "latency_s_mean": mine["latency_s_mean"],
                "latency_s_p99": mine["latency_s_p99"],
                "mean_ratio": mine["latency_s_mean"] / ref["latency_s_mean"],
                "p99_ratio": mine["latency_s_p99"] / ref["latency_s_p99"],
                "door_wait_s_mean": mine["door_wait_s_mean"],
            }
        out["variants"][name] = entry
    for entry in out["variants"].values():
        for label, t in entry["targets"].items():
            ref = out["variants"][out["baseline_variant"]]["targets"][label]["rate"]
            t["ratio"] = t["rate"] / ref if ref > 0 else None
    out["runs"] = search.runs
    return out


_SHOWN = (
    "latency_s_mean", "latency_s_p99", "token_latency_s_mean", "throughput_tokens_s", "prefix_hit_rate",
    "door_wait_s_mean", "tier_busy_fraction", "served_fraction", "latency_growth", "backlog_q3", "backlog_q4",
)


def capacity_text(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"capacity: {result['error']}"
    base = result["baseline_variant"]
    lines = [
        f"baseline {base} (= fcfs + lru): token latency {result['baseline_token_latency_s']:.4g} s/token "
        f"at {result['baseline_rate']:.4g} programs/s",
        "highest rate that keeps up (programs/s; ratio to fcfs + lru), sustainable rate per target, and",
        "mean/p99 program latency relative to fcfs + lru at fractions of its capacity",
    ]
    labels = list(next(iter(result["variants"].values()))["targets"])
    fracs = list(next(iter(result["variants"].values()))["at_fractions"])
    head = f"  {'variant':<13} {'capacity':>18}" + "".join(f" {'@' + x:>16}" for x in labels)
    head += "".join(f" {'lat@' + f + 'cap':>16}" for f in fracs) + f" {'hit%':>6} {'door s':>7}"
    lines.append(head)
    for name, e in result["variants"].items():
        cap = e["capacity"]
        cells = f"  {name:<13} {_rate(cap['rate'], e['capacity_ratio'], cap['bounded']):>18}"
        for label in labels:
            t = e["targets"][label]
            cells += f" {_rate(t['rate'], t.get('ratio'), t['bounded']):>16}"
        for f in fracs:
            a = e["at_fractions"][f]
            mark = "" if a["keeps_up"] else "!"
            cells += f" {a['mean_ratio']:>7.2f}/{a['p99_ratio']:<.2f}{mark:<3}"
        at = e.get("at_capacity", {})
        cells += f" {100 * at.get('prefix_hit_rate', math.nan):>6.1f} {at.get('door_wait_s_mean', math.nan):>7.3g}"
        lines.append(cells)
    lines.append("  (! = that run did not keep up; hit% and door s = prefix hit rate and mean door wait at capacity)")
    return "\n".join(lines)


def _rate(rate: float, ratio: float | None, bounded: str | None) -> str:
    prefix = {"lower": ">=", "upper": "<"}.get(bounded or "", "")
    r = "-" if ratio is None else f"{ratio:.2f}x"
    return f"{prefix}{rate:.4g} ({r})"
