"""``autellix sim``: compare scheduling policies on simulated engines.

Wiring: the main CLI calls :func:`register` with its sub-parsers; ``python -m autellix.sim`` builds
its own parser (``sim/__main__.py``). :func:`run` returns the exit code: 0, or 2 on bad input
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

from autellix.engine.cost_model import profile
from autellix.policy.balancer import BALANCER_NAMES
from autellix.policy.door import DoorConfig
from autellix.policy.mlfq import MLFQConfig
from autellix.policy.variants import POLICY_NAMES
from autellix.sim import cli_kit as kit
from autellix.sim.analysis import analyse
from autellix.sim.cli_kit import UsageError
from autellix.sim.engine_model import SIM_SCHEDULE_EVERY
from autellix.sim.report import analysis_text, plot, points_table
from autellix.sim.simulator import MEMORY_NAMES, SimConfig
from autellix.sim.sweep import WorkloadSource, run_sweep, sweep_points, unit_rate_programs, variant_name
from autellix.sim.trace import write_trace

DESCRIPTION = """\
Simulate agent programs on engines in virtual time and compare scheduling policies.

Every (balancer, policy, memory, rate) point replays the same programs with arrivals scaled to the rate.
Steady state: the first --warmup and last --drain fractions of programs (by arrival) are
discarded from the figures; the run continues until every program has finished.
"""


_DEFAULT_FRACTIONS = "0.8,0.9,1.0,1.2"


@dataclass(frozen=True, slots=True)
class SimOptions:
    """The checked command line of ``autellix sim``."""

    source: WorkloadSource
    #: every run's config but its policy, balancer and memory variant (each point's own)
    config: SimConfig
    policies: list[str]
    memories: list[str]
    balancers: list[str]
    rates: list[float]
    targets: list[tuple[str, float | None, float | None]]
    fractions: list[float]
    warmup: float
    drain: float
    jobs: int
    #: --capacity: the bisection's relative tolerance and first rate (None: from the offered load)
    tol: float
    start_rate: float | None

    @property
    def variants(self) -> list[str]:
        """``policy+memory`` names, every policy with every memory variant."""
        return [variant_name(p, m) for p in self.policies for m in self.memories]


def register(subparsers: Any) -> None:
    """Add the ``sim`` sub-command to an argparse sub-parsers object."""
    kit.register_command(
        subparsers, "sim", "compare scheduling policies in a simulator", DESCRIPTION, add_arguments, run
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    kit.add_workload_arguments(p, plot_help="plot mean token latency against rate")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma list of %(default)s")
    p.add_argument("--rates", help="comma list of program arrival rates (programs/s), ascending")
    p.add_argument(
        "--capacity",
        action="store_true",
        help="instead of a rate grid: find each (policy, memory) variant's highest rate that keeps up with its "
        "load by bisection, and its sustainable rate at the latency targets; ratios to fcfs + lru",
    )
    p.add_argument("--tol", default="0.03", help="--capacity: bisection tolerance, relative (default %(default)s)")
    p.add_argument("--start-rate", help="--capacity: first rate tried (default: 500 offered output tokens/s)")
    p.add_argument("--engines", default="1", help="number of engines (default %(default)s)")
    p.add_argument(
        "--balancer",
        "--lb",
        dest="balancer",
        metavar="BALANCERS",
        default="locality",
        help=f"comma list of {','.join(BALANCER_NAMES)} (default %(default)s; --lb is an alias)",
    )
    p.add_argument(
        "--memory",
        default="lru",
        help=f"comma list of {','.join(MEMORY_NAMES)}: KV memory management compared side by side "
        "(default %(default)s; lru is always added as the baseline)",
    )
    p.add_argument("--tier-scale", default="4", help="CPU tier size in multiples of the GPU KV capacity (default 4)")
    p.add_argument("--programs", default="1000", help="programs per run (default %(default)s)")
    p.add_argument(
        "--targets",
        default="2x,5x,10x",
        help="token-latency targets: multiples of FCFS's low-load latency (10x) or s/token (0.3)",
    )
    p.add_argument(
        "--fractions",
        default=_DEFAULT_FRACTIONS,
        help="fractions of FCFS saturation throughput (with --capacity: of fcfs + lru's capacity; default 0.5,0.9)",
    )
    p.add_argument("--kv-scale", default="1.0", help="multiply the profile's KV capacity (regime map: 0.25,0.5,1)")
    p.add_argument("--profile", default="llama31-8b-h100", help="engine cost profile (default %(default)s)")
    p.add_argument(
        "--schedule-every",
        "--sched-every",
        dest="schedule_every",
        default=str(SIM_SCHEDULE_EVERY),
        help="decode steps between scheduling points (default %(default)s; --sched-every is an alias)",
    )
    p.add_argument("--levels", default=str(MLFQConfig().num_levels), help="number of queues K")
    p.add_argument("--beta", default=str(MLFQConfig().beta), help="anti-starvation threshold")
    p.add_argument(
        "--preempt-gap",
        default=str(MLFQConfig().preempt_gap),
        help="levels a waiting call must be above a running one to displace it (hysteresis; default %(default)s)",
    )
    p.add_argument(
        "--door-high-water",
        default=str(DoorConfig().high_water),
        help="door: admit while the working set stays under this fraction of capacity (default %(default)s)",
    )
    p.add_argument(
        "--door-tier",
        action=argparse.BooleanOptionalAction,
        default=DoorConfig().count_tier,
        help="door: count the CPU tier in the capacity (with tier; default %(default)s)",
    )
    p.add_argument(
        "--door-spill-gate",
        default=None,
        help="door, with a tier: apply the door's rule only while the engines spend at least this share of busy "
        f"time swapping contexts back in from the tier, or none: always (default {DoorConfig().spill_gate})",
    )
    p.add_argument("--jobs", default="1", help="simulations to run in parallel processes (default %(default)s)")
    p.add_argument("--trace-out", metavar="PATH.jsonl", help="also write the workload's programs as a trace")
    p.add_argument("--quiet", action="store_true", help="print only the analysis, not every point")


def parse(args: argparse.Namespace) -> SimOptions:
    """Validate the options; raises :class:`UsageError`."""
    workload = kit.check_workload(args.workload)
    policies = kit.parse_names(args.policies, POLICY_NAMES, "policy", "--policies")
    if "fcfs" not in policies:
        policies.insert(0, "fcfs")  # the ratios are to FCFS
    balancers = kit.parse_names(args.balancer, BALANCER_NAMES, "balancer", "--balancer")
    memories = kit.parse_names(args.memory, MEMORY_NAMES, "memory variant", "--memory")
    if "lru" not in memories:
        memories.insert(0, "lru")  # the ratios are to fcfs + lru
    engines = kit.parse_number(args.engines, "--engines", int, 1)
    if engines == 1 and len(balancers) > 1:
        balancers = balancers[:1]  # one engine: the balancer cannot matter
    targets = kit.parse_latency_targets(args.targets)
    try:
        cost = profile(args.profile)
        mlfq = MLFQConfig(
            num_levels=kit.parse_number(args.levels, "--levels", int, 1),
            beta=kit.parse_number(args.beta, "--beta", float, 0.0),
            preempt_gap=kit.parse_number(args.preempt_gap, "--preempt-gap", int, 0),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.rates is None and not args.capacity:
        raise UsageError("give --rates, or --capacity to search for each variant's highest stable rate")
    try:
        door = DoorConfig(
            high_water=kit.parse_number(args.door_high_water, "--door-high-water", float, 0.0),
            count_tier=args.door_tier,
            spill_gate=(
                DoorConfig().spill_gate
                if args.door_spill_gate is None
                else None
                if args.door_spill_gate.strip().lower() in ("none", "off")
                else kit.parse_number(args.door_spill_gate, "--door-spill-gate", float, 0.0)
            ),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    warmup, drain = kit.parse_steady_state(args.warmup, args.drain)
    config = SimConfig(
        policy="fcfs",
        engines=engines,
        balancer=balancers[0],
        cost=cost,
        kv_scale=kit.parse_number(args.kv_scale, "--kv-scale", float, 1e-3),
        carry_context=not args.no_context,
        schedule_every=kit.parse_number(args.schedule_every, "--schedule-every", int, 1),
        mlfq=mlfq,
        tier_scale=kit.parse_number(args.tier_scale, "--tier-scale", float, 0.0),
        door=door,
    )
    source = WorkloadSource(
        name=workload,
        programs=kit.parse_number(args.programs, "--programs", int, 1),
        seed=kit.parse_number(args.seed, "--seed", int),
        think_scale=kit.parse_number(args.think_scale, "--think-scale", float, 0.0),
    )
    return SimOptions(
        source=source,
        config=config,
        policies=policies,
        memories=memories,
        balancers=balancers,
        rates=kit.parse_rates(args.rates) if args.rates is not None else [],
        targets=targets,
        fractions=kit.parse_numbers(args.fractions, "--fractions item", float, 0.0),
        warmup=warmup,
        drain=drain,
        jobs=kit.parse_number(args.jobs, "--jobs", int, 1),
        tol=kit.parse_number(args.tol, "--tol", float, 1e-4),
        start_rate=kit.parse_number(args.start_rate, "--start-rate", float, 1e-9) if args.start_rate else None,
    )


def run(args: argparse.Namespace) -> int:
    def read() -> tuple[SimOptions, list[Any]]:
        opts = parse(args)
        return opts, unit_rate_programs(opts.source)  # reads and checks a trace before any run starts

    loaded = kit.read_input("autellix sim", args.workload, read)
    if loaded is None:
        return 2
    opts, programs = loaded
    source, config = opts.source, opts.config
    if args.trace_out:
        write_trace(args.trace_out, programs)
    if args.capacity:
        return _run_capacity(args, opts, programs)
    points = sweep_points(opts.balancers, opts.policies, opts.rates, opts.memories)
    bar = kit.progress_bar(len(points), "sim", "run", args.no_progress)
    try:
        results = run_sweep(
            source,
            config,
            points,
            warmup=opts.warmup,
            drain=opts.drain,
            jobs=opts.jobs,
            on_done=lambda _: bar.update(1),
        )
    finally:
        bar.close()
    analysis = analyse(results, opts.variants, opts.balancers, opts.targets, opts.fractions)
    cost = config.engine_cost()
    summary = {
        "workload": source.name,
        "programs": source.programs if not source.is_trace else len(programs),
        "seed": source.seed,
        "engines": config.engines,
        "kv_capacity_tokens": cost.kv_capacity_tokens,
        "kv_budget_tokens": cost.kv_capacity_tokens,  # the older name of the same figure
        "carry_context": config.carry_context,
        "steady_state": {"warmup_fraction": opts.warmup, "drain_fraction": opts.drain},
        "config": _config_json(config, opts),
        "points": results,
        "analysis": analysis,
    }
    kit.write_json(args.json, summary)
    if not args.quiet:
        print(points_table(results))
        print()
    print(analysis_text(analysis, opts.variants))
    if args.plot:
        title = f"{os.path.basename(source.name)}, {config.engines} engine(s), KV x{config.kv_scale:g}"
        plot(results, analysis, args.plot, title)
    return 0


def _run_capacity(args: argparse.Namespace, opts: SimOptions, programs: list[Any]) -> int:
    from autellix.sim.capacity import CapacityConfig, capacity_text, find_capacities

    targets = tuple(m for _, m, _ in opts.targets if m is not None)
    if not targets:
        print("autellix sim: error: --capacity needs latency targets as multiples (10x)", file=sys.stderr)
        return 2
    config = replace(opts.config, balancer=opts.balancers[0])
    cap_config = CapacityConfig(
        tol=opts.tol, start_rate=opts.start_rate, targets=targets,
        harm_fractions=tuple(opts.fractions) if args.fractions != _DEFAULT_FRACTIONS else (0.5, 0.9),
        warmup=opts.warmup, drain=opts.drain,
    )
    count = 0

    def progress(point: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        if not args.no_progress:
            print(
                f"[{count}] {point['variant']} at {point['rate']:.4g}/s: "
                f"{'keeps up' if point['keeps_up'] else 'falls behind'}, token latency "
                f"{point['token_latency_s_mean']:.3g} s, hit {100 * point['prefix_hit_rate']:.0f}%, "
                f"{point['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    result = find_capacities(programs, config, opts.policies, opts.memories, cap_config, progress)
    source = opts.source
    cost = config.engine_cost()
    summary = {
        "workload": source.name,
        "programs": len(programs),
        "seed": source.seed,
        "engines": config.engines,
        "kv_capacity_tokens": cost.kv_capacity_tokens,
        "kv_budget_tokens": cost.kv_capacity_tokens,  # the older name of the same figure
        "carry_context": config.carry_context,
        "stable_definition": "keeps_up (sim/metrics.py): output tokens served in the measurement window "
        "shifted by the mean program latency >= 95% of those offered in the window, and the mean latency of "
        "programs arriving in the window's last quarter <= 1.5 x that of those arriving in its first half",
        "steady_state": {"warmup_fraction": opts.warmup, "drain_fraction": opts.drain},
        "config": _config_json(config, opts),
        "capacity_config": kit.jsonable(asdict(cap_config)),
        "capacity": result,
    }
    kit.write_json(args.json, summary)
    print(capacity_text(result))
    return 0



def _config_json(config: SimConfig, opts: SimOptions) -> Any:
    """The run's configuration for the report, with the older names of renamed fields beside the new
    (``sched_every_steps``, ``cost.kv_budget_tokens``: readers of older reports keep working)."""
    out = {**asdict(config), "policy": opts.policies, "memory": opts.memories, "balancer": opts.balancers}
    out["sched_every_steps"] = config.schedule_every
    out["cost"]["kv_budget_tokens"] = config.cost.kv_capacity_tokens
    return kit.jsonable(out)
