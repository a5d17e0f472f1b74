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
  point once per engine KV memory variant (``lru``: LRU prefix cache; ``retain``: program-aware
  eviction order; ``tier``: that plus a CPU tier of 4x the KV capacity), with ratios to the first.

``--with-sim`` also runs ``autellix sim`` on the same programs, policy, rate and engines and prints
live / sim per figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Any

from autellix.engine.cost_model import profile
from autellix.policy.balancer import BALANCER_NAMES
from autellix.policy.variants import SERVING_POLICIES
from autellix.sim.analysis import analyse, parse_targets
from autellix.sim.cli import UsageError
from autellix.sim.cli import parse_number as _num
from autellix.sim.generators import WORKLOAD_NAMES
from autellix.sim.report import analysis_text, plot, points_table
from autellix.sim.workload import WorkloadError

POLICIES = SERVING_POLICIES

DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else ""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="replay agent workloads against the live mesh",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", default=None, help="NATS URL of a running mesh (default: an in-process mesh)")
    p.add_argument("--root", default=None, help="subject root of the running mesh (default autellix)")
    p.add_argument("--workload", required=True, help=f"{'|'.join(WORKLOAD_NAMES)} or PATH.jsonl (a trace)")
    p.add_argument("--rate", default=None, help="program arrival rate (programs/s, modelled time)")
    p.add_argument("--rates", default=None, help="comma list of rates to sweep (instead of --rate)")
    p.add_argument("--duration", default="60", help="modelled seconds of arrivals when --programs is not given")
    p.add_argument("--programs", default=None, help="programs per run (default: rate x duration)")
    p.add_argument("--seed", default="0", help="workload seed (default %(default)s)")
    p.add_argument("--json", required=True, metavar="OUT.json", help="write every figure here")
    p.add_argument("--plot", metavar="OUT.png", help="plot mean program token latency against rate")
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
        help="comma list of the in-process engines' KV memory variants, lru|retain|tier, each on its own mesh "
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
    p.add_argument("--no-context", action="store_true", help="prompts without their context chain's history")
    p.add_argument("--think-scale", default="1.0", help="multiply the generators' think times")
    p.add_argument("--targets", default="2x,5x,10x", help="token-latency targets, as autellix sim")
    p.add_argument("--fractions", default="0.8,0.9,1.0,1.2", help="fractions of FCFS saturation, as autellix sim")
    p.add_argument("--warmup", default="0.1", help="fraction of programs left out at the start")
    p.add_argument("--drain", default="0.1", help="fraction of programs left out at the end")
    p.add_argument("--with-sim", action="store_true", help="also simulate each point and print live / sim")
    p.add_argument("--timeout", default="600", help="seconds a call may go without an answer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="warning", help="services' log level (default %(default)s)")


def parse(args: argparse.Namespace) -> dict[str, Any]:
    workload = args.workload
    if workload not in WORKLOAD_NAMES and not os.path.isfile(workload):
        raise UsageError(f"unknown workload {workload!r}; expected {', '.join(WORKLOAD_NAMES)} or a .jsonl trace")
    if (args.rate is None) == (args.rates is None):
        raise UsageError("give exactly one of --rate and --rates")
    text = args.rates if args.rates is not None else args.rate
    rates = sorted({_num(x.strip(), "rate", float, 1e-9) for x in text.split(",") if x.strip()})
    if not rates or any(r <= 0 for r in rates):
        raise UsageError(f"bad rate(s) {text!r}")
    if args.compare:
        policies = list(dict.fromkeys(x.strip() for x in args.compare.split(",") if x.strip()))
        for pol in policies:
            if pol not in POLICIES:
                raise UsageError(f"unknown policy {pol!r} in --compare; expected {', '.join(POLICIES)}")
    else:
        policies = [args.policy]
    balancers = list(dict.fromkeys(x.strip() for x in args.balancer.split(",") if x.strip()))
    for lb in balancers:
        if lb not in BALANCER_NAMES:
            raise UsageError(f"unknown balancer {lb!r} in --balancer; expected {', '.join(BALANCER_NAMES)}")
    if not balancers:
        raise UsageError("--balancer needs at least one balancer")
    from autellix.bench.live import MEMORY_VARIANTS

    memories = list(dict.fromkeys(x.strip() for x in args.memory.split(",") if x.strip()))
    for m in memories:
        if m not in MEMORY_VARIANTS:
            raise UsageError(f"unknown memory variant {m!r} in --memory; expected {', '.join(MEMORY_VARIANTS)}")
    if not memories:
        raise UsageError("--memory needs at least one variant")
    scale = _num(args.sim_time_scale, "--sim-time-scale", float, 0.0)
    if scale <= 0:
        raise UsageError("--sim-time-scale must be > 0 (figures are divided by it)")
    duration = _num(args.duration, "--duration", float, 1e-9)
    programs = _num(args.programs, "--programs", int, 1) if args.programs is not None else None
    warmup, drain = _num(args.warmup, "--warmup", float, 0.0), _num(args.drain, "--drain", float, 0.0)
    if warmup + drain >= 1:
        raise UsageError("--warmup plus --drain must be below 1")
    try:
        targets = parse_targets(args.targets)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {
        "workload": workload,
        "rates": rates,
        "policies": policies,
        "balancers": balancers,
        "memories": memories,
        "kv_scale": _num(args.kv_scale, "--kv-scale", float, 1e-3),
        "local": args.nats is None or bool(args.compare),
        "engines": _num(args.engines, "--engines", int, 1),
        "time_scale": scale,
        "programs": programs,
        "duration": duration,
        "seed": _num(args.seed, "--seed", int),
        "think_scale": _num(args.think_scale, "--think-scale", float, 0.0),
        "warmup": warmup,
        "drain": drain,
        "targets": targets,
        "fractions": [_num(x, "--fractions item", float, 0.0) for x in args.fractions.split(",")],
        "timeout": _num(args.timeout, "--timeout", float, 1.0),
    }


def _count(opts: dict[str, Any], rate: float) -> int:
    return opts["programs"] if opts["programs"] is not None else max(1, math.ceil(rate * opts["duration"]))


def run(args: argparse.Namespace) -> int:
    from autellix.bench.live import ReplayConfig, load_programs

    try:
        opts = parse(args)
        counts = {r: _count(opts, r) for r in opts["rates"]}
        unit = load_programs(opts["workload"], max(counts.values()), opts["seed"], opts["think_scale"])
    except (UsageError, WorkloadError) as e:
        print(f"autellix bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"autellix bench: error: cannot read {args.workload}: {e.strerror or e}", file=sys.stderr)
        return 2
    base = profile("llama31-8b-h100")
    cost = replace(base, kv_capacity_tokens=int(base.kv_capacity_tokens * opts["kv_scale"]))
    opts["kv_capacity_tokens"] = cost.kv_capacity_tokens
    config = ReplayConfig(
        time_scale=opts["time_scale"],
        carry_context=not args.no_context,
        max_context=max(2, min(cost.max_context, cost.kv_capacity_tokens // 2)),
        stream=args.stream,
        timeout_s=opts["timeout"],
        warmup=opts["warmup"],
        drain=opts["drain"],
    )
    import uvloop

    try:
        points, sims = uvloop.run(_run_all(args, opts, unit, counts, config, cost))
    except (OSError, TimeoutError) as e:
        print(f"autellix bench: error: {e}", file=sys.stderr)
        return 1
    report = _report(args, opts, counts, config, points, sims)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(_jsonable(report), f, indent=1)
    print(points_table(points))
    ratio_text = _ratios_text(report["ratios"])
    if ratio_text:
        print()
        print(ratio_text)
    if report.get("analysis"):
        print()
        print(analysis_text(report["analysis"], opts["policies"]))
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
    args: argparse.Namespace, opts: dict[str, Any], unit: list[Any], counts: dict[float, int], config: Any, cost: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from autellix.bench.live import simulate_point
    from autellix.services.embedded_nats import EmbeddedNats

    broker: EmbeddedNats | None = None
    url = args.nats
    if url is None:
        broker = EmbeddedNats(port=0)
        url = broker.start()
    points: list[dict[str, Any]] = []
    sims: list[dict[str, Any]] = []
    try:
        for rate in opts["rates"]:
            programs = unit[: counts[rate]]
            for balancer in opts["balancers"]:
                for policy in opts["policies"]:
                    for memory in opts["memories"]:
                        label = policy if len(opts["balancers"]) == 1 else f"{policy}/{balancer}"
                        if len(opts["memories"]) > 1:
                            label += f"+{memory}"
                        point = await _run_one(args, opts, url, programs, policy, balancer, memory, rate,
                                               f"{label} @ {rate:g}/s", config, cost)
                        points.append(point)
                        if args.with_sim:
                            sims.append(
                                simulate_point(programs, policy, rate, opts["engines"], config, cost=cost,
                                               balancer=balancer, memory=memory)
                                | {"engines": opts["engines"], "programs": len(programs)}
                            )
    finally:
        if broker is not None:
            broker.stop()
    return points, sims


async def _run_one(
    args: argparse.Namespace, opts: dict[str, Any], url: str, programs: list[Any], policy: str, balancer: str,
    memory: str, rate: float, desc: str, config: Any, cost: Any,
) -> dict[str, Any]:
    from tqdm import tqdm

    from autellix.bench.live import PointSpec, run_point

    bar = tqdm(total=len(programs), desc=desc, unit="prog", file=sys.stderr, disable=args.no_progress)
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
            url, args.root, programs, PointSpec(policy, rate), config, opts["engines"], opts["local"],
            cost=cost, on_program=on_program, pace=not args.no_pace, balancer=balancer, memory=memory,
        )
    finally:
        bar.close()
    point["engines"] = opts["engines"]
    point["programs"] = len(programs)
    point["run_s"] = time.perf_counter() - started
    return point


def _report(
    args: argparse.Namespace,
    opts: dict[str, Any],
    counts: dict[float, int],
    config: Any,
    points: list[dict[str, Any]],
    sims: list[dict[str, Any]],
) -> dict[str, Any]:
    from autellix.bench.live import agreement

    report: dict[str, Any] = {
        "command": "autellix bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, no GPU used",
        "date": time.strftime("%Y-%m-%d"),
        "workload": opts["workload"],
        "seed": opts["seed"],
        "programs_per_rate": {f"{r:g}": n for r, n in counts.items()},
        "engines": opts["engines"],
        "kv_scale": opts["kv_scale"],
        "kv_capacity_tokens": opts["kv_capacity_tokens"],
        "kv_budget_tokens": opts["kv_capacity_tokens"],  # the older name of the same figure
        "mesh": "in-process" if opts["local"] else f"{args.nats} (running mesh)",
        "time_scale": opts["time_scale"],
        "paced": opts["local"] and not args.no_pace,
        "stream": config.stream,
        "carry_context": config.carry_context,
        "units": "modelled seconds (real seconds / time_scale)",
        "steady_state": {"warmup_fraction": opts["warmup"], "drain_fraction": opts["drain"]},
        "points": points,
        "memories": opts["memories"],
        "ratios": _ratios(points, opts["policies"], opts["balancers"], opts["memories"]),
    }
    if "fcfs" in opts["policies"] and len(opts["memories"]) == 1 and all("token_latency_s_mean" in p for p in points):
        report["analysis"] = analyse(
            points, opts["policies"], opts["balancers"], opts["targets"], opts["fractions"]
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


def _plot(path: str, points: list[dict[str, Any]], analysis: dict[str, Any] | None, opts: dict[str, Any]) -> None:
    title = f"live: {os.path.basename(opts['workload'])}, {opts['engines']} engine(s)"
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
