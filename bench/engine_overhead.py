"""Scheduling overhead of the engine core per step, as a share of the step's (modelled) time.

Drives :class:`autellix.engine.core.EngineCore` with the ``sim`` backend at a given batch size and
times ``schedule()`` + ``update()`` (the engine's own work between model steps: queue order,
preemption choices, batch building, token and finish bookkeeping, detokenisation). The model step
itself is the cost model's time for the same batch (Llama-3.1-8B on an H100 by default), so the
share says how much the Python scheduler would add to a real GPU step.

    python -m autellix.bench.engine_overhead --batch 64 --steps 2000 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, execute_plan
from autellix.engine.sim_backend import SimBackend
from autellix.sim.cli_kit import write_json


def measure(batch: int, steps: int, policy: str, schedule_every: int, waiting: int) -> dict[str, float | str]:
    backend = SimBackend(time_scale=0)
    core = EngineCore(
        backend,
        CoreConfig(
            max_batch=batch,
            kv_capacity_tokens=400_000,
            max_batched_tokens=8192,
            policy=policy,
            schedule_every=schedule_every,
        ),
    )
    n = 0
    now = 0.0

    def top_up() -> None:
        nonlocal n
        while len(core.call_ids()) < batch + waiting:
            prio = float(n % 7)
            core.add(CoreCall(f"c{n}", f"p{n % 50}", list(range(1, 513)), 256, prio, program_service_s=prio), now)
            n += 1

    top_up()
    overhead: list[float] = []
    modelled: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = core.schedule(now)
        t1 = time.perf_counter()
        assert plan is not None
        result = execute_plan(backend, plan)
        step_s = backend.step_time(plan.batch)
        now += step_s
        t2 = time.perf_counter()
        core.update(plan, result, now)
        t3 = time.perf_counter()
        overhead.append((t1 - t0) + (t3 - t2))
        modelled.append(step_s)
        top_up()
    decode_steps = [(o, m) for o, m in zip(overhead, modelled, strict=True)]
    mean_overhead = statistics.fmean(o for o, _ in decode_steps)
    mean_step = statistics.fmean(m for _, m in decode_steps)
    return {
        "batch": batch,
        "policy": policy,
        "steps": steps,
        "overhead_ms_mean": mean_overhead * 1e3,
        "overhead_ms_p50": statistics.median(overhead) * 1e3,
        "overhead_ms_p99": sorted(overhead)[int(0.99 * len(overhead))] * 1e3,
        "modelled_step_ms_mean": mean_step * 1e3,
        "overhead_share": mean_overhead / mean_step,
        "preemptions": core.total_preemptions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--policies", default="fcfs,plas")
    parser.add_argument("--schedule-every", type=int, default=4)
    parser.add_argument("--waiting", type=int, default=64, help="calls kept waiting beyond the batch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for policy in args.policies.split(","):
        row = measure(args.batch, args.steps, policy, args.schedule_every, args.waiting)
        rows.append(row)
        print(
            f"{policy:6s} batch {row['batch']}: overhead {row['overhead_ms_mean']:.3f} ms/step "
            f"(p50 {row['overhead_ms_p50']:.3f}, p99 {row['overhead_ms_p99']:.3f}) vs modelled step "
            f"{row['modelled_step_ms_mean']:.2f} ms -> {100 * row['overhead_share']:.2f}% "
            f"({row['preemptions']} preemptions)",
            file=sys.stderr,
        )
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
