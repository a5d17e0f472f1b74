"""Helpers of the simulator's property tests: random small programs, and a run repeated under two
hash seeds."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from hypothesis import strategies as st

from autellix.sim.workload import CallSpec, ProgramSpec


@st.composite
def programs(
    draw: st.DrawFn, max_calls: int = 7, max_output: int = 120, think_s: Sequence[float] = (0.0, 0.01, 0.5)
) -> list[ProgramSpec]:
    """1-6 programs of 1-``max_calls`` calls each; a call names up to two earlier calls as parents
    and continues the context of one of them, or of none."""
    out = []
    for i in range(draw(st.integers(1, 6))):
        calls: list[CallSpec] = []
        for j in range(draw(st.integers(1, max_calls))):
            earlier = [c.call_id for c in calls]
            parents = tuple(draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True))) if earlier else ()
            ctx = draw(st.sampled_from([None, *parents])) if parents else None
            calls.append(
                CallSpec(
                    call_id=f"c{j}",
                    parents=parents,
                    new_prompt_tokens=draw(st.integers(1, 2500)),
                    output_tokens=draw(st.integers(1, max_output)),
                    think_s=draw(st.sampled_from(list(think_s))),
                    context_parent=ctx,
                )
            )
        out.append(ProgramSpec(f"p{i}", draw(st.floats(0, 5)), tuple(calls), kind="t"))
    return out


def finish_times_under_two_hash_seeds(config: str) -> set[str]:
    """The finish times of a small mixed run with ``SimConfig(<config>)``, as two interpreters with
    different hash seeds print them: one element when nothing iterates a set of strings."""
    code = (
        "from autellix.sim.generators import generate;"
        "from autellix.sim.simulator import SimConfig, simulate;"
        "from autellix.sim.workload import scaled_arrivals;"
        f"r = simulate(scaled_arrivals(generate('mixed', 12, 4), 0.2), SimConfig({config}));"
        "print(repr([(p.program_id, p.finish_s) for p in r.programs]))"
    )
    return {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2")
    }
