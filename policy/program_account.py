"""Per-program service arithmetic for PLAS and ATLAS. Pure, synchronous, no I/O.

PLAS (single-threaded programs): a new call's priority is the program's attained service, the sum
of the service times of its completed calls.

ATLAS (multi-threaded programs): a call's priority is its critical path so far: 0 for a root, else
the max over its parents of (parent's priority + parent's service).

- exact, when calls name their parents (``parents`` is a list; ``[]`` marks a root);
- the paper's approximation when they don't (``parents is None``): one scalar per program, the
  longest critical path observed; a new call inherits it and, on completion,
  ``scalar = max(scalar, inherited + own service)``.

Larger priority values mean *lower* priority (more service already received).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class ProgramAccount:
    program_id: str
    service_s: float = 0.0
    critical_path_s: float = 0.0
    calls_completed: int = 0
    #: exact ATLAS: call id -> that call's critical-path finish (its ATLAS priority + its service)
    call_path_s: dict[str, float] = field(default_factory=dict)

    def plas_priority(self) -> float:
        return self.service_s

    def atlas_priority(self, parents: Sequence[str] | None) -> float:
        """Critical-path priority of a new call with these parents (see module docstring)."""
        if parents is None:
            return self.critical_path_s
        known = [self.call_path_s[p] for p in parents if p in self.call_path_s]
        if not known:
            # A root, or parents this program never completed (unknown ids): start the path at 0
            # for a root; fall back to the scalar when every named parent is unknown.
            return 0.0 if not parents else self.critical_path_s
        return max(known)

    def complete(self, call_id: str, parents: Sequence[str] | None, service_s: float) -> float:
        """Record a completed call; returns its critical-path finish (ATLAS priority + service)."""
        if service_s < 0:
            raise ValueError(f"service time must be >= 0, got {service_s}")
        path = self.atlas_priority(parents) + service_s
        self.service_s += service_s
        self.calls_completed += 1
        if call_id:
            self.call_path_s[call_id] = path
        self.critical_path_s = max(self.critical_path_s, path)
        return path

    def add_service(self, call_id: str, service_s: float) -> float:
        """More service for a call already completed: another attempt of it ran too (a resubmission
        raced the attempt counted first). The call still counts once; its path grows by the service."""
        if service_s < 0:
            raise ValueError(f"service time must be >= 0, got {service_s}")
        self.service_s += service_s
        path = self.call_path_s.get(call_id, self.critical_path_s) + service_s
        if call_id:
            self.call_path_s[call_id] = path
        self.critical_path_s = max(self.critical_path_s, path)
        return path


def priority_for(policy: str, account: ProgramAccount | None, parents: Sequence[str] | None) -> float:
    """The stamp a scheduler puts on a new call under ``policy``.

    ``fcfs`` and ``mlfq`` stamp 0 (FCFS orders by arrival; request-level MLFQ starts every call in
    the top queue); ``plas`` stamps attained service; ``atlas`` the critical path.
    """
    if policy in ("fcfs", "mlfq") or account is None:
        return 0.0
    if policy == "plas":
        return account.plas_priority()
    if policy == "atlas":
        return account.atlas_priority(parents)
    raise ValueError(f"unknown policy {policy!r}; expected fcfs, mlfq, plas or atlas")
