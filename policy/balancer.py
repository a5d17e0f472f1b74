"""Engine choice for a new call: round-robin, least-used, and Autellix's locality-aware balancer.

Pure: each call to :meth:`choose` takes a snapshot of the engines' loads; the balancers keep only
their own memory (a round-robin cursor; which engine last served each program). "Used" is measured
in KV tokens, held plus queued, never in call counts. Ties go to the engine listed first.

- ``round-robin``: engines in turn, ignoring load and program.
- ``least-used``: the engine with the fewest KV tokens held + queued.
- ``locality``: a call with at most ``threshold_tokens`` input tokens goes to the least-used engine
  (a short prompt is cheap to prefill anywhere); a longer one goes to the engine that served the
  program's previous call, where its context sits in the prefix cache; least-used the first time the
  program is seen, or when that engine is no longer in the snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

BALANCER_NAMES: tuple[str, ...] = ("round-robin", "least-used", "locality")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine's load as its heartbeat reports it."""

    engine_id: str
    kv_tokens_held: int = 0
    kv_tokens_queued: int = 0

    @property
    def used(self) -> int:
        return self.kv_tokens_held + self.kv_tokens_queued


class Balancer(Protocol):
    name: str

    def choose(self, program_id: str, input_tokens: int, loads: Sequence[EngineLoad]) -> str: ...

    def forget(self, program_id: str) -> None: ...


def _used(load: EngineLoad) -> int:
    return load.kv_tokens_held + load.kv_tokens_queued


def _least_used(loads: Sequence[EngineLoad]) -> str:
    if not loads:
        raise ValueError("no engines to choose from")
    return min(loads, key=_used).engine_id  # the first of equals


class RoundRobinBalancer:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, program_id: str, input_tokens: int, loads: Sequence[EngineLoad]) -> str:
        if not loads:
            raise ValueError("no engines to choose from")
        engine_id = loads[self._next % len(loads)].engine_id
        self._next += 1
        return engine_id

    def forget(self, program_id: str) -> None:
        return None


class LeastUsedBalancer:
    name = "least-used"

    def choose(self, program_id: str, input_tokens: int, loads: Sequence[EngineLoad]) -> str:
        return _least_used(loads)

    def forget(self, program_id: str) -> None:
        return None


class LocalityBalancer:
    name = "locality"

    def __init__(self, threshold_tokens: int = 2048) -> None:
        if threshold_tokens < 0:
            raise ValueError(f"threshold_tokens must be >= 0, got {threshold_tokens}")
        self.threshold_tokens = threshold_tokens
        self._home: dict[str, str] = {}

    def home_of(self, program_id: str) -> str | None:
        """The engine that served the program's latest call, if any."""
        return self._home.get(program_id)

    def choose(self, program_id: str, input_tokens: int, loads: Sequence[EngineLoad]) -> str:
        home = self._home.get(program_id)
        if input_tokens > self.threshold_tokens and home is not None:
            if any(load.engine_id == home for load in loads):
                return home
        engine_id = _least_used(loads)
        self._home[program_id] = engine_id
        return engine_id

    def forget(self, program_id: str) -> None:
        """Drop the program's affinity (it ended or was garbage-collected)."""
        self._home.pop(program_id, None)


def make_balancer(name: str, threshold_tokens: int = 2048) -> Balancer:
    if name == "round-robin":
        return RoundRobinBalancer()
    if name == "least-used":
        return LeastUsedBalancer()
    if name == "locality":
        return LocalityBalancer(threshold_tokens)
    raise ValueError(f"unknown balancer {name!r}; expected one of {', '.join(BALANCER_NAMES)}")
