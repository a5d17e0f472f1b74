"""Chain programs: each call continues the previous call's context after a think time (a chat, a
ReAct loop, a coding agent), and ShareGPT's conversation statistics, which ``sharegpt`` and
``chat-think`` share (:mod:`autellix.sim.generators`, :mod:`autellix.sim.agent_shapes`)."""

from __future__ import annotations

import numpy as np

from autellix.sim.distributions import CountDist, TokenDist
from autellix.sim.workload import CallSpec, ProgramSpec

SHAREGPT_CALLS = CountDist(mean=6.66, sigma=1.0, lo=1, hi=80)
SHAREGPT_PROMPT = TokenDist(mean=255.65, sigma=1.0, lo=4, hi=4096)
SHAREGPT_OUTPUT = TokenDist(mean=276.81, sigma=0.9, lo=4, hi=2048)


def think_times(rng: np.random.Generator, mean_s: float, n: int) -> list[float]:
    """``n`` exponential think times of mean ``mean_s`` (none drawn when it is 0)."""
    if mean_s <= 0:
        return [0.0] * n
    return rng.exponential(mean_s, n).tolist()


def chain_program(
    rng: np.random.Generator,
    program_id: str,
    kind: str,
    calls: CountDist,
    prompt: TokenDist,
    output: TokenDist,
    think_s: float,
) -> ProgramSpec:
    """A chain of ``calls`` calls, each the previous one's child, continuing its context."""
    n = calls.sample(rng)
    prompts, outputs, thinks = prompt.sample(rng, n), output.sample(rng, n), think_times(rng, think_s, n)
    specs: list[CallSpec] = []
    for i in range(n):
        parent = (f"c{i - 1}",) if i else ()
        specs.append(
            CallSpec(
                call_id=f"c{i}",
                parents=parent,
                new_prompt_tokens=prompts[i],
                output_tokens=outputs[i],
                think_s=thinks[i] if i else 0.0,
                context_parent=parent[0] if parent else None,
            )
        )
    return ProgramSpec(program_id=program_id, arrival_s=0.0, calls=tuple(specs), kind=kind)
