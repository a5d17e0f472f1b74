"""``autellix bench``: replay agent programs against the live mesh and report ``autellix sim``'s figures.

Modes:

- ``--nats URL`` alone: replay against the mesh already running there (``autellix up``), whatever
  policy it runs; give ``--sim-time-scale`` the value the sim engines run with, so figures come out
  in modelled seconds, and ``--policy``/``--balancer``/``--kv-scale`` the mesh's own, so that figures
  are labelled, and ``--with-sim`` simulates, what actually ran.
- otherwise (or with ``--compare``): for each policy (``--compare fcfs,plas,atlas`` or ``--policy``),
  each balancer (``--balancer locality,round-robin``) and each rate, bring up a fresh in-process mesh
  (tracker, scheduler and ``--engines`` sim engines, every service set to the policy, the engines'
  limits from the cost model, KV capacity times ``--kv-scale``) on an embedded nats-server, or on
  ``--nats`` when given, replay the same programs, and print the figures side by side with ratios to
  the first policy (and to the first balancer); with several ``--rates`` and FCFS among the policies,
  the simulator's analysis (highest sustainable rate under each latency target, per balancer, at the
  same absolute targets, and each balancer's rate over round-robin's). ``--memory lru,tier`` runs each
  point once per KV memory variant (``lru``: LRU prefix cache; ``retain``: program-aware
  eviction order; ``tier``: that plus a CPU tier of 4x the KV capacity; ``door``: LRU behind the
  schedulers' working-set door; ``all``: tier and door, as deployed), with ratios to the first.

``--with-sim`` also runs ``autellix sim`` on the same programs, policy, rate and engines and prints
live / sim per figure.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from autellix.engine.cost_model import profile
from autellix.policy.balancer import BALANCER_NAMES
from autellix.policy.variants import SERVING_POLICIES
from autellix.sim import cli_kit as kit
from autellix.sim.analysis import analyse
from autellix.sim.cli_kit import UsageError
from autellix.sim.report import analysis_text, plot, points_table

POLICIES = SERVING_POLICIES

DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else ""


def register(subparsers: Any) -> None:
    kit.register_command(
        subparsers, "bench", "replay agent workloads against the live mesh", DESCRIPTION, add_arguments, run
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    kit.add_workload_arguments(p, plot_help="plot mean program token latency against rate")
    p.add_argument("--nats", default=None, help="NATS URL of a running mesh (default: an in-process mesh)")
    p.add_argument("--root", default=None, help="subject root of the running mesh (default autellix)")
    p.add_argument("--rate", default=None, help="program arrival rate (programs/s, modelled time)")
    p.add_argument("--rates", default=None, help="comma list of rates to sweep (instead of --rate)")
    p.add_argument("--duration", default="60", help="modelled seconds of arrivals when --programs is not given")
    p.add_argument("--programs", default=None, help="programs per run (default: rate x duration)")
    p.add_argument("--compare", default=None, help="comma list of policies, each on its own in-process mesh")
    p.add_argument("--policy", default="plas", choices=POLICIES, help="policy of the in-process mesh (no --compare)")
    p.add_argument(
        "--balancer",
        default="locality",
        help=f"engine choice of the in-process mesh's scheduler: one of {','.join(BALANCER_NAMES)}, or a comma "
        "list to compare (default %(default)s)",
    )
    p.add_argument(
        "--kv-scale",
        default="1.0",
        help="multiply the KV capacity of the in-process sim engines' cost model, as sim does (default %(default)s)",
    )
    p.add_argument("--engines", default="1", help="sim engines of the in-process mesh (default %(default)s)")
    p.add_argument(
        "--memory",
        default="lru",
        help="comma list of KV memory variants, lru|retain|tier|door|all (the simulator's names: door = the "
        "schedulers' working-set door, all = tier + door, as deployed), each on its own mesh "
        "(default %(default)s)",
    )
    p.add_argument(
        "--sim-time-scale",
        default="0.5",
        help="real seconds per modelled second of the sim engines (default %(default)s)",
    )
    p.add_argument(
        "--no-pace",
        action="store_true",
        help="in-process engines: do not take the host's overhead between steps out of the step time",
    )
    p.add_argument("--stream", action="store_true", help="stream tokens (default: final message only)")
    p.add_argument("--targets", default="2x,5x,10x", help="token-latency targets, as autellix sim")
    p.add_argument("--fractions", default="0.8,0.9,1.0,1.2", help="fractions of FCFS saturation, as autellix sim")
    p.add_argument("--with-sim", action="store_true", help="also simulate each point and print live / sim")
    p.add_argument("--timeout", default="600", help="seconds a call may go without an answer")
    p.add_argument("--log-level", default="warning", help="services' log level (default %(default)s)")


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """The checked command line of ``autellix bench``."""

    workload: str
    rates: list[float]
    policies: list[str]
    balancers: list[str]
    memories: list[str]
    kv_scale: float
    #: in-process meshes (else the running mesh at ``nats``)
    local: bool
    engines: int
    time_scale: float
    #: programs per run; None: rate x duration
    programs: int | None
    duration: float
    seed: int
    think_scale: float
    warmup: float
    drain: float
    targets: list[tuple[str, float | None, float | None]]
    fractions: list[float]
    timeout: float
    nats: str | None = None
    root: str | None = None
    pace: bool = True
    with_sim: bool = False
    progress: bool = True

    def count(self, rate: float) -> int:
        """Programs replayed at ``rate``."""
        return self.programs if self.programs is not None else max(1, math.ceil(rate * self.duration))


def parse(args: argparse.Namespace) -> BenchOptions:
    """Validate the options; raises :class:`UsageError`."""
    workload = kit.check_workload(args.workload)
    if (args.rate is None) == (args.rates is None):
        raise UsageError("give exactly one of --rate and --rates")
    rates = kit.parse_rates(args.rates, "--rates") if args.rates is not None else kit.parse_rates(args.rate, "--rate")
    policies = kit.parse_names(args.compare, POLICIES, "policy", "--compare") if args.compare else [args.policy]
    balancers = kit.parse_names(args.balancer, BALANCER_NAMES, "balancer", "--balancer")
    from autellix.bench.live import MEMORY_VARIANTS

    memories = kit.parse_names(args.memory, tuple(MEMORY_VARIANTS), "memory variant", "--memory")
    scale = kit.parse_number(args.sim_time_scale, "--sim-time-scale", float, 0.0)
    if scale <= 0:
        raise UsageError("--sim-time-scale must be > 0 (figures are divided by it)")
    warmup, drain = kit.parse_steady_state(args.warmup, args.drain)
    return BenchOptions(
        workload=workload,
        rates=rates,
        policies=policies,
        balancers=balancers,
        memories=memories,
        kv_scale=kit.parse_number(args.kv_scale, "--kv-scale", float, 1e-3),
        local=args.nats is None or bool(args.compare),
        engines=kit.parse_number(args.engines, "--engines", int, 1),
        time_scale=scale,
        programs=kit.parse_number(args.programs, "--programs", int, 1) if args.programs is not None else None,
        duration=kit.parse_number(args.duration, "--duration", float, 1e-9),
        seed=kit.parse_number(args.seed, "--seed", int),
        think_scale=kit.parse_number(args.think_scale, "--think-scale", float, 0.0),
        warmup=warmup,
        drain=drain,
        targets=kit.parse_latency_targets(args.targets),
        fractions=kit.parse_numbers(args.fractions, "--fractions item", float, 0.0),
        timeout=kit.parse_number(args.timeout, "--timeout", float, 1.0),
        nats=args.nats,
        root=args.root,
        pace=not args.no_pace,
        with_sim=args.with_sim,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from autellix.bench.live import ReplayConfig, load_programs

    def read() -> tuple[BenchOptions, list[Any]]:
        opts = parse(args)
        return opts, load_programs(opts.workload, max(map(opts.count, opts.rates)), opts.seed, opts.think_scale)

    loaded = kit.read_input("autellix bench", args.workload, read)
    if loaded is None:
        return 2
    opts, unit = loaded
    counts = {r: opts.count(r) for r in opts.rates}
    base = profile("llama31-8b-h100")
    cost = replace(base, kv_capacity_tokens=int(base.kv_capacity_tokens * opts.kv_scale))
    config = ReplayConfig(
        time_scale=opts.time_scale,
        carry_context=not args.no_context,
        max_context=max(2, min(cost.max_context, cost.kv_capacity_tokens // 2)),
        stream=args.stream,
        timeout_s=opts.timeout,
        warmup=opts.warmup,
        drain=opts.drain,
    )
    import uvloop

    try:
        points, sims = uvloop.run(_run_all(opts, unit, counts, config, cost))
    except (OSError, TimeoutError) as e:
        print(f"autellix bench: error: {e}", file=sys.stderr)
        return 1
    report = _report(opts, counts, config, cost, points, sims)
    kit.write_json(args.json, report)
    print(points_table(points))
    ratio_text = _ratios_text(report["ratios"])
    if ratio_text:
        print()
        print(ratio_text)
    if report.get("analysis"):
        print()
        print(analysis_text(report["analysis"], opts.policies))
    if sims:
        print()
        print(_agreement_text(report["agreement"]))
    if args.plot:
        _plot(args.plot, points, report.get("analysis"), opts)
    bad = sum(p.get("errors", 0) for p in points)
    if bad:
        print(f"autellix bench: {bad} call(s) failed (see errors_by_code in {args.json})", file=sys.stderr)
    return 0


async def _run_all(
    opts: BenchOptions, unit: list[Any], counts: dict[float, int], config: Any, cost: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from autellix.bench.live import simulate_point
    from autellix.services.embedded_nats import EmbeddedNats

    broker: EmbeddedNats | None = None
    url = opts.nats
    if url is None:
        broker = EmbeddedNats(port=0)
        url = broker.start()
    points: list[dict[str, Any]] = []
    sims: list[dict[str, Any]] = []
    try:
        for rate in opts.rates:
            programs = unit[: counts[rate]]
            for balancer in opts.balancers:
                for policy in opts.policies:
                    for memory in opts.memories:
                        label = policy if len(opts.balancers) == 1 else f"{policy}/{balancer}"
                        if len(opts.memories) > 1:
                            label += f"+{memory}"
                        point = await _run_one(opts, url, programs, policy, balancer, memory, rate,
                                               f"{label} @ {rate:g}/s", config, cost)
                        points.append(point)
                        if opts.with_sim:
                            sims.append(
                                simulate_point(programs, policy, rate, opts.engines, config, cost=cost,
                                               balancer=balancer, memory=memory)
                                | {"engines": opts.engines, "programs": len(programs)}
                            )
    finally:
        if broker is not None:
            broker.stop()
    return points, sims


async def _run_one(
    opts: BenchOptions, url: str, programs: list[Any], policy: str, balancer: str,
    memory: str, rate: float, desc: str, config: Any, cost: Any,
) -> dict[str, Any]:
    from autellix.bench.live import PointSpec, run_point

    bar = kit.progress_bar(len(programs), desc, "prog", not opts.progress)
    failed = 0

    def on_program(ok: bool) -> None:
        nonlocal failed
        failed += not ok
        bar.update(1)
        if failed:
            bar.set_postfix(failed=failed)

    started = time.perf_counter()
    try:
        point = await run_point(
            url, opts.root, programs, PointSpec(policy, rate), config, opts.engines, opts.local,
            cost=cost, on_program=on_program, pace=opts.pace, balancer=balancer, memory=memory,
        )
    finally:
        bar.close()
    point["engines"] = opts.engines
    point["programs"] = len(programs)
    point["run_s"] = time.perf_counter() - started
    return point


def _report(
    opts: BenchOptions,
    counts: dict[float, int],
    config: Any,
    cost: Any,
    points: list[dict[str, Any]],
    sims: list[dict[str, Any]],
) -> dict[str, Any]:
    from autellix.bench.live import agreement

    report: dict[str, Any] = {
        "command": "autellix bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, no GPU used",
        "date": time.strftime("%Y-%m-%d"),
        "workload": opts.workload,
        "seed": opts.seed,
        "programs_per_rate": {f"{r:g}": n for r, n in counts.items()},
        "engines": opts.engines,
        "kv_scale": opts.kv_scale,
        "kv_capacity_tokens": cost.kv_capacity_tokens,
        "kv_budget_tokens": cost.kv_capacity_tokens,  # the older name of the same figure
        "mesh": "in-process" if opts.local else f"{opts.nats} (running mesh)",
        "time_scale": opts.time_scale,
        "paced": opts.local and opts.pace,
        "stream": config.stream,
        "carry_context": config.carry_context,
        "units": "modelled seconds (real seconds / time_scale)",
        "steady_state": {"warmup_fraction": opts.warmup, "drain_fraction": opts.drain},
        "points": points,
        "memories": opts.memories,
        "ratios": _ratios(points, opts.policies, opts.balancers, opts.memories),
    }
    if "fcfs" in opts.policies and len(opts.memories) == 1 and all("token_latency_s_mean" in p for p in points):
        report["analysis"] = analyse(
            points, opts.policies, opts.balancers, opts.targets, opts.fractions
        )
    if sims:
        report["sim_points"] = sims
        report["agreement"] = [
            {
                "policy": p["policy"], "balancer": p["balancer"], "memory": p.get("memory", "lru"), "rate": p["rate"],
                "live_over_sim": agreement(p, s),
            }
            for p, s in zip(points, sims, strict=True)
        ]
    return report


RATIO_KEYS = (
    "latency_s_mean",
    "latency_s_p50",
    "latency_s_p95",
    "latency_s_p99",
    "token_latency_s_mean",
    "token_latency_s_p99",
    "ttft_s_mean",
    "ttft_s_p99",
    "throughput_programs_s",
)


def _ratios(
    points: list[dict[str, Any]], policies: list[str], balancers: list[str], memories: list[str] | None = None
) -> list[dict[str, Any]]:
    """Each point's figures over the first policy's with the same balancer, memory and rate, and, with
    several balancers (memory variants), over the same point's with the first balancer (memory
    variant) (below 1 = lower latency)."""
    out = []
    first_memory = (memories or ["lru"])[0]

    def find(policy: str, balancer: str, memory: str, rate: float) -> dict[str, Any] | None:
        return next(
            (
                b for b in points
                if b["policy"] == policy and b["balancer"] == balancer and b.get("memory", first_memory) == memory
                and b["rate"] == rate
            ),
            None,
        )

    for p in points:
        bases = []
        memory = p.get("memory", first_memory)
        if p["policy"] != policies[0]:
            bases.append((find(policies[0], p["balancer"], memory, p["rate"]), policies[0]))
        if p["balancer"] != balancers[0]:
            bases.append((find(p["policy"], balancers[0], memory, p["rate"]), balancers[0]))
        if memory != first_memory:
            bases.append((find(p["policy"], p["balancer"], first_memory, p["rate"]), first_memory))
        for base, over in bases:
            if base is None:
                continue
            ratios = {}
            for k in RATIO_KEYS:
                a, b = p.get(k), base.get(k)
                ratios[k] = a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
            out.append(
                {
                    "policy": p["policy"], "balancer": p["balancer"], "memory": memory, "rate": p["rate"],
                    "over": over, "ratios": ratios,
                }
            )
    return out


def _ratios_text(ratios: list[dict[str, Any]]) -> str:
    if not ratios:
        return ""
    lines = ["ratio to the point named in 'over' at the same rate (latency: below 1 is better)"]
    head = f"{'policy/balancer':<18} {'over':<12} {'rate':>7} | " + " ".join(
        f"{k.replace('_s_', ' '):>14}" for k in RATIO_KEYS
    )
    lines += [head, "-" * len(head)]
    for r in ratios:
        cells = " ".join(f"{'-' if v is None else f'{v:.3f}':>14}" for v in r["ratios"].values())
        name = f"{r['policy']}/{r['balancer']}" + (f"+{r['memory']}" if r.get("memory", "lru") != "lru" else "")
        lines.append(f"{name:<18} {r['over']:<12} {r['rate']:>7.3g} | {cells}")
    return "\n".join(lines)


def _agreement_text(rows: list[dict[str, Any]]) -> str:
    lines = ["live / sim (same programs, policy, rate, engines, cost model)"]
    for row in rows:
        cells = [f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in row["live_over_sim"].items()]
        name = f"{row['policy']}/{row['balancer']}+{row.get('memory', 'lru')}"
        lines.append(f"  {name} @ {row['rate']:g}/s: " + "  ".join(cells))
    return "\n".join(lines)


def _plot(path: str, points: list[dict[str, Any]], analysis: dict[str, Any] | None, opts: BenchOptions) -> None:
    title = f"live: {os.path.basename(opts.workload)}, {opts.engines} engine(s)"
    if analysis is not None:
        plot(points, analysis, path, title)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for pol in dict.fromkeys(p["policy"] for p in points):
        curve = sorted((p for p in points if p["policy"] == pol), key=lambda p: p["rate"])
        latency = [p.get("token_latency_s_mean", float("nan")) for p in curve]
        ax.plot([p["rate"] for p in curve], latency, marker="o", label=pol)
    ax.set_xlabel("program arrival rate (programs/s)")
    ax.set_ylabel("mean program token latency (s/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

