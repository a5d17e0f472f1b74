"""Three agent shapes beyond the paper's workloads, for program-level memory management.

Each stresses a different part of KV memory (DESIGN.md, "Where the gains live"):

==============  =============================================  ===========================================
workload        shape                                          what it stresses
==============  =============================================  ===========================================
chat-think      a sharegpt-like conversation whose user         contexts idle for minutes between calls:
                replies after a long think time (exponential,   retention vs. idle decay; programs stay
                mean 120 s)                                     active (and their context wanted) long
fanout          a planner call, then 20-80 parallel workers     breadth: one context shared by many calls
                continuing its context, then an aggregator      at once; preemption swaps under PLAS/ATLAS
                (1 or 2 rounds; tool time 0.5 s)
coder           a long sequential coding agent: 25-150 calls,   a context that grows past 20k tokens
                each adding tool output (mean 500 tokens) and   (mean final context ~40k): a few programs
                code (mean 180), tool time mean 2 s             fill the KV budget
==============  =============================================  ===========================================

Sizes are ours (the paper gives none for these shapes); clipped log-normals as in
:mod:`autellix.sim.generators`. Each program draws from its own seeded stream.
"""

from __future__ import annotations

import numpy as np

from autellix.sim.chains import SHAREGPT_CALLS, SHAREGPT_OUTPUT, SHAREGPT_PROMPT, chain_program, think_times
from autellix.sim.distributions import CountDist, TokenDist
from autellix.sim.workload import CallSpec, ProgramSpec

CHAT_THINK_S = 120.0

FANOUT_WIDTH = (20, 80)  # inclusive, uniform
FANOUT_ROUNDS = (1, 2)
FANOUT_PLAN_PROMPT = TokenDist(mean=800.0, sigma=0.5, lo=64, hi=4096)
FANOUT_PLAN_OUTPUT = TokenDist(mean=120.0, sigma=0.6, lo=8, hi=1024)
FANOUT_WORKER_PROMPT = TokenDist(mean=300.0, sigma=0.6, lo=16, hi=2048)
FANOUT_WORKER_OUTPUT = TokenDist(mean=150.0, sigma=0.7, lo=4, hi=1024)
FANOUT_AGG_OUTPUT = TokenDist(mean=250.0, sigma=0.6, lo=8, hi=1024)
FANOUT_THINK_S = 0.5

CODER_CALLS = CountDist(mean=60.0, sigma=0.5, lo=25, hi=150)
CODER_PROMPT = TokenDist(mean=500.0, sigma=1.0, lo=16, hi=8192)
CODER_OUTPUT = TokenDist(mean=180.0, sigma=0.8, lo=8, hi=2048)
CODER_THINK_S = 2.0


def chat_think_program(rng: np.random.Generator, program_id: str, think_scale: float = 1.0) -> ProgramSpec:
    return chain_program(
        rng, program_id, "chat-think", SHAREGPT_CALLS, SHAREGPT_PROMPT, SHAREGPT_OUTPUT, CHAT_THINK_S * think_scale
    )


def coder_program(rng: np.random.Generator, program_id: str, think_scale: float = 1.0) -> ProgramSpec:
    return chain_program(rng, program_id, "coder", CODER_CALLS, CODER_PROMPT, CODER_OUTPUT, CODER_THINK_S * think_scale)


def fanout_program(rng: np.random.Generator, program_id: str, think_scale: float = 1.0) -> ProgramSpec:
    rounds = int(rng.integers(FANOUT_ROUNDS[0], FANOUT_ROUNDS[1] + 1))
    think = FANOUT_THINK_S * think_scale
    specs: list[CallSpec] = []
    previous: str | None = None
    for r in range(rounds):
        plan = f"plan{r}"
        specs.append(
            CallSpec(
                plan, (previous,) if previous else (), FANOUT_PLAN_PROMPT.sample(rng, 1)[0],
                FANOUT_PLAN_OUTPUT.sample(rng, 1)[0], think_times(rng, think, 1)[0] if previous else 0.0, previous,
            )
        )
        width = int(rng.integers(FANOUT_WIDTH[0], FANOUT_WIDTH[1] + 1))
        prompts, outputs = FANOUT_WORKER_PROMPT.sample(rng, width), FANOUT_WORKER_OUTPUT.sample(rng, width)
        thinks = think_times(rng, think, width)
        workers = []
        for k in range(width):
            wid = f"w{r}.{k}"
            specs.append(CallSpec(wid, (plan,), prompts[k], outputs[k], thinks[k], plan))
            workers.append(wid)
        # the aggregator reads every worker's result (new input: their outputs) on top of the plan
        agg = f"agg{r}"
        specs.append(
            CallSpec(
                agg, tuple(workers), max(1, sum(outputs)), FANOUT_AGG_OUTPUT.sample(rng, 1)[0],
                think_times(rng, think, 1)[0], plan,
            )
        )
        previous = agg
    return ProgramSpec(program_id, 0.0, tuple(specs), "fanout")
