"""Programs as the simulator sees them: a DAG of calls with token counts and think times.

A :class:`ProgramSpec` lists its calls parents-first. Each :class:`CallSpec` names the calls it
depends on (``parents``: it is submitted ``think_s`` seconds after the last of them completes, or
after the program's arrival for a root) and the call whose conversation it continues
(``context_parent``: with context carrying on, its prompt is that call's prompt and output plus its
own ``new_prompt_tokens``). The static prompt arithmetic lives in :func:`prompt_lengths`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class CallSpec:
    call_id: str
    parents: tuple[str, ...]
    new_prompt_tokens: int
    output_tokens: int
    think_s: float = 0.0
    #: the call whose prompt + output this call's prompt extends; None: no history
    context_parent: str | None = None


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    program_id: str
    arrival_s: float
    calls: tuple[CallSpec, ...]
    kind: str = ""

    @property
    def output_tokens(self) -> int:
        return sum(c.output_tokens for c in self.calls)


class WorkloadError(ValueError):
    """A program or trace that does not describe a valid DAG of calls."""


def validate(program: ProgramSpec) -> None:
    """Raise :class:`WorkloadError` unless ids are unique and every reference points backwards."""
    seen: set[str] = set()
    if not program.calls:
        raise WorkloadError(f"program {program.program_id!r} has no calls")
    if program.arrival_s < 0:
        raise WorkloadError(f"program {program.program_id!r}: negative arrival time")
    for c in program.calls:
        where = f"program {program.program_id!r} call {c.call_id!r}"
        if c.call_id in seen:
            raise WorkloadError(f"{where}: duplicate call id")
        for p in c.parents:
            if p not in seen:
                raise WorkloadError(f"{where}: parent {p!r} is not an earlier call")
        if c.context_parent is not None and c.context_parent not in seen:
            raise WorkloadError(f"{where}: context_parent {c.context_parent!r} is not an earlier call")
        if c.new_prompt_tokens < 1 or c.output_tokens < 1:
            raise WorkloadError(f"{where}: prompt and output tokens must be >= 1")
        if c.think_s < 0:
            raise WorkloadError(f"{where}: negative think time")
        seen.add(c.call_id)


def prompt_lengths(program: ProgramSpec, carry_context: bool, max_context: int) -> dict[str, int]:
    """Each call's full prompt length in tokens.

    With ``carry_context`` a call's prompt is its context parent's prompt and output plus its new
    input; otherwise just its new input. A prompt is cut to its most recent
    ``max_context - output_tokens`` tokens (as chat front-ends truncate), and never below 1.
    """
    lengths: dict[str, int] = {}
    outputs: dict[str, int] = {}
    for c in program.calls:
        history = 0
        if carry_context and c.context_parent is not None:
            history = lengths[c.context_parent] + outputs[c.context_parent]
        limit = max(1, max_context - c.output_tokens)
        lengths[c.call_id] = max(1, min(history + c.new_prompt_tokens, limit))
        outputs[c.call_id] = c.output_tokens
    return lengths


def scaled_arrivals(programs: Sequence[ProgramSpec], scale: float) -> list[ProgramSpec]:
    """The same programs with every arrival time multiplied by ``scale``."""
    return [replace(p, arrival_s=p.arrival_s * scale) for p in programs]
