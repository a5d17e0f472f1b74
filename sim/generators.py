"""Synthetic workloads matching the paper's statistics (DESIGN.md), deterministic by seed.

==========  ====================  ==========================  ================  ================
workload    shape                 calls per program           new prompt/call   output/call
==========  ====================  ==========================  ================  ================
sharegpt    chat: a chain         mean 6.66, max 80           mean 255.65       mean 276.81
bfcl        ReAct: a chain        mean 10.75, max 70          mean 735.06       mean 34.14
lats        MCTS: a tree of       10 per iteration, mean      mean 467.24       mean 72.64
            fan-outs and joins    159.7, max 400
mixed       each program drawn from the three in equal shares
==========  ====================  ==========================  ================  ================

Three more shapes (``chat-think``, ``fanout``, ``coder``: long human think time, 20-80-way fan-outs,
coding agents whose context grows past 20k tokens) live in :mod:`autellix.sim.agent_shapes`.

Shapes are clipped log-normals fitted so the clipped means equal the table (see
:mod:`autellix.sim.distributions`); the dispersions (sigmas) and clip ranges are ours.

The paper's prompt means are read as each call's *new* input; the simulator adds the history
along the call's context chain when context carrying is on (the default).

LATS, after Zhou et al.'s Language Agent Tree Search with the default of five children: each
iteration selects a node, expands it with 5 parallel calls (each continuing the selected node's
context), evaluates each child with one call (continuing the child's context), and the next
iteration starts when all 5 evaluations are back (a join: its expansions name them as parents).
The next node is one of the new children with probability 0.7 (search deepens), else any node
expanded so far (backtrack). The number of iterations is fitted to a mean of 15.97 (159.7 calls),
at most 40 (400 calls).

Think times (our choice; the paper's table gives none) are exponential: a user's reply in
sharegpt (mean 1 s), a tool's execution in bfcl (0.5 s), an environment step in lats (0.2 s). A
program's first call is submitted on arrival. ``think_scale`` multiplies them all.

Arrivals are a Poisson process of rate 1 program/s; the simulator rescales them to each rate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from autellix.sim.agent_shapes import chat_think_program, coder_program, fanout_program
from autellix.sim.chains import SHAREGPT_CALLS, SHAREGPT_OUTPUT, SHAREGPT_PROMPT, chain_program, think_times
from autellix.sim.distributions import CountDist, TokenDist
from autellix.sim.workload import CallSpec, ProgramSpec

WORKLOAD_NAMES: tuple[str, ...] = ("sharegpt", "bfcl", "lats", "mixed", "chat-think", "fanout", "coder")

SHAREGPT_THINK_S = 1.0

BFCL_CALLS = CountDist(mean=10.75, sigma=0.8, lo=1, hi=70)
BFCL_PROMPT = TokenDist(mean=735.06, sigma=0.5, lo=64, hi=4096)
BFCL_OUTPUT = TokenDist(mean=34.14, sigma=0.8, lo=2, hi=512)
BFCL_THINK_S = 0.5

LATS_FANOUT = 5
LATS_ITERATIONS = CountDist(mean=15.97, sigma=0.6, lo=1, hi=40)
LATS_PROMPT = TokenDist(mean=467.24, sigma=0.4, lo=64, hi=2048)
LATS_OUTPUT = TokenDist(mean=72.64, sigma=0.7, lo=4, hi=512)
LATS_THINK_S = 0.2
LATS_DEEPEN_P = 0.7


def sharegpt_program(rng: np.random.Generator, program_id: str, think_scale: float = 1.0) -> ProgramSpec:
    return chain_program(
        rng, program_id, "sharegpt", SHAREGPT_CALLS, SHAREGPT_PROMPT, SHAREGPT_OUTPUT,
        SHAREGPT_THINK_S * think_scale,
    )


def bfcl_program(rng: np.random.Generator, program_id: str, think_scale: float = 1.0) -> ProgramSpec:
    return chain_program(
        rng, program_id, "bfcl", BFCL_CALLS, BFCL_PROMPT, BFCL_OUTPUT, BFCL_THINK_S * think_scale
    )


def lats_program(rng: np.random.Generator, program_id: str, think_scale: float = 1.0) -> ProgramSpec:
    iterations = LATS_ITERATIONS.sample(rng)
    n = iterations * LATS_FANOUT * 2
    prompts, outputs = LATS_PROMPT.sample(rng, n), LATS_OUTPUT.sample(rng, n)
    thinks = think_times(rng, LATS_THINK_S * think_scale, n)
    specs: list[CallSpec] = []
    expanded: list[str] = []
    previous_evals: tuple[str, ...] = ()
    selected: str | None = None
    for it in range(iterations):
        children = []
        for k in range(LATS_FANOUT):
            i = len(specs)
            cid = f"e{it}.{k}"
            specs.append(
                CallSpec(cid, previous_evals, prompts[i], outputs[i], thinks[i] if it else 0.0, selected)
            )
            children.append(cid)
        evals = []
        for child in children:
            i = len(specs)
            vid = "v" + child[1:]
            specs.append(CallSpec(vid, (child,), prompts[i], outputs[i], thinks[i], child))
            evals.append(vid)
        expanded.extend(children)
        previous_evals = tuple(evals)
        pool = children if rng.random() < LATS_DEEPEN_P else expanded
        selected = pool[int(rng.integers(len(pool)))]
    return ProgramSpec(program_id=program_id, arrival_s=0.0, calls=tuple(specs), kind="lats")


_MAKERS: dict[str, Callable[[np.random.Generator, str, float], ProgramSpec]] = {
    "sharegpt": sharegpt_program,
    "bfcl": bfcl_program,
    "lats": lats_program,
    "chat-think": chat_think_program,
    "fanout": fanout_program,
    "coder": coder_program,
}


def generate(name: str, n_programs: int, seed: int = 0, think_scale: float = 1.0) -> list[ProgramSpec]:
    """``n_programs`` programs of workload ``name`` arriving as a Poisson process of rate 1/s.

    Program ``i`` draws from its own stream ``(seed, i)``, so a program does not change when the
    count does; arrivals draw from a separate stream.
    """
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOAD_NAMES)}")
    if n_programs < 1:
        raise ValueError(f"need at least one program, got {n_programs}")
    if name == "mixed":
        kinds = np.random.default_rng([seed, 2]).permutation(
            np.resize(np.array(["sharegpt", "bfcl", "lats"]), n_programs)
        ).tolist()
    else:
        kinds = [name] * n_programs
    arrivals = np.cumsum(np.random.default_rng([seed, 1]).exponential(1.0, n_programs)).tolist()
    programs = []
    for i, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, 0, i])
        p = _MAKERS[kind](rng, f"p{i}", think_scale)
        programs.append(ProgramSpec(p.program_id, float(arrivals[i]), p.calls, p.kind))
    return programs
