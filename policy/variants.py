"""The scheduling policies an engine can run, as (queue, stamp) pairs.

============  =====================================================  ==========  ==========
policy        a new call's stamp (its priority)                      queue       preemptive
============  =====================================================  ==========  ==========
``fcfs``      0: one level, arrival order (what vLLM does)            1 level     no
``mlfq``      0: every call enters the top queue (request-level,      K levels    yes
              FastServe-like), demoted by quanta
``plas``      the program's attained service                          K levels    yes
``atlas``     the call's critical path (exact with parents named,     K levels    yes
              else the one-scalar approximation)
``srpt``      the program's remaining work (an oracle: simulator      sorted key  yes
              only)
============  =====================================================  ==========  ==========

"Preemptive" means that at a scheduling point a waiting call ahead in the queue order displaces a
running call behind it, by the queue's ``displaces`` rule (for the multi-level queues: only from at
least ``MLFQConfig.preempt_gap`` levels above). Every policy may still preempt on KV pressure (a running
batch that grows past the KV budget), the lowest call in the queue order first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from autellix.policy.mlfq import MLFQConfig, MultiLevelQueues
from autellix.policy.program_account import ProgramAccount, priority_for
from autellix.policy.static_queue import StaticPriorityQueue

POLICY_NAMES: tuple[str, ...] = ("fcfs", "mlfq", "plas", "atlas", "srpt")


class CallQueue(Protocol):
    """What an engine needs from a policy's queue (both queue classes implement it)."""

    def __len__(self) -> int: ...

    def __contains__(self, call_id: object) -> bool: ...

    def add(
        self,
        call_id: str,
        priority: float,
        now: float,
        *,
        program_wait_s: float = 0.0,
        program_service_s: float = 0.0,
    ) -> int: ...

    def remove(self, call_id: str) -> None: ...

    def started(self, call_id: str, now: float) -> None: ...

    def stopped(self, call_id: str, now: float) -> None: ...

    def charge(self, call_id: str, service_s: float) -> int: ...

    def promote_starved(self, now: float) -> list[str]: ...

    def sort_key(self, call_id: str) -> tuple[float, int]: ...

    def displaces(self, waiting_id: str, running_id: str) -> bool: ...

    def order(self) -> Iterator[str]: ...

    def order_waiting(self) -> Iterator[str]: ...

    def is_waiting(self, call_id: str) -> bool: ...

    def waiting_count(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str
    #: a waiting call ahead in the order displaces a running one at scheduling points
    preemptive: bool
    #: the queue boundaries follow the service calibrator
    calibrated: bool
    #: the stamp needs the program's remaining work (clairvoyant; simulator only)
    oracle: bool


_SPECS = {
    "fcfs": PolicySpec("fcfs", preemptive=False, calibrated=False, oracle=False),
    "mlfq": PolicySpec("mlfq", preemptive=True, calibrated=True, oracle=False),
    "plas": PolicySpec("plas", preemptive=True, calibrated=True, oracle=False),
    "atlas": PolicySpec("atlas", preemptive=True, calibrated=True, oracle=False),
    "srpt": PolicySpec("srpt", preemptive=True, calibrated=False, oracle=True),
}


#: the policies a live deployment can run (every one but the clairvoyant SRPT)
SERVING_POLICIES: tuple[str, ...] = tuple(n for n in POLICY_NAMES if not _SPECS[n].oracle)


def policy_spec(name: str) -> PolicySpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}") from None


def make_queue(name: str, config: MLFQConfig | None = None) -> CallQueue:
    """A fresh queue for ``name`` (``config`` shapes the multi-level ones)."""
    spec = policy_spec(name)
    config = config or MLFQConfig()
    if spec.name == "fcfs":
        return MultiLevelQueues(replace(config, num_levels=1), demote=False, starvation=False)
    if spec.name == "srpt":
        return StaticPriorityQueue()
    return MultiLevelQueues(config)


def stamp(
    name: str,
    account: ProgramAccount | None,
    parents: Sequence[str] | None,
    remaining_work: float | None = None,
) -> float:
    """The priority a scheduler stamps on a new call under policy ``name``.

    ``remaining_work`` (the program's remaining work in any consistent unit) is required by
    ``srpt`` and ignored by the others.
    """
    spec = policy_spec(name)
    if spec.oracle:
        if remaining_work is None:
            raise ValueError("srpt needs the program's remaining work (an oracle)")
        return float(remaining_work)
    return priority_for(spec.name, account, parents)
